"""SPEC §16 end to end: engine trees are reaped, crash loops end, `kvctl restart` tries again.

Real CLI, real supervisord, sim engines that spawn workers like vLLM; what survives is
checked through /proc, never through kvctl.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from kvctl import procstate
from kvctl.launch import LaunchSpec

from helpers import Procs, Tree, alive, engine_pid, free_port, sim_yaml, tree_pids, wait_for


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[bytes, bytes]:
    data = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)


def _live_with(marker: bytes) -> set[int]:
    """Every live process whose command line holds `marker`."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(int(p)) and alive(int(p))}


def _workers(engine: int) -> list[int]:
    return [p for p in tree_pids(engine) if p != engine]


def _supervisord_pid(tree: Tree) -> int:
    return int((tree.run_dir / "supervisord.pid").read_text())


def _soft_nofile(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if line.startswith("Max open files"))
    return int(line.split()[3])


def test_kill_9_of_an_engine_reaps_its_workers_and_down_leaves_nothing(kvtree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    model = f"org/reap-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("KVTEST_ROUTER_KEY", "sk-not-for-engines")
    kvtree.write(
        sim_yaml("alpha", free_port(), model=model, extra="    sim: {spawn_children: 2}\n"),
        extra='  api_keys: ["${KVTEST_ROUTER_KEY}"]\n',
    )
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    launcher = kvtree.pids()["alpha"]
    engine = engine_pid(launcher)
    workers = _workers(engine)
    assert len(workers) == 2 and all(b"kvctl.sim-child" in _cmdline(p) for p in workers)

    # The engine's environment: marked, without the router's secret; the fd limit raised.
    environ = _environ(engine)
    assert b"KVTEST_ROUTER_KEY" not in environ
    assert environ[b"KVCTL_INSTANCE"].startswith(b"alpha@")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected_fds = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert f"minfds={expected_fds}" in (kvtree.run_dir / "supervisord.conf").read_text()
    assert _soft_nofile(_supervisord_pid(kvtree)) >= expected_fds  # raised, never lowered
    assert _soft_nofile(engine) >= expected_fds

    os.kill(engine, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in workers), timeout=20, what="the killed engine's workers to be ended")
    wait_for(lambda: kvtree.pids().get("alpha") not in (None, launcher), timeout=30, what="a new launcher")
    new_launcher = kvtree.pids()["alpha"]
    wait_for(lambda: len(_workers(engine_pid(new_launcher))) == 2, timeout=30, what="the restarted engine and its workers")
    # The restarted engine is alone: every process serving the model is in the new launcher's tree.
    assert _live_with(model.encode()) == set(tree_pids(new_launcher))

    seen = {launcher, engine, *workers, *tree_pids(new_launcher), *tree_pids(_supervisord_pid(kvtree))}
    os.kill(engine_pid(new_launcher), signal.SIGKILL)  # `down` right after a second kill
    down = kvtree.kvctl("down")
    assert down.returncode == 0, down.stderr
    assert [p for p in seen if alive(p)] == []
    assert _live_with(model.encode()) == set()


def test_leftovers_of_a_killed_launcher_or_supervisord_are_ended(kvtree: Tree) -> None:
    model = f"org/left-{uuid.uuid4().hex[:8]}"
    port = free_port()
    kvtree.write(sim_yaml("alpha", port, model=model, extra="    sim: {spawn_children: 2}\n"))
    assert kvtree.kvctl("up").returncode == 0
    launcher = kvtree.pids()["alpha"]
    old_tree = tree_pids(launcher)

    # A launcher killed outright cannot end its engine: the next one ends what it left.
    os.kill(launcher, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in old_tree), timeout=30, what="the orphaned engine tree to be ended")
    wait_for(lambda: (p := kvtree.pids().get("alpha")) not in (None, launcher) and len(tree_pids(p)) == 4, timeout=30, what="a new engine tree")
    assert _live_with(model.encode()) == set(tree_pids(kvtree.pids()["alpha"]))

    # supervisord itself killed: `down` finds the router, launcher, engine and workers by their marker.
    supervisord = _supervisord_pid(kvtree)
    everything = tree_pids(supervisord)
    assert len(everything) >= 6  # supervisord, router, launcher, engine, 2 workers
    os.kill(supervisord, signal.SIGKILL)
    down = kvtree.kvctl("down")
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert [p for p in everything if alive(p)] == []


