"""`kvctl stats` end to end: the real CLI (one-shot JSON and --live in tmux) against a real router and sims."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from helpers import KVCTL, ROOT, Procs, kvctl, sim_instance, start_engines, start_router, wait_for, write_config

ADMIN = "stats-admin"
KEY = "stats-key"
FIELDS = {
    "state",
    "instances",
    "instances_awake",
    "in_flight",
    "queued",
    "request_rate",
    "window_requests",
    "total_requests",
    "successful_requests",
    "failed_requests",
    "success_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "idle_seconds",
    "sleep_candidate",
    "memory_gb",
    "kv",
}


def stats_json(config_path: Path, *args: str) -> dict:
    result = kvctl("stats", "-c", str(config_path), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def tree(procs: Procs, tmp_path: Path):
    """Three sim models behind a router guarded by api_keys and an admin_token; one always fails."""
    config = write_config(
        tmp_path,
        [
            sim_instance("org/model-a", name="a", memory_gb=6, ttft_ms=5, tokens_per_second=100),
            sim_instance("model-b", name="b", memory_gb=2),
            sim_instance("model-c", name="c", fail_rate=1.0),
        ],
        router={"api_keys": [KEY], "admin_token": ADMIN},
    )
    start_engines(procs, config)
    router = start_router(procs, config, token=ADMIN)
    client = openai.OpenAI(base_url=router + "/v1", api_key=KEY, max_retries=0)
    return config, client


def test_stats_json_agrees_with_the_requests_sent(tree) -> None:
    config, client = tree
    for _ in range(3):
        client.completions.create(model="org/model-a", prompt="hello", max_tokens=4)
    for _chunk in client.chat.completions.create(model="org/model-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True):
        pass
    client.completions.create(model="model-b", prompt="hello", max_tokens=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="model-c", prompt="hello", max_tokens=2)
    expected = {"org/model-a": (4, 4, 0), "model-b": (1, 1, 0), "model-c": (2, 0, 2)}

    def settled() -> dict | None:
        # The router counts a request when its last byte is sent, a moment after the client has it.
        snap = stats_json(config.path, "--window", "30")
        counts = {m: (r["total_requests"], r["successful_requests"], r["failed_requests"]) for m, r in snap["models"].items()}
        return snap if counts == expected else None

    snap = wait_for(settled, timeout=10, what="stats to count every request")
    assert snap["window_seconds"] == 30 and snap["router"] == config.router.url
    assert list(snap["models"]) == ["org/model-a", "model-b", "model-c"]  # config order
    a, b, c = (snap["models"][m] for m in ("org/model-a", "model-b", "model-c"))
    for row in (a, b, c):
        assert set(row) == FIELDS
        assert row["state"] == "awake" and row["instances"] == row["instances_awake"] == 1
        assert row["in_flight"] == 0 and row["queued"] == 0
    assert a["request_rate"] == pytest.approx(4 / 30) and a["window_requests"] == 4
    assert a["success_rate"] == 100.0 and c["success_rate"] == 0.0
    assert a["latency_p50_ms"] > 0 and a["latency_p50_ms"] <= a["latency_p95_ms"]
    assert a["ttft_p50_ms"] >= 5  # the sim's ttft_ms
    assert a["memory_gb"] == 6 and b["memory_gb"] == 2 and c["memory_gb"] is None  # c declares none
    assert a["idle_seconds"] >= 0

    # Sleep model-b through the admin API: stats shows it asleep, holding no memory.
    result = kvctl("sleep", "model-b", "-c", str(config.path))
    assert result.returncode == 0, result.stdout + result.stderr
    b = stats_json(config.path)["models"]["model-b"]
    assert b["state"] == "asleep" and b["instances_awake"] == 0 and b["memory_gb"] == 0

    table = kvctl("stats", "-c", str(config.path))
    assert table.returncode == 0 and "org/model-a" in table.stdout and "asleep" in table.stdout


def test_stats_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("m")])
    down = kvctl("stats", "-c", str(config.path))
    assert down.returncode == 1 and "unreachable" in down.stderr and "Traceback" not in down.stderr
    bad = kvctl("stats", "-c", str(config.path), "--window", "0")
    assert bad.returncode == 2 and "must be positive" in bad.stderr


# --------------------------------------------------------------------------- --live in tmux


class Tmux:
    """One tmux session on a private server socket, so nothing else's tmux is touched."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"kvctl-test-{uuid.uuid4().hex[:8]}"
        self.name = "stats"
        self.exit_file = tmp_path / "exit"
        self.stderr_file = tmp_path / "stderr"

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True, timeout=10).stdout

    def start(self, argv: list[str]) -> None:
        # tmux takes one shell command; every part is quoted.
        command = (
            f"cd {shlex.quote(str(ROOT))} && {shlex.join(argv)} 2> {shlex.quote(str(self.stderr_file))}; echo EXIT=$? > {shlex.quote(str(self.exit_file))}"
        )
        self._tmux("new-session", "-d", "-s", self.name, "-x", "200", "-y", "50", command)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    try:
        yield session
    finally:
        session.kill()


