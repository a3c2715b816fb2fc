"""kvcached's KV-cache segments (SPEC §13): the protocol module against segments made here,
the simulated engine's side, and end to end with real trees of sims."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvctl import kvcached

from helpers import Procs, Tree, engine_pid, free_port, kvctl, read_segment, sim_yaml, wait_for, wait_http_ok, write_segment

GiB = 2**30
MiB = 2**20


@pytest.fixture
def segment_name() -> Iterator[str]:
    name = f"kvctl_test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the protocol module


def test_read_a_segment_written_by_another_writer(segment_name: str) -> None:
    assert kvcached.read(segment_name) is None  # missing = unknown, not an error
    write_segment(segment_name, 3 * GiB, 512 * MiB, 64 * MiB)
    info = kvcached.read(segment_name)
    assert info == kvcached.KvInfo(limit_bytes=3 * GiB, used_bytes=512 * MiB, prealloc_bytes=64 * MiB)
    assert info.held_bytes == 576 * MiB
    assert info.as_json() == {"used_bytes": 512 * MiB, "limit_bytes": 3 * GiB, "prealloc_bytes": 64 * MiB}


def test_write_limit_changes_only_the_limit_and_never_creates(segment_name: str) -> None:
    assert kvcached.write_limit(segment_name, GiB) is None
    assert not Path(f"/dev/shm/{segment_name}").exists()
    write_segment(segment_name, 4 * GiB, 3 * GiB, 5)
    before = kvcached.write_limit(segment_name, GiB)  # below `used`: written as asked, not clamped
    assert before is not None and before.limit_bytes == 4 * GiB
    assert read_segment(segment_name) == (GiB, 3 * GiB, 5)
    with pytest.raises(ValueError):
        kvcached.write_limit(segment_name, -1)


def test_a_writer_waits_for_a_reader_lock(segment_name: str) -> None:
    """Writers take the exclusive lock: while a reader holds the shared one, the limit stays."""
    write_segment(segment_name, 2 * GiB)
    done = threading.Event()
    with open(f"/dev/shm/{segment_name}", "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        writer = threading.Thread(target=lambda: (kvcached.write_limit(segment_name, GiB), done.set()))
        writer.start()
        assert not done.wait(0.3)  # blocked behind the reader
        assert read_segment(segment_name)[0] == 2 * GiB
        fcntl.flock(fh, fcntl.LOCK_UN)
    writer.join(5)
    assert done.is_set() and read_segment(segment_name)[0] == GiB


def test_short_or_foreign_files_are_unknown(segment_name: str) -> None:
    Path(f"/dev/shm/{segment_name}").write_bytes(b"short")
    assert kvcached.read(segment_name) is None
    assert kvcached.write_limit(segment_name, GiB) is None
    assert segment_name not in kvcached.list_owned()


def test_list_owned_and_remove(segment_name: str) -> None:
    write_segment(segment_name, GiB, 1, 2)
    owned = kvcached.list_owned()
    assert owned[segment_name] == kvcached.KvInfo(GiB, 1, 2)
    assert all(name.startswith("kvctl_") for name in owned)
    assert kvcached.remove(segment_name) is True
    assert kvcached.remove(segment_name) is False
    assert segment_name not in kvcached.list_owned()


def test_names_survive_kvcacheds_sanitizer() -> None:
    from kvctl.config import kvcached_ipc_name

    assert kvcached.sanitize("kvctl_llama-3.2-1b") == "kvctl_llama-3-2-1b"
    for name in ("llama-3.2-1b", "a.b_c-d", "x" * 80, "Qwen3.0"):
        ipc = kvcached_ipc_name(name)
        assert kvcached.sanitize(ipc) == ipc and len(ipc) <= 64
    assert kvcached.enabled({"ENABLE_KVCACHED": "true"}) and not kvcached.enabled({"ENABLE_KVCACHED": "false"}) and not kvcached.enabled({})
    assert kvcached.segment_name({"KVCACHED_IPC_NAME": "kvctl_a.b"}) == "kvctl_a-b"


def test_engine_side_segment(segment_name: str) -> None:
    seg = kvcached.Segment(segment_name, 4 * GiB)
    assert read_segment(segment_name) == (4 * GiB, 0, 0)
    assert os.stat(f"/dev/shm/{segment_name}").st_mode & 0o777 == 0o600
    seg.set_usage(GiB, 2)
    assert read_segment(segment_name) == (4 * GiB, GiB, 2)
    write_segment(segment_name, GiB, GiB, 2)
    assert seg.limit() == GiB
    seg.remove()
    assert not Path(f"/dev/shm/{segment_name}").exists()


# --------------------------------------------------------------------------- the simulated engine


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in {url}/metrics")


def test_sim_speaks_the_protocol(procs: Procs, segment_name: str) -> None:
    """Segment at start (40 % of --memory-gb), used tracks running requests, a request that
    does not fit waits inside the engine, sleep frees all KV, the segment goes at exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": segment_name}
    # 1 MiB per token; each request reserves 100 prompt words + 20 tokens = 120 MiB; capacity 400 MiB -> 3 fit.
    proc = procs.start_sim("m", port, "--memory-gb", str(1000 / 1024), "--kv-bytes-per-token", str(MiB), "--tokens-per-second", "10", env=env)
    wait_http_ok(url + "/health")
    assert read_segment(segment_name) == (400 * MiB, 0, 0)
    results: list[int] = []
    body = {"model": "m", "prompt": "w " * 100, "max_tokens": 20}
    threads = [threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code)) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: _metric(url, "vllm:num_requests_waiting") == 2 and _metric(url, "vllm:num_requests_running") == 3, what="3 running, 2 waiting")
    wait_for(lambda: read_segment(segment_name)[1] > 300 * MiB, what="used grows with prompts and tokens")
    assert read_segment(segment_name)[1] <= 360 * MiB
    for t in threads:
        t.join(60)
    assert results == [200] * 5
    assert read_segment(segment_name)[1] == 0

    # Sleep frees every byte of KV, also that of a request paused by the sleep (mode=keep).
    paused = threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code))
    paused.start()
    wait_for(lambda: read_segment(segment_name)[1] > 0, what="a running request holds KV")
    assert httpx.post(url + "/sleep", params={"level": 1, "mode": "keep"}, timeout=10).status_code == 200
    assert read_segment(segment_name)[1] == 0
    assert httpx.post(url + "/wake_up", timeout=10).status_code == 200
    assert read_segment(segment_name)[1] > 0
    paused.join(60)
    assert results == [200] * 6 and read_segment(segment_name)[1] == 0
    proc.terminate()
    proc.wait(10)
    assert not Path(f"/dev/shm/{segment_name}").exists()


