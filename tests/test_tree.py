"""The process tree end to end: the real CLI, real supervisord, real sim engines and router."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import httpx
import openai

from helpers import LineStream, Tree, alive, engine_pid, free_port, sim_yaml, tree_pids, wait_for, wait_http_ok


def test_up_serves_supervisorctl_works_and_down_leaves_nothing(kvtree: Tree) -> None:
    ports = [free_port(), free_port()]
    kvtree.write(sim_yaml("alpha", ports[0], model="meta-llama/Llama-3.2-1B") + sim_yaml("beta", ports[1], extra="    sim: {dialect: sglang}\n"))
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout

    # Plain supervisorctl on the rendered file.
    listing = kvtree.supervisorctl("status")
    lines = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines() if line.strip()}
    assert lines == {"alpha": "RUNNING", "beta": "RUNNING", "router": "RUNNING"}, listing.stdout
    assert kvtree.supervisorctl("tail", "alpha").returncode == 0

    # The router answers and a chat completion through it returns text.
    assert httpx.get(kvtree.router_url + "/health").status_code == 200
    client = openai.OpenAI(base_url=kvtree.router_url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="meta-llama/Llama-3.2-1B", messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
    assert chat.choices[0].message.content

    status = kvtree.kvctl("status", "--json")
    assert status.returncode == 0, status.stdout
    assert [i["process_state"] for i in json.loads(status.stdout)["instances"]] == ["RUNNING", "RUNNING"]

    # Security: private run dir, socket and rendered config.
    assert stat.S_IMODE(kvtree.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((kvtree.run_dir / "supervisor.sock").stat().st_mode) == 0o700
    assert stat.S_IMODE((kvtree.run_dir / "supervisord.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE((kvtree.run_dir / "env" / "alpha.json").stat().st_mode) == 0o600

    supervisord_pid = int((kvtree.run_dir / "supervisord.pid").read_text())
    everything = tree_pids(supervisord_pid)
    assert len(everything) >= 4  # supervisord, router, two engines

    down = kvtree.kvctl("down")
    assert down.returncode == 0, down.stderr
    survivors = [pid for pid in everything if alive(pid)]
    assert survivors == [], f"processes of the tree survived `kvctl down`: {survivors}"
    assert kvtree.kvctl("status").returncode == 3
    again = kvtree.kvctl("down")
    assert again.returncode == 0 and "not running" in again.stdout


def test_up_is_idempotent_and_a_changed_instance_alone_restarts(kvtree: Tree) -> None:
    ports = [free_port(), free_port()]
    kvtree.write(sim_yaml("alpha", ports[0]) + sim_yaml("beta", ports[1]))
    assert kvtree.kvctl("up").returncode == 0
    before = kvtree.pids()
    router_before = kvtree.status()["router"]["pid"]

    second = kvtree.kvctl("up")
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout
    assert kvtree.pids() == before
    assert kvtree.status()["router"]["pid"] == router_before

    kvtree.write(sim_yaml("alpha", ports[0]) + sim_yaml("beta", ports[1], extra="    engine_args: ['--ttft-ms', '3']\n"))
    third = kvtree.kvctl("up")
    assert third.returncode == 0, third.stderr
    after = kvtree.pids()
    assert after["alpha"] == before["alpha"]
    assert after["beta"] != before["beta"]
    assert kvtree.status()["router"]["pid"] == router_before


def test_engine_failing_at_start_fails_up_with_its_log_tail(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("good", free_port()) + sim_yaml("broken", free_port(), extra="    engine_args: ['--ttft-ms', 'not-a-number']\n"))
    result = kvtree.kvctl("up")
    assert result.returncode == 1
    assert "broken" in result.stderr
    assert "not-a-number" in result.stderr  # the engine's own complaint, from its log


def test_supervisord_restarts_an_engine_killed_with_sigkill(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(sim_yaml("alpha", port))
    assert kvtree.kvctl("up").returncode == 0
    old = kvtree.pids()["alpha"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: kvtree.pids().get("alpha") not in (None, old), timeout=30, what="a new alpha pid")
    wait_http_ok(f"http://127.0.0.1:{port}/health")  # alpha healthy again


def test_env_values_and_args_reach_the_engine_byte_for_byte(kvtree: Tree) -> None:
    tricky = """50% off, "double" and 'single' quotes,comma; semi # hash \\ back"""
    kvtree.write(
        sim_yaml(
            "alpha",
            free_port(),
            extra="    engine_env:\n      TRICKY: "
            + json.dumps(tricky)
            + '\n      NEWLINE: "a\\nb"\n'
            + '    engine_args: [\'--served-model-name "100% real, \\"quoted\\""\']\n',
        ),
        extra="kvcached:\n  kvcached_gpu_utilization: 0.5\n",
    )
    assert kvtree.kvctl("up").returncode == 0
    pid = engine_pid(kvtree.pids()["alpha"])
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    assert environ[b"TRICKY"] == tricky.encode()
    assert environ[b"NEWLINE"] == b"a\nb"
    assert environ[b"KVCACHED_GPU_UTILIZATION"] == b"0.5"
    assert environ[b"KVCACHED_IPC_NAME"] == b"kvctl_alpha"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b'100% real, "quoted"' in argv


def test_logs_prints_a_program_log_and_rejects_unknown_names(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("alpha", free_port()))
    assert kvtree.kvctl("up").returncode == 0
    wait_for(lambda: kvtree.kvctl("logs", "alpha").stdout.strip(), timeout=20, what="alpha's log")  # noqa: PLW0108 - runs `logs` each poll
    unknown = kvtree.kvctl("logs", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no program named 'nope'")


def test_status_reports_degraded_when_an_engine_is_down(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("alpha", free_port()))
    assert kvtree.kvctl("up").returncode == 0
    assert kvtree.supervisorctl("stop", "alpha").returncode == 0
    result = kvtree.kvctl("status")
    assert result.returncode == 1
    assert "alpha" in result.stdout and "STOPPED" in result.stdout


def test_down_under_load_lets_in_flight_streams_finish(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("slow", free_port(), extra="    sim: {tokens_per_second: 20}\n"))
    assert kvtree.kvctl("up").returncode == 0
    supervisord_pid = int((kvtree.run_dir / "supervisord.pid").read_text())
    everything = tree_pids(supervisord_pid)
    client = LineStream(kvtree.router_url, "org/slow", 40)
    client.start()
    assert client.started.wait(30)
    assert "data: [DONE]" not in client.lines  # `down` starts while the stream still runs (~2 s to go)
    down = kvtree.kvctl("down")
    client.join(60)
    assert down.returncode == 0, down.stderr
    assert client.lines[-1] == "data: [DONE]"
    assert len([c for c in client.lines if '"text"' in c]) == 40
    assert [pid for pid in everything if alive(pid)] == []
