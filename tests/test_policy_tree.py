"""Per-model lifecycle policy end to end (SPEC §15): real CLI, supervisord, router and sims."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from helpers import Tree, alive, free_port, sim_yaml, wait_for

pytestmark = pytest.mark.timeout(240)

FAST_HEALTH = "  health_check_interval_seconds: 0.2\n"


def _complete(tree: Tree, model: str, prompt: str = "the same prompt") -> str:
    client = openai.OpenAI(base_url=tree.router_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def _sim(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/sim/state", timeout=5).json()


def _states(tree: Tree) -> dict[str, str]:
    return {i["name"]: i["state"] for i in httpx.get(tree.router_url + "/health/all", timeout=5).json()["instances"]}


def test_each_instance_sleeps_after_its_own_idle_seconds(kvtree: Tree) -> None:
    ports = [free_port(), free_port()]
    kvtree.write(
        sim_yaml("quick", ports[0], extra="    sleep: {idle_seconds: 2}\n") + sim_yaml("patient", ports[1], extra="    sleep: {idle_seconds: 30}\n"),
        extra=FAST_HEALTH,
    )
    assert kvtree.kvctl("up").returncode == 0
    models = httpx.get(kvtree.router_url + "/models").json()["models"]
    assert models["org/quick"]["instances"][0]["policy"]["idle_seconds"] == 2
    wait_for(lambda: _sim(ports[0])["sleeping"], timeout=10, what="the 2 s instance to sleep")
    assert _states(kvtree) == {"quick": "asleep", "patient": "awake"}
    assert not _sim(ports[1])["sleeping"]
    status = httpx.get(kvtree.router_url + "/sleep/status").json()["sleeping_models"]
    assert status["org/quick"]["cause"] == "idle"


def test_start_asleep_loads_once_then_sleeps_and_a_request_wakes_it(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(sim_yaml("parked", port, extra="    sleep: {start: asleep}\n"), extra=FAST_HEALTH)
    assert kvtree.kvctl("up").returncode == 0
    assert _states(kvtree) == {"parked": "asleep"}  # `up` returned once it was parked
    pid = kvtree.pids()["parked"]
    state = _sim(port)
    assert state["sleeping"] and state["sleep_calls"] == 1 and state["wake_calls"] == 0
    assert httpx.get(kvtree.router_url + "/sleep/status").json()["sleeping_models"]["org/parked"]["cause"] == "policy"
    assert _complete(kvtree, "org/parked")
    assert _sim(port)["wake_calls"] == 1 and kvtree.pids()["parked"] == pid  # one load: woken, not restarted


def test_start_stopped_starts_on_request_and_stops_again_after_idling(kvtree: Tree) -> None:
    port = free_port()
    kvtree.write(
        sim_yaml("cold", port, extra="    sleep: {start: stopped, idle_seconds: 1, stop_after_seconds: 3}\n    sim: {load_seconds: 0.5}\n"),
        extra=FAST_HEALTH,
    )
    result = kvtree.kvctl("up")
    assert result.returncode == 0, result.stderr
    status = kvtree.status()
    assert status["instances"][0]["state"] == "stopped" and status["instances"][0]["pid"] is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")
    assert _complete(kvtree, "org/cold")  # a cold start, queued like a wake
    pid = kvtree.pids()["cold"]
    # idle 1 s -> asleep, asleep 3 s -> stopped: the process is gone again.
    wait_for(lambda: not alive(pid), timeout=15, what="the idle engine to be stopped")
    assert kvtree.status()["instances"][0]["state"] == "stopped"
    events = httpx.get(kvtree.router_url + "/events?follow=false").text
    assert "policy: asleep 3s (stop_after_seconds)" in events
    # `up` again leaves it stopped; `kvctl wake` starts it; `kvctl sleep --stop` stops it by hand.
    again = kvtree.kvctl("up")
    assert again.returncode == 0 and kvtree.status()["instances"][0]["state"] == "stopped", again.stdout + again.stderr
    # (Its wake's own answer: with idle_seconds 1 it may be asleep again by the time a second CLI asks.)
    woke = kvtree.kvctl("wake", "org/cold")
    assert woke.returncode == 0 and "org/cold: awake" in woke.stdout, woke.stdout + woke.stderr
    stopped = kvtree.kvctl("sleep", "org/cold", "--stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert kvtree.status()["instances"][0]["pid"] is None


def test_priority_decides_who_sleeps_under_the_budget(kvtree: Tree) -> None:
    ports = [free_port() for _ in range(3)]
    kvtree.write(
        sim_yaml("low", ports[0], extra="    memory_gb: 10\n    sleep: {priority: 0}\n")
        + sim_yaml("high", ports[1], extra="    memory_gb: 10\n    sleep: {priority: 5}\n")
        + sim_yaml("new", ports[2], extra="    memory_gb: 10\n    sleep: {priority: 5, start: asleep}\n"),
        extra=FAST_HEALTH + "sleep_manager:\n  memory_budget_gb: 20\n  min_awake_seconds: 0\n",
    )
    assert kvtree.kvctl("up").returncode == 0
    assert _complete(kvtree, "org/high")
    assert _complete(kvtree, "org/low")  # used last: least recently used is `high`, but `low` has the lower priority
    assert _complete(kvtree, "org/new")
    assert _states(kvtree) == {"low": "asleep", "high": "awake", "new": "awake"}
    assert httpx.get(kvtree.router_url + "/sleep/status").json()["sleeping_models"]["org/low"]["cause"] == "budget"


@pytest.mark.parametrize("reload_helps", [True, False])
def test_verified_wake_never_serves_garbage(kvtree: Tree, reload_helps: bool) -> None:
    port = free_port()
    faults = "wake_corrupts_weights: true" + ("" if reload_helps else ", reload_no_effect: true")
    kvtree.write(sim_yaml("checked", port, extra=f"    sleep: {{level: 2, verify: true}}\n    sim: {{{faults}}}\n"), extra=FAST_HEALTH)
    assert kvtree.kvctl("up").returncode == 0
    expected = _complete(kvtree, "org/checked")
    assert "!" not in expected
    pid = kvtree.pids()["checked"]
    assert kvtree.kvctl("sleep", "org/checked").returncode == 0
    assert _complete(kvtree, "org/checked") == expected  # the request after the wake: never the garbage
    log = kvtree.kvctl("logs", "router", "-n", "200").stdout
    assert "verify: the answer after waking differs" in log, log
    metrics = httpx.get(kvtree.router_url + "/metrics").text
    if reload_helps:
        assert "verify: correct after reloading the weights" in log
        assert kvtree.pids()["checked"] == pid
        assert re.search(r'kvctl_verifications_total\{model="org/checked",result="reloaded"\} 1\.0', metrics), metrics
    else:
        assert "still wrong after reloading the weights; restarting the engine" in log
        assert kvtree.pids()["checked"] != pid
        assert re.search(r'kvctl_verifications_total\{model="org/checked",result="restarted"\} 1\.0', metrics), metrics


def test_alternating_models_under_a_budget_for_one_take_turns_instead_of_thrashing(kvtree: Tree) -> None:
    ports = [free_port(), free_port()]
    sim = "    memory_gb: 10\n    sim: {sleep_seconds: 0.1, wake_seconds: 0.2}\n"
    min_awake, max_wait, seconds, rate = 5, 15, 20, 10
    kvtree.write(
        sim_yaml("a", ports[0], extra=sim) + sim_yaml("b", ports[1], extra=sim),
        extra=FAST_HEALTH + f"sleep_manager:\n  memory_budget_gb: 10\n  min_awake_seconds: {min_awake}\n  max_swap_wait_seconds: {max_wait}\n",
    )
    assert kvtree.kvctl("up").returncode == 0

    async def drive() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=kvtree.router_url, timeout=120) as client:

            async def one(model: str) -> tuple[int, float]:
                started = time.monotonic()
                response = await client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 4})
                return response.status_code, time.monotonic() - started

            tasks = []
            for i in range(seconds * rate):
                tasks.append(asyncio.create_task(one("org/a" if i % 2 == 0 else "org/b")))
                await asyncio.sleep(1 / rate)  # the arrival schedule of the load, not synchronisation
            return await asyncio.gather(*tasks)

    results = asyncio.run(drive())
    assert [status for status, _ in results] == [200] * len(results)
    assert max(latency for _, latency in results) <= max_wait
    wakes = sum(_sim(port)["wake_calls"] for port in ports)
    assert wakes <= seconds / min_awake + 2, wakes
    print(json.dumps({"requests": len(results), "wakes": wakes, "worst_wait_s": round(max(latency for _, latency in results), 2)}))