# --------------------------------------------------------------------------- config


def test_config_keys_and_errors(tmp_path: Path) -> None:
    from kvctl import config as config_mod
    from kvctl.errors import ConfigError

    def conf(instance: str = "", sleep_manager: str = "") -> Path:
        path = tmp_path / "kvctl.yaml"
        path.write_text(
            f"sleep_manager:\n  check_interval_seconds: 1\n{sleep_manager}instances:\n"
            f"  - name: a.b\n    model: m\n    engine: sim\n    port: 9\n    engine_env: {{ENABLE_KVCACHED: 'true'}}\n{instance}"
        )
        return path

    good = config_mod.load(conf("    kv_limit_gb: 1.5\n    sim: {kv_bytes_per_token: 4096}\n", "  kv_rebalance: true\n  kv_budget_gb: 4\n  kv_min_gb: 1\n"))
    inst = good.instances[0]
    assert (inst.kv_limit_gb, inst.sim.kv_bytes_per_token, inst.env["KVCACHED_IPC_NAME"]) == (1.5, 4096, "kvctl_a-b")
    assert (good.sleep_manager.kv_rebalance, good.sleep_manager.kv_budget_gb, good.sleep_manager.kv_min_gb) == (True, 4.0, 1.0)
    from kvctl.engines import adapter_for

    assert adapter_for(inst).command(inst)[-2:] == ["--kv-bytes-per-token", "4096"]

    with pytest.raises(ConfigError) as bad:
        config_mod.load(conf(sleep_manager="  kv_rebalance: true\n"))
    assert "kv_rebalance: needs sleep_manager.kv_budget_gb" in bad.value.problems[0]
    with pytest.raises(ConfigError) as bad:
        config_mod.load(conf(sleep_manager="  kv_budget_gb: 1\n  kv_min_gb: 2\n"))
    assert "kv_min_gb: 2 is more than kv_budget_gb 1" in bad.value.problems[0]

    # Without NVML and a GPU (this machine), `memory_gb: auto` is an error at the key, exit 2.
    path = conf("    memory_gb: auto\n")
    check = kvctl("config", "check", "-c", str(path))
    assert check.returncode == 2
    assert f"{path}:9:16: memory_gb: 'auto' needs each engine's GPU memory from NVML" in check.stderr


