"""The `kvctl` command line as a user runs it: the real CLI as a subprocess, against real trees
(supervisord, router, sim engines) where the command talks to one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from pathlib import Path

import httpx

from helpers import KVCTL, Procs, Tree, cli_env, free_port, kvctl, sim_yaml, wait_for

ADMIN = "cli-admin-token"
KEY = "cli-api-key"
# Every read and action needs a key: the CLI must send the admin token it finds in the config.
AUTH = f"  api_keys: [{KEY}]\n  admin_token: {ADMIN}\n"
EVENT_KEYS = {"time", "instance", "model", "from", "to", "cause", "duration_seconds"}


# --------------------------------------------------------------------------- config warnings


def test_engine_flag_warnings_only_from_config_check(tmp_path: Path) -> None:
    config = tmp_path / "kvctl.yaml"
    # SGLang with sleep enabled but without --enable-memory-saver: a warning at the instance.
    config.write_text(
        f"router:\n  router_port: {free_port()}\nrun_dir: {tmp_path / 'run'}\n"
        f"instances:\n  - name: s\n    model: org/s\n    engine: sglang\n    port: {free_port()}\n"
    )
    check = kvctl("config", "check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert f"{config}:5:5: warning:" in check.stderr and "--enable-memory-saver" in check.stderr
    for command in (["status"], ["status", "--json"], ["stats"], ["events"], ["wake", "org/s"], ["sleep", "--all"], ["logs", "s"]):
        result = kvctl(*command, "-c", str(config))
        assert result.returncode != 0  # nothing runs: each fails in its own way...
        assert "enable-memory-saver" not in result.stderr, (command, result.stderr)  # ...but none repeats the warning


# --------------------------------------------------------------------------- version, help, completion


def test_version_help_and_shell_completion() -> None:
    from importlib.metadata import version

    result = kvctl("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kvctl {version('kvctl')}"
    assistance = kvctl("--help", columns=80)
    assert assistance.returncode == 0, assistance.stderr
    for option in ("--version", "--install-completion", "--show-completion", "--debug"):
        assert option in assistance.stdout
    for command in ("up", "down", "status", "events", "sleep", "wake", "stats", "bench", "logs", "config"):
        assert f"│ {command} " in assistance.stdout, command
    # What the installed completion script runs on <TAB>: kvctl answers with the candidates.
    env = {"_KVCTL_COMPLETE": "complete_bash", "COMP_WORDS": "kvctl st", "COMP_CWORD": "1"}
    completed = kvctl(env=env, timeout=30)
    assert completed.returncode == 0 and completed.stdout.split() == ["status", "stats"]
    env.update(COMP_WORDS="kvctl stats --wi", COMP_CWORD="2")
    assert kvctl(env=env, timeout=30).stdout.split() == ["--window"]
    script = kvctl("--show-completion", "bash")
    assert script.returncode == 0 and "_KVCTL_COMPLETE=complete_bash" in script.stdout


# --------------------------------------------------------------------------- events


class Lines:
    """A subprocess's stdout lines, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]


