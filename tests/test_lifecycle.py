"""The lifecycle (SPEC §6) in process, against real sim engines in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvctl.paths import RunPaths
from kvctl.router.lifecycle import Lifecycle, Outcome, Unavailable
from kvctl.router.metrics import Metrics

from helpers import Procs, asim_state, sim_instance, start_engine, start_engines, until, write_config

pytestmark = pytest.mark.timeout(120)

Make = Callable[..., Any]


@pytest.fixture
async def make(procs: Procs, tmp_path: Path) -> AsyncIterator[Make]:
    """make(instances, sleep_manager=..., router=..., engines=True) -> started Lifecycle."""
    started: list[Lifecycle] = []

    async def _make(instances: list[dict[str, Any]], *, engines: bool = True, metrics: Metrics | None = None, **sections: Any) -> Lifecycle:
        config = write_config(tmp_path, instances, **sections)
        if engines:
            start_engines(procs, config)
        lifecycle = Lifecycle(config, metrics or Metrics())
        await lifecycle.start()
        started.append(lifecycle)
        return lifecycle

    yield _make
    for lifecycle in started:
        await lifecycle.close()


async def test_acquire_picks_awake_instance_and_counts_in_flight(make: Make) -> None:
    lc = await make([sim_instance("m1")])
    assert lc.model_state("m1") == "awake"
    inst = await lc.acquire("m1")
    assert inst.model == "m1" and lc.in_flight("m1") == 1
    lc.release(inst)
    assert lc.in_flight("m1") == 0
    [row] = lc.instances("m1")
    assert row["state"] == "awake" and row["healthy"] is True and row["name"] == inst.name


async def test_replicas_share_load_by_fewest_in_flight_and_exclude_is_honoured(make: Make) -> None:
    lc = await make([sim_instance("m", name="a"), sim_instance("m", name="b")])
    first = await lc.acquire("m")
    second = await lc.acquire("m")
    assert {first.name, second.name} == {"a", "b"}
    third = await lc.acquire("m", exclude={"a"})
    assert third.name == "b"
    for inst in (first, second, third):
        lc.release(inst)


async def test_manual_sleep_calls_engine_once_is_idempotent_and_shows_in_status(make: Make) -> None:
    metrics = Metrics()
    lc = await make([sim_instance("org/m1"), sim_instance("m2")], metrics=metrics)
    inst = lc.config.instances[0]
    result = await lc.sleep_model("org/m1")
    assert (result.success, result.outcome, result.state) == (True, Outcome.DONE, "asleep")
    state = await asim_state(inst)
    assert state["sleeping"] is True and state["sleep_calls"] == 1
    assert str(state["last_sleep_params"]["level"]) == "1"  # query string reached the engine
    again = await lc.sleep_model("org/m1")
    assert (again.success, again.outcome) == (True, Outcome.DONE)
    assert (await asim_state(inst))["sleep_calls"] == 1
    status = lc.sleep_status()
    assert list(status["sleeping_models"]) == ["org/m1"]
    assert status["sleeping_models"]["org/m1"]["manual_sleep"] is True
    assert lc.model_state("m2") == "awake"
    assert metrics.sleeps_total.labels("org/m1", "manual")._value.get() == 1
    unknown = await lc.sleep_model("nope")
    assert (unknown.success, unknown.outcome) == (False, Outcome.UNKNOWN_MODEL)
    assert (await lc.wake_model("nope")).outcome is Outcome.UNKNOWN_MODEL


async def test_manual_wake_and_idempotent_wake(make: Make) -> None:
    lc = await make([sim_instance("m1")])
    inst = lc.config.instances[0]
    await lc.sleep_model("m1")
    woke = await lc.wake_model("m1")
    assert (woke.success, woke.outcome, woke.state) == (True, Outcome.DONE, "awake")
    again = await lc.wake_model("m1")
    assert (again.success, again.outcome) == (True, Outcome.DONE)
    state = await asim_state(inst)
    assert state["sleeping"] is False and state["wake_calls"] == 1


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
async def test_hundred_concurrent_requests_to_sleeping_model_wake_it_once(make: Make, dialect: str) -> None:
    lc = await make([sim_instance("m1", dialect=dialect, wake_seconds=0.3)])
    inst = lc.config.instances[0]
    assert (await lc.sleep_model("m1")).success

    async def one() -> str:
        got = await lc.acquire("m1")
        lc.release(got)
        return got.name

    names = await asyncio.gather(*(one() for _ in range(100)))
    assert names == [inst.name] * 100
    state = await asim_state(inst)
    assert state["wake_calls"] == 1 and state["sleeping"] is False
    if dialect == "sglang":  # weights were not backed up, so the wake reloaded them
        assert state["update_weights_calls"] == 1 and state["weights_loaded"] is True
    assert lc.queued("m1") == 0 and lc.in_flight("m1") == 0


async def test_queued_requests_are_served_in_arrival_order(make: Make) -> None:
    lc = await make([sim_instance("m1", wake_seconds=0.3)])
    await lc.sleep_model("m1")
    order: list[int] = []

    async def one(i: int) -> None:
        got = await lc.acquire("m1")
        order.append(i)
        lc.release(got)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(one(i)))
        await until(lambda i=i: lc.queued("m1") == i + 1, what=f"{i + 1} queued")
    await asyncio.gather(*tasks)
    assert order == list(range(10))


async def test_full_queue_answers_429_with_retry_after(make: Make) -> None:
    lc = await make([sim_instance("m1", wake_seconds=1.0)], router={"max_queue_per_model": 2})
    await lc.sleep_model("m1")
    waiting = [asyncio.create_task(lc.acquire("m1")) for _ in range(2)]
    await until(lambda: lc.queued("m1") == 2, what="two queued")
    with pytest.raises(Unavailable) as info:
        await lc.acquire("m1")
    assert info.value.code == "queue_full" and info.value.retry_after
    assert "m1" in info.value.message
    for inst in await asyncio.gather(*waiting):
        lc.release(inst)


async def test_cancelled_waiter_leaves_the_queue_and_leaks_nothing(make: Make) -> None:
    lc = await make([sim_instance("m1", wake_seconds=1.0)])
    await lc.sleep_model("m1")
    task = asyncio.create_task(lc.acquire("m1"))
    await until(lambda: lc.queued("m1") == 1, what="queued")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lc.queued("m1") == 0
    await until(lambda: lc.model_state("m1") == "awake", what="the wake to finish anyway")
    assert lc.in_flight("m1") == 0


async def test_hanging_wake_gives_503_wake_timeout_and_the_next_wake_succeeds(make: Make) -> None:
    lc = await make(
        [sim_instance("m", name="hangs", hang_on_wake=True), sim_instance("m", name="works")],
        sleep_manager={"wake_timeout_seconds": 1.0},
    )
    assert (await lc.sleep_model("m")).success
    with pytest.raises(Unavailable) as info:
        await lc.acquire("m")
    assert info.value.code == "wake_timeout"
    assert info.value.retry_after and "m" in info.value.message
    await until(lambda: "m" not in lc._wakes, what="the failed wake to end")
    inst = await lc.acquire("m")  # the replica whose wake failed is tried last
    assert inst.name == "works"
    lc.release(inst)


async def test_wakeup_on_request_false_answers_model_asleep(make: Make) -> None:
    lc = await make([sim_instance("m1")], sleep_manager={"wakeup_on_request": False})
    await lc.sleep_model("m1")
    with pytest.raises(Unavailable) as info:
        await lc.acquire("m1")
    assert info.value.code == "model_asleep"
    assert lc.queued("m1") == 0
    assert (await asim_state(lc.config.instances[0]))["wake_calls"] == 0


async def test_auto_sleep_sleeps_an_idle_model_only(make: Make) -> None:
    lc = await make(
        [sim_instance("idle"), sim_instance("opted-out", sleep={"enabled": False})],
        sleep_manager={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.5, "check_interval_seconds": 0.1},
    )
    await until(lambda: lc.model_state("idle") == "asleep", what="auto-sleep of the idle model")
    assert (await asim_state(lc.config.instances[0]))["sleep_calls"] == 1
    assert lc.model_state("opted-out") == "awake"
    assert lc.sleep_status()["sleeping_models"]["idle"]["manual_sleep"] is False


async def test_auto_sleep_never_sleeps_an_instance_with_a_request_in_flight(make: Make) -> None:
    lc = await make([sim_instance("m1")], sleep_manager={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.3, "check_interval_seconds": 0.1})
    inst = await lc.acquire("m1")  # a long stream: released at its last byte
    await asyncio.sleep(1.0)  # several idle thresholds and checks pass while it runs
    assert lc.model_state("m1") == "awake" and lc.sleep_candidates() == []
    assert (await asim_state(inst))["sleep_calls"] == 0
    lc.release(inst)
    await until(lambda: lc.model_state("m1") == "asleep", what="sleep once the stream ended")


async def test_request_during_automatic_sleep_is_served_and_cancels_it(make: Make) -> None:
    lc = await make(
        [sim_instance("m1", sleep_seconds=1.0)],
        sleep_manager={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.3, "check_interval_seconds": 0.1},
    )
    await until(lambda: lc.model_state("m1") == "draining", what="an automatic sleep to begin")
    inst = await lc.acquire("m1")
    assert lc.model_state("m1") == "awake"
    state = await asim_state(inst)
    assert state["sleeping"] is False  # never forwarded to a sleeping engine
    lc.release(inst)
    assert "m1" not in lc.sleep_status()["sleeping_models"]


async def test_manual_sleep_drains_in_flight_and_queues_new_requests(make: Make) -> None:
    lc = await make([sim_instance("m1")])
    held = await lc.acquire("m1")
    sleeping = asyncio.create_task(lc.sleep_model("m1"))
    await until(lambda: lc.model_state("m1") == "draining", what="draining")
    arrival = asyncio.create_task(lc.acquire("m1"))
    await until(lambda: lc.queued("m1") == 1, what="the new request to queue")
    assert (await asim_state(held))["sleep_calls"] == 0  # not slept under a running request
    lc.release(held)
    assert (await sleeping).success
    inst = await arrival  # then woken for the queued request
    assert lc.model_state("m1") == "awake"
    state = await asim_state(inst)
    assert (state["sleep_calls"], state["wake_calls"]) == (1, 1)
    lc.release(inst)


async def test_drain_timeout_aborts_the_sleep(make: Make) -> None:
    lc = await make([sim_instance("m1")], sleep_manager={"drain_timeout_seconds": 0.3})
    held = await lc.acquire("m1")
    result = await lc.sleep_model("m1")
    assert result.success is False and "drain_timeout" in result.message
    assert lc.model_state("m1") == "awake"
    assert (await asim_state(held))["sleep_calls"] == 0
    lc.release(held)


async def test_memory_budget_keeps_awake_memory_within_budget(make: Make) -> None:
    lc = await make(
        [sim_instance(f"m{i}", memory_gb=10) for i in (1, 2, 3)],
        sleep_manager={"memory_budget_gb": 20},
    )
    insts = lc.config.instances
    # at start the instance that does not fit (config order: the third) is put to sleep
    await until(lambda: lc.model_state("m3") == "asleep", what="m3 slept for the budget")
    awake_counts: list[int] = []
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            states = await asyncio.gather(*(asim_state(i) for i in insts))
            awake_counts.append(sum(1 for s in states if s["memory_bytes"] > 0))

    poller = asyncio.create_task(poll())
    for model in ("m3", "m1", "m2", "m3"):
        inst = await lc.acquire(model)
        lc.release(inst)
    stop.set()
    await poller
    assert awake_counts and max(awake_counts) <= 2
    assert sum(1 for m in ("m1", "m2", "m3") if lc.model_state(m) == "awake") == 2


async def test_budget_wake_waits_for_a_busy_instance_then_proceeds(make: Make) -> None:
    lc = await make(
        [sim_instance("m1", memory_gb=10), sim_instance("m2", memory_gb=10)],
        sleep_manager={"memory_budget_gb": 10},
    )
    await until(lambda: lc.model_state("m2") == "asleep", what="m2 slept for the budget")
    busy = await lc.acquire("m1")
    waiting = asyncio.create_task(lc.acquire("m2"))
    await asyncio.sleep(0.5)  # a window observed, not synchronisation: a wrong eviction of busy m1 would happen in it
    assert not waiting.done() and lc.model_state("m1") == "awake"
    lc.release(busy)
    inst = await waiting
    assert inst.model == "m2" and lc.model_state("m1") == "asleep"
    lc.release(inst)


async def test_reconcile_at_start_with_vllm_is_sleeping(procs: Procs, tmp_path: Path, make: Make) -> None:
    entry = sim_instance("m1")
    config = write_config(tmp_path, [entry])
    start_engine(procs, config.instances[0])
    httpx.post(config.instances[0].url + "/sleep", params={"level": 1}, timeout=5).raise_for_status()
    lc = await make([entry], engines=False)
    assert lc.model_state("m1") == "asleep"


async def test_sglang_state_from_the_router_state_file(procs: Procs, tmp_path: Path, make: Make) -> None:
    entry = sim_instance("s1", dialect="sglang")
    first = await make([entry])
    inst = first.config.instances[0]
    assert (await first.sleep_model("s1")).success
    path = RunPaths(first.config.run_dir).router_state
    assert json.loads(path.read_text())["instances"][inst.name]["state"] == "asleep"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await first.close()
    second = await make([entry], engines=False)  # a restarted router: SGLang cannot say
    assert second.model_state("s1") == "asleep"


async def test_connect_failure_marks_down_and_health_brings_it_back(procs: Procs, tmp_path: Path, make: Make) -> None:
    entry = sim_instance("m1")
    lc = await make([entry])
    inst = lc.config.instances[0]
    procs.stop_all()
    lc.report_connect_failure(inst)
    assert lc.model_state("m1") == "down"
    with pytest.raises(Unavailable) as info:
        await lc.acquire("m1")
    assert info.value.code == "model_unavailable" and info.value.retry_after
    start_engine(procs, inst)
    await until(lambda: lc.model_state("m1") == "awake", what="the health loop to bring it back")


async def test_one_failed_probe_does_not_mark_an_instance_down(procs: Procs, make: Make) -> None:
    lc = await make([sim_instance("m1")], router={"health_failure_threshold": 5, "health_check_interval_seconds": 0.1})
    procs.stop_all()
    await until(lambda: lc.by_name[lc.config.instances[0].name].failures >= 1, what="a failed probe")
    assert lc.model_state("m1") == "awake"  # below the threshold it still serves
    await until(lambda: lc.model_state("m1") == "down", what="down after the threshold")


async def test_engine_sleep_timeout_answers_504_and_stays_awake(make: Make) -> None:
    lc = await make([sim_instance("m1", hang_on_sleep=True)], sleep_manager={"wake_timeout_seconds": 0.5})
    result = await lc.sleep_model("m1")
    assert (result.success, result.outcome, result.state) == (False, Outcome.TIMED_OUT, "awake")
    inst = await lc.acquire("m1")
    lc.release(inst)


async def test_reload_drains_a_removed_instance_keeps_the_others_and_routes_an_added_one(make: Make, procs: Procs, tmp_path: Path) -> None:
    kept, removed = sim_instance("kept"), sim_instance("gone")
    lc = await make([kept, removed])
    await lc.sleep_model("kept")
    in_flight = await lc.acquire("gone")  # a request still running when its instance is removed
    added = sim_instance("new")
    config = write_config(tmp_path, [kept, added])
    start_engine(procs, config.instance("new"))
    changes = lc.reload(config)
    assert changes == ["instance new: added", "instance gone: removed"]
    with pytest.raises(Unavailable) as gone:
        await lc.acquire("gone")
    assert gone.value.code == "model_not_found"
    assert [i["name"] for i in lc.instances()] == ["kept", "new"]
    assert lc.model_state("kept") == "asleep"  # unchanged instances keep their state
    lc.release(in_flight)  # the drained instance leaves once its last request is done
    await until(lambda: "gone" not in lc.by_name, what="the removed instance to leave")
    inst = await asyncio.wait_for(lc.acquire("new"), 10)  # routed once its engine answers
    assert inst.name == "new"
    lc.release(inst)
    causes = [(e.instance, e.to_state, e.cause) for e in lc.events.history]
    assert ("new", "awake", "engine ready") in causes and ("kept", "asleep", "manual") in causes


async def test_reload_calls_an_engine_changed_exactly_when_its_supervisord_program_changed(make: Make, tmp_path: Path) -> None:
    entry = sim_instance("m1")
    lc = await make([entry])
    name = lc.config.instances[0].name
    # Launcher and policy settings: `kvctl up` leaves the engine running, so the router keeps its state.
    relaxed = {**entry, "startretries": 9, "startup_timeout_seconds": 60, "sleep": {"idle_seconds": 50}}
    assert lc.reload(write_config(tmp_path, [relaxed])) == [f"instance {name}: settings changed"]
    assert lc.model_state("m1") == "awake" and lc.instances()[0]["policy"]["idle_seconds"] == 50
    # Its command line (the sim's includes memory_gb, which it reports): `kvctl up` restarts the
    # engine, so the router waits for it to be ready again.
    faster = {**relaxed, "memory_gb": 3, "sim": {**entry["sim"], "ttft_ms": 1}}
    assert lc.reload(write_config(tmp_path, [faster])) == [f"instance {name}: engine changed"]
    assert lc.model_state("m1") == "starting"
    await until(lambda: lc.model_state("m1") == "awake", what="the engine (still the same sim) to answer again")