# --------------------------------------------------------------------------- end to end: real trees of sims

KV_ENV = "kvcached:\n  enable_kvcached: true\n"  # upper-cased into every engine's environment
# Segment names are per machine: unique instance names keep concurrent runs of these tests apart.
T = uuid.uuid4().hex[:6]
ALPHA, BETA, BUSY, IDLE, A, B, C = f"alpha.{T}", f"beta{T}", f"busy{T}", f"idle{T}", f"a{T}", f"b{T}", f"c{T}"


def _kv_sim(name: str, port: int, memory_gb: float, kv_bytes: int, tps: float = 10, extra: str = "", model: str | None = None) -> str:
    return sim_yaml(name, port, model=model, extra=f"    sim: {{memory_gb: {memory_gb}, kv_bytes_per_token: {kv_bytes}, tokens_per_second: {tps}}}\n{extra}")


def _json(tree: Tree, *args: str) -> dict:
    result = tree.kvctl(*args, "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _stream(url: str, model: str, prompt_words: int, max_tokens: int) -> int:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = client.completions.create(model=model, prompt="w " * prompt_words, max_tokens=max_tokens, stream=True)
    return sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].text)


def _engine_metric(port: int, name: str) -> float:
    return _metric(f"http://127.0.0.1:{port}", name)


def _kv_events(tree: Tree) -> list[dict]:
    events = [json.loads(line) for line in tree.kvctl("events", "--json").stdout.splitlines() if line.strip()]
    return [e for e in events if "kv limit" in e["cause"]]