def _total(screen: str, model: str) -> int | None:
    """The `total` column of a model's row (columns: model state inst run queue req/s total ...)."""
    for line in screen.splitlines():
        parts = line.split()
        if parts and parts[0] == model and len(parts) > 6 and parts[6].isdigit():
            return int(parts[6])
    return None


def test_stats_live_redraws_survives_a_router_restart_and_exits_0_on_ctrl_c(tree, procs: Procs, tmux: Tmux) -> None:
    config, client = tree
    env_free = ["env", "-u", "KVCTL_ADMIN_TOKEN", "COLUMNS=200"]
    tmux.start([*env_free, *KVCTL, "stats", "-c", str(config.path), "--live", "--interval", "0.3"])
    wait_for(lambda: _total(tmux.screen(), "model-b") == 0, timeout=20, what="the live table with model-b at 0 requests")

    for _ in range(3):
        client.completions.create(model="model-b", prompt="hello", max_tokens=2)
    wait_for(lambda: _total(tmux.screen(), "model-b") == 3, timeout=20, what="model-b's total to reach 3 on screen")

    # The router goes away: the display says so instead of crashing...
    router = procs.find(*KVCTL, "router")
    os.killpg(router.pid, signal.SIGKILL)
    router.wait(timeout=10)
    wait_for(lambda: "router unreachable" in tmux.screen(), timeout=20, what="the unreachable notice")
    assert not tmux.exit_file.exists()
    # ...and recovers when it is back (a new router: counts start again).
    start_router(procs, config, token=ADMIN)
    wait_for(lambda: "router unreachable" not in (s := tmux.screen()) and _total(s, "model-b") == 0, timeout=20, what="the table back after the restart")

    tmux.keys("C-c")
    wait_for(tmux.exit_file.exists, timeout=20, what="kvctl stats --live to exit")
    assert tmux.exit_file.read_text().strip() == "EXIT=0"
    assert tmux.stderr_file.read_text() == ""  # no traceback, no error line


def test_stats_reads_with_the_api_key_when_no_admin_token(procs: Procs, tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("m")], router={"api_keys": [KEY]})
    start_engines(procs, config)
    start_router(procs, config, token=KEY)
    assert httpx.get(config.router.url + "/traffic/stats").status_code == 401
    assert stats_json(config.path)["models"]["m"]["state"] == "awake"


def test_stats_fits_80_columns_one_line_a_row(procs: Procs, tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("meta-llama/Llama-3.2-1B", name="llama"), sim_instance("Qwen/Qwen3-0.6B", name="qwen")])
    start_engines(procs, config)
    start_router(procs, config)
    wide = kvctl("stats", "-c", str(config.path))  # COLUMNS=200: every column
    assert wide.returncode == 0, wide.stderr
    assert "ttft50" in wide.stdout and "hidden" not in wide.stdout

    narrow = kvctl("stats", "-c", str(config.path), columns=80)
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line.split() for line in lines if line.split()[:2] == ["model", "state"])
    assert {"run", "req/s", "ok%"} <= set(header)
    for model in ("meta-llama/Llama-3.2-1B", "Qwen/Qwen3-0.6B"):
        row = next(line.split() for line in lines if line.split()[:1] == [model])  # the whole name on one line
        assert row[1] == "awake" and len(row) == len(header)  # every shown cell on that line
    hidden = next(line for line in lines if line.startswith("hidden at 80 columns: "))
    assert all(column not in header for column in hidden.split(": ", 1)[1].split(";")[0].split(", "))