def test_events_prints_history_and_follows_until_ctrl_c(kvtree: Tree, procs: Procs) -> None:
    kvtree.write(sim_yaml("a", free_port()) + sim_yaml("b", free_port()), extra=AUTH)
    assert kvtree.kvctl("up").returncode == 0
    slept = kvtree.kvctl("sleep", "org/a")
    assert slept.returncode == 0, slept.stdout + slept.stderr

    text = kvtree.kvctl("events")
    assert text.returncode == 0, text.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.search(rf"^{stamp} a org/a: awake -> draining \(manual\)$", text.stdout, re.M), text.stdout
    assert re.search(rf"^{stamp} a org/a: draining -> asleep \(manual\) \[\d+\.\ds\]$", text.stdout, re.M), text.stdout
    assert re.search(rf"^{stamp} b org/b: \w+ -> awake \(", text.stdout, re.M), text.stdout  # b's start-up

    as_json = kvtree.kvctl("events", "--json")
    assert as_json.returncode == 0, as_json.stderr
    history = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert all(set(e) == EVENT_KEYS for e in history)
    last_a = [e for e in history if e["instance"] == "a"][-1]
    assert (last_a["model"], last_a["from"], last_a["to"], last_a["cause"]) == ("org/a", "draining", "asleep", "manual")
    assert isinstance(last_a["duration_seconds"], float)

    # -f: the history, then live changes, until Ctrl-C (exit 0).
    follower = procs.start(
        [*KVCTL, "events", "-f", "--json", "-c", str(kvtree.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )
    lines = Lines(follower)
    wait_for(lambda: len(lines.lines) >= len(history), timeout=20, what="the replayed history")
    assert lines.events()[: len(history)] == history
    woke = kvtree.kvctl("wake", "org/a")
    assert woke.returncode == 0, woke.stdout + woke.stderr
    wait_for(lambda: any((e["instance"], e["from"], e["to"]) == ("a", "waking", "awake") for e in lines.events()), timeout=20, what="a's wake, live")
    assert follower.poll() is None  # still following
    follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=20) == 0
    assert follower.stderr is not None and follower.stderr.read() == ""


def test_events_errors(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("a", free_port()), extra=AUTH)
    down = kvtree.kvctl("events", "-f")
    assert down.returncode == 1 and down.stderr.startswith("error: router at") and "Traceback" not in down.stderr
    assert kvtree.kvctl("up").returncode == 0
    kvtree.write(sim_yaml("a", free_port()), extra=f"  api_keys: [{KEY}]\n  admin_token: wrong\n")  # the CLI now sends a wrong token
    refused = kvtree.kvctl("events")
    assert refused.returncode == 1 and "401" in refused.stderr and ADMIN not in refused.stderr and "wrong" not in refused.stderr
    kvtree.write(sim_yaml("a", free_port()), extra=f"  api_keys: [{KEY}]\n")  # no admin token: the api key opens read routes
    with_key = kvtree.kvctl("events")
    assert with_key.returncode == 0 and "a org/a: starting -> awake" in with_key.stdout, with_key.stderr


# --------------------------------------------------------------------------- sleep and wake report the end state


def model_states(tree: Tree) -> dict[str, str]:
    """The router's own answer, to check what the CLI printed against."""
    models = httpx.get(tree.router_url + "/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()["models"]
    return {m: info["state"] for m, info in models.items()}


def test_wake_reports_end_states_and_who_made_room(kvtree: Tree) -> None:
    # The budget holds one of the two models at a time.
    gb = "    memory_gb: 6\n"
    kvtree.write(sim_yaml("a", free_port(), extra=gb) + sim_yaml("b", free_port(), extra=gb), extra=AUTH + "sleep_manager:\n  memory_budget_gb: 10\n")
    assert kvtree.kvctl("up").returncode == 0

    woke = kvtree.kvctl("wake", "org/a")
    assert woke.returncode == 0, woke.stdout + woke.stderr
    assert model_states(kvtree) == {"org/a": "awake", "org/b": "asleep"}
    assert "ok org/a: awake" in woke.stdout.splitlines()
    if "note" in woke.stdout:  # b was awake before: this wake slept it
        assert "note org/b: asleep (put to sleep to make room for org/a)" in woke.stdout.splitlines()

    # Waking b now sleeps a: the note says so.
    woke = kvtree.kvctl("wake", "org/b")
    assert woke.returncode == 0, woke.stdout + woke.stderr
    assert woke.stdout.splitlines() == ["ok org/b: awake", "note org/a: asleep (put to sleep to make room for org/b)"]

    # --all cannot keep both awake: a (woken first) ends asleep again, and the CLI says so.
    everything = kvtree.kvctl("wake", "--all")
    assert everything.returncode == 1, everything.stdout + everything.stderr
    assert model_states(kvtree) == {"org/a": "asleep", "org/b": "awake"}
    assert everything.stdout.splitlines() == ["failed org/a: asleep — put to sleep to make room for org/b", "ok org/b: awake"]

    slept = kvtree.kvctl("sleep", "--all")
    assert slept.returncode == 0, slept.stdout + slept.stderr
    assert slept.stdout.splitlines() == ["ok org/a: asleep", "ok org/b: asleep"]
    assert model_states(kvtree) == {"org/a": "asleep", "org/b": "asleep"}


def test_sleep_refused_reports_the_routers_reason(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("a", free_port(), extra="    sleep: {enabled: false}\n") + sim_yaml("b", free_port()), extra=AUTH)
    assert kvtree.kvctl("up").returncode == 0
    slept = kvtree.kvctl("sleep", "--all")
    assert slept.returncode == 1
    lines = slept.stdout.splitlines()
    assert lines[0].startswith("failed org/a: awake — ") and "sleep.enabled: false" in lines[0]
    assert lines[1:] == ["ok org/b: asleep"]


# --------------------------------------------------------------------------- status


def status_json(tree: Tree) -> dict:
    result = tree.kvctl("status", "--json")
    body = json.loads(result.stdout)
    assert body["exit_code"] == result.returncode
    return body


def by_name(body: dict) -> dict[str, dict]:
    return {i["name"]: i for i in body["instances"]}


def test_status_degraded_when_the_router_does_not_know_a_running_instance(kvtree: Tree) -> None:
    instances = sim_yaml("a", free_port()) + sim_yaml("b", free_port())
    kvtree.write(instances)
    assert kvtree.kvctl("up").returncode == 0
    assert status_json(kvtree)["exit_code"] == 0
    # The router reloads a file without b (as after an edit nobody applied), then the file gets b back:
    # b's engine runs and is healthy, but the router does not route to it.
    kvtree.write(instances.split("  - name: b")[0])
    assert kvtree.supervisorctl("signal", "HUP", "router").returncode == 0
    wait_for(
        lambda: [i["name"] for i in httpx.get(kvtree.router_url + "/health/all", timeout=5).json()["instances"]] == ["a"],
        timeout=30,
        what="the router to drop b",
    )
    kvtree.write(instances)
    body = status_json(kvtree)
    assert body["exit_code"] == 1
    b = by_name(body)["b"]
    assert (b["process_state"], b["health"], b["healthy"], b["state"]) == ("RUNNING", "ok", True, "unknown")
    text = kvtree.kvctl("status")
    assert text.returncode == 1 and "b: the router does not know this instance" in text.stdout


def test_status_shows_a_loading_engine_as_loading_not_failing(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("slow", free_port(), extra="    sim: {load_seconds: 25}\n"))  # startup timeout: 30 s
    up = kvtree.kvctl("up", "--no-wait")
    assert up.returncode == 0, up.stderr

    # supervisord calls a program RUNNING after its startsecs (1 s); the engine loads for 25 s.
    def running() -> dict | None:
        body = status_json(kvtree)
        return body if by_name(body)["slow"]["process_state"] == "RUNNING" else None

    body = wait_for(running, timeout=20, what="slow RUNNING")
    slow = by_name(body)["slow"]
    assert body["exit_code"] == 1  # not healthy yet: degraded, but...
    assert (slow["health"], slow["healthy"]) == ("loading", False)  # ...loading
    text = kvtree.kvctl("status")
    row = next(line for line in text.stdout.splitlines() if line.split()[:1] == ["slow"])
    assert "loading" in row and "failing" not in row
    assert kvtree.supervisorctl("stop", "slow").returncode == 0
    stopped = by_name(status_json(kvtree))["slow"]
    assert (stopped["process_state"], stopped["health"]) == ("STOPPED", "failing")


def test_status_shows_why_an_instance_failed_and_fits_80_columns(kvtree: Tree) -> None:
    kvtree.write(
        sim_yaml("good-instance", free_port(), model="meta-llama/Llama-3.2-1B")
        + sim_yaml("broken", free_port(), extra="    startretries: 0\n    engine_args: ['--ttft-ms', 'not-a-number']\n")
    )
    assert kvtree.kvctl("up").returncode == 1
    broken = wait_for(lambda: (b := by_name(status_json(kvtree))["broken"])["state"] == "failed" and b, timeout=30, what="broken to be failed")
    assert broken["health"] == "failing" and broken["failure"]
    text = kvctl("status", "-c", str(kvtree.config), columns=80)
    assert text.returncode == 1
    assert f"broken: failed: {broken['failure']}" in text.stdout
    # At 80 columns each row stays on one line, the model's whole name in it.
    lines = text.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:2] == ["name", "model"])
    assert {"process", "health", "state"} <= set(header)
    good = next(line.split() for line in lines if line.split()[:1] == ["good-instance"])
    assert good[1] == "meta-llama/Llama-3.2-1B" and good[-2:] == ["ok", "awake"] and len(good) == len(header)
    assert next(line.split() for line in lines if line.split()[:1] == ["broken"])[-2:] == ["failing", "failed"]
    assert all(len(line) <= 80 for line in lines if not line.startswith("broken: failed:"))


def test_status_a_stopped_on_purpose_instance_is_not_a_fault(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("cold", free_port(), extra="    sleep: {start: stopped}\n") + sim_yaml("warm", free_port()))
    assert kvtree.kvctl("up").returncode == 0
    body = status_json(kvtree)
    cold = by_name(body)["cold"]
    assert (cold["state"], cold["health"], cold["pid"]) == ("stopped", "stopped", None)
    assert body["exit_code"] == 0  # starts on demand: healthy as configured
    # Stopped by supervisord behind the router's back is a fault, though.
    assert kvtree.supervisorctl("stop", "warm").returncode == 0
    warm = by_name(body := status_json(kvtree))["warm"]
    assert warm["health"] == "failing" and body["exit_code"] == 1