def test_visibility_control_and_other_writers(kvtree: Tree) -> None:
    ports = [free_port(), free_port()]
    # alpha.1: a '.' in the name; 1 MiB per token, capacity 40 % of 1000 MiB = 400 MiB; a request of
    # 50 prompt words + 20 tokens reserves 70 MiB. beta: kv_limit_gb applied whenever it is ready.
    kvtree.write(_kv_sim(ALPHA, ports[0], 1000 / 1024, MiB) + _kv_sim(BETA, ports[1], 1000 / 1024, MiB, extra="    kv_limit_gb: 0.25\n"), KV_ENV)
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    alpha, beta = "kvctl_alpha-" + T, "kvctl_" + BETA  # what the sim made of KVCACHED_IPC_NAME with kvcached's sanitizer: kvctl's name unchanged
    assert read_segment(alpha) == (400 * MiB, 0, 0)
    wait_for(lambda: read_segment(beta)[0] == 256 * MiB, what="kv_limit_gb applied at ready")

    # Used rises while long streams run and falls after, in `kvctl stats --json`.
    # 6 s each (60 tokens at 10/s, 110 MiB of KV): long enough for a `kvctl stats` on a loaded machine to see them.
    pool = [threading.Thread(target=_stream, args=(kvtree.router_url, "org/" + ALPHA, 50, 60)) for _ in range(3)]
    for t in pool:
        t.start()
    wait_for(lambda: (_json(kvtree, "stats")["models"]["org/" + ALPHA]["kv"] or {}).get("used_bytes", 0) >= 150 * MiB, what="stats: used rising")
    metrics = httpx.get(kvtree.router_url + "/metrics", timeout=5).text
    for gauge in ("kvctl_kv_used_bytes", "kvctl_kv_limit_bytes", "kvctl_kv_prealloc_bytes"):
        assert f'{gauge}{{instance="{ALPHA}",model="org/{ALPHA}"}}' in metrics
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("kvctl_kv_"))
    assert float(samples[f'kvctl_kv_limit_bytes{{instance="{BETA}",model="org/{BETA}"}}']) == 256 * MiB
    for t in pool:
        t.join(60)
    wait_for(lambda: _json(kvtree, "stats")["models"]["org/" + ALPHA]["kv"]["used_bytes"] == 0, what="stats: used back to 0")

    # `kv limit M 50%`: the segment's limit halves (read raw), 2 requests fit where 5 did; the rest wait in the engine.
    limit = kvtree.kvctl("kv", "limit", "org/" + ALPHA, "50%")
    assert limit.returncode == 0, limit.stderr + limit.stdout
    assert read_segment(alpha)[0] == 200 * MiB
    results: list[int] = []
    pool = [threading.Thread(target=lambda: results.append(_stream(kvtree.router_url, "org/" + ALPHA, 50, 20))) for _ in range(4)]
    for t in pool:
        t.start()
    wait_for(
        lambda: (_engine_metric(ports[0], "vllm:num_requests_running"), _engine_metric(ports[0], "vllm:num_requests_waiting")) == (2, 2),
        what="2 running, 2 waiting for KV room",
    )
    assert kvtree.kvctl("kv", "limit", "org/" + ALPHA, "1G", "--instance", ALPHA).returncode == 0  # raising lets them through
    assert read_segment(alpha)[0] == GiB
    for t in pool:
        t.join(60)
    assert results == [20] * 4
    log = kvtree.kvctl("logs", "router", "-n", "200").stdout
    assert f"{ALPHA} org/{ALPHA}: kv limit 400 MiB -> 200 MiB (manual)" in log and "kv limit 200 MiB -> 1.0 GiB (manual)" in log
    assert {(e["instance"], e["cause"]) for e in _kv_events(kvtree)} >= {
        (ALPHA, "kv limit 400 MiB -> 200 MiB (manual)"),
        (BETA, "kv limit 400 MiB -> 256 MiB (config: kv_limit_gb)"),
    }

    # A limit set by another writer (as kvcached's own tool does) is what kvctl shows.
    write_segment(alpha, 300 * MiB)
    listed = {row["segment"]: row for row in _json(kvtree, "kv", "list")["segments"]}
    assert listed[alpha]["instance"] == ALPHA and listed[alpha]["kv"]["limit_bytes"] == 300 * MiB
    assert {i["name"]: i["kv"]["limit_bytes"] for i in _json(kvtree, "status")["instances"]} == {ALPHA: 300 * MiB, BETA: 256 * MiB}
    models = httpx.get(kvtree.router_url + "/models", timeout=5).json()["models"]
    assert models["org/" + ALPHA]["instances"][0]["kv"] == {"used_bytes": 0, "limit_bytes": 300 * MiB, "prealloc_bytes": 0}
    wide = kvtree.kvctl("status")  # COLUMNS=200
    assert "0.0/0.3G" in wide.stdout  # the KV column: used/limit GiB

    # kv_limit_gb again after a wake (another writer changed it meanwhile) and after a restart.
    assert kvtree.kvctl("sleep", "org/" + BETA).returncode == 0
    write_segment(beta, 300 * MiB)
    assert kvtree.kvctl("wake", "org/" + BETA).returncode == 0
    wait_for(lambda: read_segment(beta)[0] == 256 * MiB, what="kv_limit_gb applied after a wake")
    assert kvtree.kvctl("restart", BETA).returncode == 0
    wait_for(lambda: read_segment(beta)[0] == 256 * MiB, what="kv_limit_gb applied after a restart")

    # Bad requests: one-line errors, never a traceback.
    bad = kvtree.kvctl("kv", "limit", "org/" + ALPHA, "lots")
    assert bad.returncode != 0 and "is not a size" in bad.stderr and "Traceback" not in bad.stderr
    missing = kvtree.kvctl("kv", "limit", "org/" + ALPHA, "1G", "--instance", BETA)
    assert missing.returncode != 0 and f"has no instance '{BETA}'" in missing.stderr
    assert httpx.post(kvtree.router_url + f"/models/org/{ALPHA}/kv_limit", json={"bytes": -1}, timeout=5).status_code == 400

    # An engine that dies leaves its segment; `kvctl down` removes it (a clean stop removes its own).
    supervisord = int((kvtree.run_dir / "supervisord.pid").read_text())
    engine = engine_pid(kvtree.pids()[ALPHA])
    os.kill(supervisord, 9)
    os.kill(engine, 9)
    wait_for(lambda: not Path(f"/proc/{engine}").exists() or Path(f"/proc/{engine}/stat").read_text().split(")")[1].split()[0] == "Z", what="engine dead")
    assert Path(f"/dev/shm/{alpha}").exists()
    down = kvtree.kvctl("down", "--timeout", "5")
    assert down.returncode == 0, down.stderr
    assert not Path(f"/dev/shm/{alpha}").exists() and not Path(f"/dev/shm/{beta}").exists()