def test_a_crash_loop_ends_failed_and_restart_tries_again(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(
        sim_yaml("flaky", port, extra="    startretries: 2\n")
        + sim_yaml("slow", free_port(), extra="    startretries: 1\n    sim: {load_seconds: 60}\n").replace(
            "startup_timeout_seconds: 30", "startup_timeout_seconds: 1"
        )
    )
    blocker = socket.socket()  # holds the port: every start of `flaky` fails to bind and exits
    blocker.bind(("127.0.0.1", port))
    try:
        up = kvtree.kvctl("up", "--no-wait")
        assert up.returncode == 0, up.stderr + up.stdout
        flaky = wait_for(lambda: (r := procstate.read(kvtree.run_dir, "flaky")) is not None and r.failed and r, timeout=60, what="flaky to give up")
        assert flaky.failures == 2
        assert re.match(r"exit status [1-9]\d*: ", flaky.reason) and "\n" not in flaky.reason
        assert "address already in use" in flaky.reason.lower()
        status = kvtree.supervisorctl("status", "flaky").stdout
        assert "FATAL" in status, status
        log = (kvtree.run_dir / "logs" / "flaky.log").read_text()
        assert len(re.findall(r"start failed \(\d of 2\)", log)) == 2
        # The router knows why: the instance is `failed` and requests get a 503 naming the failure.
        wait_for(lambda: _router_state(kvtree, "flaky") == "failed", what="the router to mark flaky failed")
        answer = httpx.post(kvtree.router_url + "/v1/completions", json={"model": "org/flaky", "prompt": "x"}, timeout=10)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_failed"
        assert "address already in use" in answer.json()["error"]["message"].lower() and int(answer.headers["retry-after"]) > 0

        slow = wait_for(lambda: (r := procstate.read(kvtree.run_dir, "slow")) is not None and r.failed and r, timeout=60, what="slow to give up")
        assert slow.failures == 1 and slow.reason.startswith("not healthy within 1s")

        still_broken = kvtree.kvctl("restart", "flaky")
        assert still_broken.returncode == 1
        assert "flaky failed to start: exit status" in still_broken.stderr
        log = (kvtree.run_dir / "logs" / "flaky.log").read_text()
        assert len(re.findall(r"start failed \(\d of 2\)", log)) == 4  # it tried again, twice
    finally:
        blocker.close()

    restarted = kvtree.kvctl("restart", "flaky")
    assert restarted.returncode == 0, restarted.stderr
    assert "flaky restarted and healthy" in restarted.stdout
    assert procstate.read(kvtree.run_dir, "flaky") is None
    assert "RUNNING" in kvtree.supervisorctl("status", "flaky").stdout
    unknown = kvtree.kvctl("restart", "nope")
    assert unknown.returncode == 2 and "no program named 'nope'" in unknown.stderr


_ENGINE = """
import os, signal, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import signal\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nprint(flush=True)\\nwhile True: signal.pause()"], stdout=subprocess.PIPE)
worker.stdout.readline()  # it ignores SIGTERM from now on
signal.signal(signal.SIGHUP, lambda *_: print("engine got SIGHUP", flush=True))
print(os.getpid(), worker.pid, flush=True)
while True:
    signal.pause()
"""


def test_launcher_forwards_signals_and_kills_a_worker_that_ignores_sigterm(procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = LaunchSpec(
        run_dir=str(tmp_path),
        name="e",
        env={"GIVEN": "yes"},
        unset=("KVTEST_SECRET",),
        health_url=f"http://127.0.0.1:{free_port()}/health",
        startup_timeout_seconds=600,
        startretries=3,
        log=str(tmp_path / "e.log"),
    )
    (tmp_path / "e.json").write_text(spec.to_json())
    monkeypatch.setenv("KVTEST_SECRET", "router-only")
    launcher = procs.start(
        [sys.executable, "-m", "kvctl.launch", str(tmp_path / "e.json"), "--", sys.executable, "-c", _ENGINE], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    engine, worker = map(int, launcher.stdout.readline().split())
    try:
        environ = _environ(engine)
        assert environ[b"GIVEN"] == b"yes" and b"KVTEST_SECRET" not in environ
        assert environ[b"KVCTL_INSTANCE"].startswith(b"e@")
        launcher.send_signal(signal.SIGHUP)
        assert launcher.stdout.readline() == "engine got SIGHUP\n"
        assert alive(engine)
        launcher.send_signal(signal.SIGTERM)  # the engine dies of it; its worker ignores it
        assert launcher.wait(30) == 128 + signal.SIGTERM
        assert not alive(engine) and not alive(worker)
        assert procstate.read(tmp_path, "e") is None  # a stop is no failed start
    finally:
        for pid in (engine, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _router_state(tree: Tree, name: str) -> str | None:
    instances = httpx.get(tree.router_url + "/health/all", timeout=5).json()["instances"]
    return next((i["state"] for i in instances if i["name"] == name), None)
