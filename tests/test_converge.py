"""`kvctl up` converges a running tree (SPEC §14) and the router says what it does (§11):
real CLI, real supervisord, real router, sim engines."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading

import httpx
import openai
import pytest

from helpers import KVCTL, LineStream, Tree, free_port, sim_yaml, wait_for

pytestmark = pytest.mark.timeout(240)

KEY = "sk-converge-test-key-1234"
ADMIN = "admin-converge-token-5678"


def _chat(tree: Tree, model: str, key: str = "unused", **kwargs: object) -> str:
    client = openai.OpenAI(base_url=tree.router_url + "/v1", api_key=key, max_retries=0, timeout=30)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=5, **kwargs)
    return chat.choices[0].message.content or ""


def _lifetime(tree: Tree, model: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    stats = httpx.get(tree.router_url + "/traffic/stats", headers=headers, timeout=5).json()["traffic_stats"]
    return stats[model]["lifetime_total_requests"]


class _Stream(threading.Thread):
    """A streamed chat completion that runs while the test changes the tree."""

    def __init__(self, tree: Tree, model: str, key: str = "unused") -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=tree.router_url + "/v1", api_key=key, max_retries=0, timeout=60)
        self.model = model
        self.started = threading.Event()
        self.chunks = 0
        self.finish: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "go"}], max_tokens=60, stream=True)
            for chunk in stream:
                self.chunks += 1
                self.started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()


def test_up_applies_every_router_level_change_in_place(kvtree: Tree) -> None:
    ports = {name: free_port() for name in "abc"}
    slow = "    sim: {tokens_per_second: 30}\n"
    a, b, c = (sim_yaml(name, ports[name], extra=slow) for name in "abc")
    kvtree.write(a + b)
    assert kvtree.kvctl("up").returncode == 0
    pids = kvtree.pids()
    router_pid = kvtree.status()["router"]["pid"]
    assert _chat(kvtree, "org/a") and _chat(kvtree, "org/b")
    served_a = _lifetime(kvtree, "org/a")

    # api_keys added, while a stream runs across the reload.
    stream = _Stream(kvtree, "org/a")
    stream.start()
    assert stream.started.wait(30)
    kvtree.write(a + b, extra=f"  api_keys: [{KEY}]\n")
    result = kvtree.kvctl("up")
    assert result.returncode == 0, result.stderr
    assert "router: api_keys changed" in result.stdout and KEY not in result.stdout + result.stderr
    with pytest.raises(openai.AuthenticationError):
        _chat(kvtree, "org/a")
    assert _chat(kvtree, "org/a", KEY)
    stream.join(60)
    assert stream.error is None and stream.finish == "length" and stream.chunks >= 60

    # An alias, a new idle threshold and a new sleep level, all at once.
    a_alias = a + "    aliases: [fast]\n"
    b_level2 = b + "    sleep: {level: 2}\n"
    extra = f"  api_keys: [{KEY}]\n"
    config_sm = "sleep_manager:\n  idle_threshold_seconds: 42\n"
    kvtree.config.write_text(f"router:\n  router_port: {kvtree.router_port}\n{extra}{config_sm}instances:\n{a_alias}{b_level2}")
    result = kvtree.kvctl("up")
    assert result.returncode == 0, result.stderr
    assert "sleep_manager: idle_threshold_seconds changed (300.0 -> 42.0)" in result.stdout
    assert "instance a: updated (aliases changed)" in result.stdout and "instance b: updated (sleep changed)" in result.stdout
    assert _chat(kvtree, "fast", KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(kvtree.router_url + "/sleep/status", headers=headers).json()["idle_threshold_seconds"] == 42
    assert kvtree.kvctl("sleep", "org/b").returncode == 0
    assert httpx.get(f"http://127.0.0.1:{ports['b']}/sim/state").json()["last_sleep_params"]["level"] == "2"

    # An instance added: routed as soon as `up` returns. Then the middle one removed: 404,
    # and neither the first nor the third engine restarts.
    kvtree.config.write_text(f"router:\n  router_port: {kvtree.router_port}\n{extra}{config_sm}instances:\n{a_alias}{b_level2}{c}")
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "instance c: added" in result.stdout, result.stderr
    assert _chat(kvtree, "org/c", KEY)
    kvtree.config.write_text(f"router:\n  router_port: {kvtree.router_port}\n{extra}{config_sm}instances:\n{a_alias}{c}")
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "instance b: removed" in result.stdout, result.stderr
    with pytest.raises(openai.NotFoundError):
        _chat(kvtree, "org/b", KEY)
    after = kvtree.pids()
    assert after["a"] == pids["a"] and "b" not in after
    assert kvtree.status()["router"]["pid"] == router_pid
    # Traffic of the unchanged model survived every reload (2 before, the stream, 1 with the key, 1 by alias).
    assert _lifetime(kvtree, "org/a", KEY) == served_a + 3
    c_pid = after["c"]

    # An invalid edit changes nothing: exit 2 with the location, the key still required, no PID changed.
    kvtree.config.write_text(f"router:\n  router_port: {kvtree.router_port}\n  api_keyz: []\ninstances:\n{a_alias}{c}")
    result = kvtree.kvctl("up")
    assert result.returncode == 2 and ":3:3: unknown key 'api_keyz'" in result.stderr
    with pytest.raises(openai.AuthenticationError):
        _chat(kvtree, "org/a")

    # Back to the running file: nothing changed, and it says so.
    kvtree.config.write_text(f"router:\n  router_port: {kvtree.router_port}\n{extra}{config_sm}instances:\n{a_alias}{c}")
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "nothing changed" in result.stdout, result.stdout
    assert kvtree.pids() == {"a": pids["a"], "c": c_pid}


def test_up_then_sleep_works_with_a_slow_loading_engine(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(sim_yaml("slow", port, extra="    sim: {load_seconds: 1.5}\n"))
    assert kvtree.kvctl("up").returncode == 0
    result = kvtree.kvctl("sleep", "org/slow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert httpx.get(f"http://127.0.0.1:{port}/sim/state").json()["sleeping"] is True


def test_up_no_wait_returns_once_the_router_answers(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("slow", free_port(), extra="    sim: {load_seconds: 2}\n"))
    result = kvtree.kvctl("up", "--no-wait")
    assert result.returncode == 0, result.stderr
    assert httpx.get(kvtree.router_url + "/health").status_code == 200


def test_router_log_and_events_tell_every_state_change_with_its_cause(kvtree: Tree) -> None:
    kvtree.write(
        sim_yaml("m", free_port()),
        extra=f"  api_keys: [{KEY}]\n  admin_token: {ADMIN}\n  health_check_interval_seconds: 0.2\n"
        "sleep_manager:\n  auto_sleep_enabled: true\n  idle_threshold_seconds: 3\n  check_interval_seconds: 0.2\n",
    )
    assert kvtree.kvctl("up").returncode == 0
    # A manual sleep, then a request wakes it, then it goes idle and sleeps by itself.
    assert kvtree.kvctl("sleep", "org/m").returncode == 0
    assert _chat(kvtree, "org/m", KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    wait_for(
        lambda: httpx.get(kvtree.router_url + "/sleep/status", headers=headers).json()["sleeping_models"].get("org/m", {}).get("cause") == "idle",
        what="an idle sleep",
    )
    with pytest.raises(openai.NotFoundError):
        _chat(kvtree, "nope", KEY)

    log = kvtree.kvctl("logs", "router", "-n", "500").stdout
    lines = log.splitlines()
    assert any("org/m: draining -> asleep (manual)" in line for line in lines), log
    assert any("org/m: waking -> awake (request)" in line for line in lines), log
    assert any("org/m: draining -> asleep (idle " in line for line in lines), log
    access = [line for line in lines if "kvctl.access" in line]
    assert any(" org/m 200 " in line for line in access) and any(" - 404 " in line or ("nope" not in line and " 404 " in line) for line in access), access
    assert KEY not in log and ADMIN not in log
    raw = (kvtree.run_dir / "logs" / "router.log").read_text()
    assert KEY not in raw and ADMIN not in raw

    # /events delivered the same changes, as JSON.
    with httpx.stream("GET", kvtree.router_url + "/events?follow=false", headers=headers, timeout=10) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    changes = [(e["from"], e["to"], e["cause"].split()[0]) for e in events if e["instance"] == "m"]
    assert ("draining", "asleep", "manual") in changes and ("waking", "awake", "request") in changes and ("draining", "asleep", "idle") in changes
    assert all(set(e) >= {"time", "instance", "model", "from", "to", "cause", "duration_seconds"} for e in events)
    assert httpx.get(kvtree.router_url + "/events?follow=false").status_code == 401


def test_up_restarts_only_what_needs_it(kvtree: Tree) -> None:
    ports = {name: free_port() for name in "ab"}
    a, b = (sim_yaml(name, ports[name]) for name in "ab")
    kvtree.write(a + b)
    assert kvtree.kvctl("up").returncode == 0
    pids, router_pid = kvtree.pids(), kvtree.status()["router"]["pid"]

    # An engine setting: that engine restarts, and is routed as soon as `up` returns.
    kvtree.write(sim_yaml("a", ports["a"], extra="    sim: {ttft_ms: 1}\n") + b)
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "instance a: restarted (sim changed)" in result.stdout, result.stdout + result.stderr
    after = kvtree.pids()
    assert after["a"] != pids["a"] and after["b"] == pids["b"]
    assert kvtree.status()["router"]["pid"] == router_pid
    assert _chat(kvtree, "org/a")

    # The router's port: only the router restarts, on the new port.
    old_url = kvtree.router_url
    kvtree.router_port = free_port()
    kvtree.write(sim_yaml("a", ports["a"], extra="    sim: {ttft_ms: 1}\n") + b)
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "router: restarted (its host or port changed)" in result.stdout, result.stdout + result.stderr
    assert kvtree.pids() == after
    assert _chat(kvtree, "org/b")
    with pytest.raises(httpx.ConnectError):
        httpx.get(old_url + "/health")


def test_json_logs_models_retrieve_and_a_burst_right_after_an_engine_restart(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(sim_yaml("m", port, extra="    aliases: [short]\n"), extra="  log_format: json\n")
    assert kvtree.kvctl("up").returncode == 0
    client = openai.OpenAI(base_url=kvtree.router_url + "/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("short")  # the openai client's models.retrieve
    assert (model.id, model.owned_by) == ("short", "kvctl") and model.root == "org/m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")

    # An engine setting changed: `up` restarts it, and every request right after `up` is served.
    kvtree.write(sim_yaml("m", port, extra="    aliases: [short]\n    sim: {ttft_ms: 2}\n"), extra="  log_format: json\n")
    result = kvtree.kvctl("up")
    assert result.returncode == 0 and "instance m: restarted" in result.stdout, result.stdout + result.stderr

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=kvtree.router_url, timeout=30) as http:
            answers = await asyncio.gather(*(http.post("/v1/completions", json={"model": "short", "prompt": "x", "max_tokens": 2}) for _ in range(200)))
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 200

    # log_format: json -> one JSON object per line, the state changes with their fields.
    records = [json.loads(line) for line in (kvtree.run_dir / "logs" / "router.log").read_text().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    changes = [r for r in records if r.get("instance") == "m" and "to" in r]
    assert any(r["to"] == "starting" and r["cause"] == "reload: engine settings changed" for r in changes), changes
    assert any(r["logger"] == "kvctl.access" and r["status"] == 200 and r["model"] == "org/m" for r in records)


def test_ctrl_c_during_up_says_what_keeps_running(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("slow", free_port(), extra="    sim: {load_seconds: 30}\n").replace("startup_timeout_seconds: 30", "startup_timeout_seconds: 60"))
    proc = subprocess.Popen([*KVCTL, "up", "-c", str(kvtree.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(
            lambda: (kvtree.run_dir / "supervisord.pid").exists() and httpx.get(kvtree.router_url + "/health", timeout=1).status_code == 200,
            what="up to have started the tree",
        )
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "what was started keeps running" in stderr and f"kvctl down -c {kvtree.config}" in stderr
    assert kvtree.status()["router"]["healthy"] is True  # it did keep running


def test_down_timeout_ends_a_long_stream_with_the_error_event(kvtree: Tree) -> None:
    kvtree.write(sim_yaml("m", free_port(), extra="    sim: {tokens_per_second: 5}\n"))
    assert kvtree.kvctl("up").returncode == 0
    reader = LineStream(kvtree.router_url, "org/m", 500)
    reader.start()
    assert reader.started.wait(30)
    down = kvtree.kvctl("down", "--timeout", "1")
    assert down.returncode == 0, down.stderr
    reader.join(30)
    assert not reader.is_alive()
    last = json.loads(reader.lines[-1][len("data: ") :])
    assert last["error"]["code"] == "router_shutdown", reader.lines[-3:]
    assert "data: [DONE]" not in reader.lines