def test_budget_counts_measured_kv(kvtree: Tree) -> None:
    """Declared weights fit (3 x 2 GB in 7 GB), measured KV does not: waking c must sleep b."""
    ports = [free_port() for _ in range(3)]
    sims = "".join(
        _kv_sim(n, p, 10, 4 * MiB, extra="    memory_gb: 2\n" + ("    sleep: {start: asleep}\n" if n == C else ""))
        for n, p in zip((A, B, C), ports, strict=True)
    )
    kvtree.write(sims, KV_ENV + "sleep_manager:\n  memory_budget_gb: 7\n")
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    wait_for(lambda: {i["name"]: i["state"] for i in _json(kvtree, "status")["instances"]} == {A: "awake", B: "awake", C: "asleep"}, what="c asleep")
    stream = threading.Thread(target=_stream, args=(kvtree.router_url, "org/" + A, 400, 100))  # 400 x 4 MiB = 1.6 GiB of KV held for 10 s
    stream.start()
    wait_for(lambda: read_segment("kvctl_" + A)[1] >= 1600 * MiB, what="a holds 1.6 GiB of KV")
    wake = kvtree.kvctl("wake", "org/" + C)
    assert wake.returncode == 0, wake.stderr + wake.stdout
    instances = {i["name"]: i for i in _json(kvtree, "status")["instances"]}
    assert (instances[A]["state"], instances[C]["state"]) == ("awake", "awake")
    models = httpx.get(kvtree.router_url + "/models", timeout=5).json()["models"]
    assert models["org/" + B]["instances"][0]["state"] in ("draining", "asleep") and models["org/" + B]["instances"][0]["cause"] in (None, "budget")
    wait_for(
        lambda: httpx.get(kvtree.router_url + "/models", timeout=5).json()["models"]["org/" + B]["instances"][0]["cause"] == "budget",
        what="b slept for the budget",
    )
    stream.join(60)


def test_rebalance_moves_limit_to_the_busy_instance_and_holds(kvtree: Tree) -> None:
    """kv_budget_gb 1, kv_min_gb 0.25: idle -> 256 MiB, busy -> 768 MiB; then nothing moves.
    Checks every 0.5 s, observed for 15 s (30 checks) once converged -- the behaviour's own
    period, not a minute, to keep the suite short."""
    ports = [free_port(), free_port()]
    kvtree.write(
        _kv_sim(BUSY, ports[0], 1000 / 1024, MiB) + _kv_sim(IDLE, ports[1], 1000 / 1024, MiB),
        KV_ENV + "sleep_manager:\n  check_interval_seconds: 0.5\n  kv_rebalance: true\n  kv_budget_gb: 1\n  kv_min_gb: 0.25\n",
    )
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _stream(kvtree.router_url, "org/" + BUSY, 50, 20)  # 70 MiB each; 8 of them do not fit in 400 MiB

    workers = [threading.Thread(target=load) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: (read_segment("kvctl_" + BUSY)[0], read_segment("kvctl_" + IDLE)[0]) == (768 * MiB, 256 * MiB), timeout=60, what="limits rebalanced")
        moves = len(_kv_events(kvtree))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # observing a period: every poll must see the same limits
            assert (read_segment("kvctl_" + BUSY)[0], read_segment("kvctl_" + IDLE)[0]) == (768 * MiB, 256 * MiB)
            stop.wait(0.5)
        assert len(_kv_events(kvtree)) == moves
        assert _engine_metric(ports[0], "vllm:num_requests_running") > 0  # the load was there all along
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    causes = {(e["instance"], e["cause"].split("(")[-1]) for e in _kv_events(kvtree)}
    assert (BUSY, "rebalance: busy)") in causes and (IDLE, "rebalance: idle)") in causes


def test_colliding_ipc_names_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("instances:\n" + sim_yaml("a.b", 9001) + sim_yaml("a-b", 9002))
    check = kvctl("config", "check", "-c", str(path))
    assert check.returncode == 2 and "its kvcached IPC name 'kvctl_a-b' is also that of instance 'a.b'" in check.stderr


def test_rebalance_plan() -> None:
    from kvctl.router.kv_rebalance import Member, plan

    budget, minimum = GiB, 256 * MiB
    # One busy (requests wait), one idle: idle to the minimum (or what it still holds), busy gets the rest.
    moves = plan([Member("b", 400 * MiB, 380 * MiB, 3, False), Member("i", 400 * MiB, 0, 0, True)], budget, minimum)
    assert moves == {"b": (768 * MiB, "rebalance: busy"), "i": (256 * MiB, "rebalance: idle")}
    assert plan([Member("b", 400 * MiB, 100 * MiB, 0, False), Member("i", 400 * MiB, 300 * MiB + 1, 0, True)], budget, minimum)["i"][0] == 302 * MiB
    # The fixed point plans nothing: busy stays busy until idle, so it keeps its share.
    assert plan([Member("b", 768 * MiB, 400 * MiB, 0, False, was_busy=True), Member("i", 256 * MiB, 0, 0, True)], budget, minimum) == {}
    # Neither busy nor idle keeps its limit; moves smaller than the step are not made.
    assert plan([Member("a", 500 * MiB, 10 * MiB, 0, False), Member("c", 490 * MiB, 0, 0, False)], budget, minimum) == {}
    assert plan([Member("b", 760 * MiB, 700 * MiB, 1, False), Member("i", 256 * MiB, 0, 0, True)], budget, minimum) == {}
    # Over the budget (one woke with a large limit): the in-between give way so a busy one keeps the minimum.
    moves = plan([Member("w", 2 * GiB, 0, 0, False), Member("b", 256 * MiB, 250 * MiB, 2, False)], budget, minimum)
    assert moves["w"] == (768 * MiB, "rebalance: over kv_budget_gb") and "b" not in moves
    # Two busy ones share equally; never below the minimum.
    moves = plan([Member("x", 100 * MiB, 99 * MiB, 1, False), Member("y", 100 * MiB, 99 * MiB, 1, False)], budget, minimum)
    assert moves == {"x": (512 * MiB, "rebalance: busy"), "y": (512 * MiB, "rebalance: busy")}
