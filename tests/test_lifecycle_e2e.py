"""The lifecycle end to end: the real router (`python -m kvctl router`) in front of real sims."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvctl.config import Config

from helpers import Router, kvctl, sim_instance, sim_state, wait_for, write_config

pytestmark = pytest.mark.timeout(180)


class Poller:
    """Polls every sim's /sim/state in a background thread while a test runs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.samples: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                self.samples.append([client.get(i.url + "/sim/state").json() for i in self.config.instances])

    def __enter__(self) -> Poller:
        self._thread.start()
        wait_for(lambda: self.samples, what="a first sample")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_kvctl_sleep_is_idempotent_and_every_alias_route_works_with_encoded_slash(router: Callable[..., Router]) -> None:
    r = router([sim_instance("org/m1"), sim_instance("m2")])
    inst = r.config.instances[0]
    first = kvctl("sleep", "org/m1", "-c", str(r.config.path))
    assert first.returncode == 0, first.stderr
    assert "asleep" in first.stdout
    state = sim_state(inst)
    assert state["sleeping"] is True and state["sleep_calls"] == 1
    again = kvctl("sleep", "org/m1", "-c", str(r.config.path))
    assert again.returncode == 0, again.stderr
    assert sim_state(inst)["sleep_calls"] == 1
    status = r.get("/sleep/status").json()
    assert set(status["sleeping_models"]) == {"org/m1"}
    assert status["sleeping_models"]["org/m1"]["manual_sleep"] is True
    assert r.state("m2") == "awake"

    sleeps, wakes = 1, 0
    for path, expect in [
        ("/models/org%2Fm1/wake", "awake"),
        ("/models/org%2Fm1/sleep", "asleep"),
        ("/wake/model/org%2Fm1", "awake"),
        ("/sleep/model/org%2Fm1", "asleep"),
        ("/action/wakeup/org%2Fm1", "awake"),
        ("/action/sleep/org%2Fm1", "asleep"),
        ("/models/org/m1/wake", "awake"),
    ]:
        response = r.post(path)
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        assert body == {"model_name": "org/m1", "success": True, "message": body["message"], "state": expect, "evicted": []}, path
        sleeps, wakes = sleeps + (expect == "asleep"), wakes + (expect == "awake")
        state = sim_state(inst)
        assert (state["sleep_calls"], state["wake_calls"], state["sleeping"]) == (sleeps, wakes, expect == "asleep"), path
    assert r.post("/models/nope/sleep").status_code == 404
    assert r.post("/action/wakeup/nope").status_code == 404


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_hundred_concurrent_requests_to_a_sleeping_model_one_wake(router: Callable[..., Router], dialect: str) -> None:
    r = router([sim_instance("m1", dialect=dialect, wake_seconds=0.5)])
    inst = r.config.instances[0]
    assert r.post("/models/m1/sleep").json()["state"] == "asleep"

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            results = await asyncio.gather(*(client.completions.create(model="m1", prompt=f"p{i}", max_tokens=3) for i in range(100)))
        finally:
            await client.close()
        return [res.choices[0].text for res in results]

    texts = asyncio.run(run())
    assert len(texts) == 100 and all(texts)
    state = sim_state(inst)
    assert state["wake_calls"] == 1 and state["sleeping"] is False
    assert state["requests_served"] == 100
    assert r.state("m1") == "awake"


def test_hanging_wake_gives_503_with_retry_after_and_the_next_wake_succeeds(router: Callable[..., Router]) -> None:
    r = router(
        [sim_instance("m", name="hangs", hang_on_wake=True), sim_instance("m", name="works")],
        sleep_manager={"wake_timeout_seconds": 1.5},
    )
    assert r.post("/models/m/sleep").status_code == 200
    failed = r.complete("m")
    assert failed.status_code == 503
    assert int(failed.headers["retry-after"]) >= 1
    error = failed.json()["error"]
    assert error["code"] == "wake_timeout" and "m" in error["message"]
    assert r.get("/health").status_code == 200
    wait_for(lambda: r.state("m") == "asleep", what="the failed wake to settle")
    ok = r.complete("m")
    assert ok.status_code == 200, ok.text
    assert sim_state(r.config.instances[1])["wake_calls"] == 1


def test_auto_sleep_spares_a_running_stream_then_sleeps_the_idle_model(router: Callable[..., Router]) -> None:
    r = router(
        [sim_instance("m1", tokens_per_second=20)], sleep_manager={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.5, "check_interval_seconds": 0.1}
    )
    inst = r.config.instances[0]
    wait_for(lambda: sim_state(inst)["sleeping"], what="auto-sleep of the never-used model")
    with Poller(r.config) as poller:
        # a 2 s stream: four idle thresholds long
        with httpx.stream(
            "POST", r.url + "/v1/completions", timeout=30, json={"model": "m1", "prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True}
        ) as response:
            assert response.status_code == 200
            chunks = [line for line in response.iter_lines() if line.startswith("data: ")]
        during = len(poller.samples)
    assert chunks[-1] == "data: [DONE]" and len(chunks) > 40
    # from the first sample that saw it awake until the stream ended, it was never slept
    woke = next(i for i, sample in enumerate(poller.samples) if not sample[0]["sleeping"])
    assert all(not s[0]["sleeping"] and s[0]["sleep_calls"] == 1 for s in poller.samples[woke:during])
    wait_for(lambda: sim_state(inst)["sleep_calls"] == 2 and sim_state(inst)["sleeping"], what="auto-sleep after the stream")
    assert r.state("m1") == "asleep"


def test_request_during_an_automatic_sleep_is_served_and_cancels_it(router: Callable[..., Router]) -> None:
    r = router(
        [sim_instance("m1", sleep_seconds=1.5)], sleep_manager={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.5, "check_interval_seconds": 0.1}
    )
    wait_for(lambda: r.state("m1") == "draining", what="an automatic sleep to begin")
    response = r.complete("m1")
    assert response.status_code == 200, response.text
    assert r.state("m1") == "awake"
    assert sim_state(r.config.instances[0])["sleeping"] is False
    assert "m1" not in r.get("/sleep/status").json()["sleeping_models"]


def test_memory_budget_never_more_than_two_of_three_awake(router: Callable[..., Router]) -> None:
    r = router([sim_instance(f"m{i}", memory_gb=10) for i in (1, 2, 3)], sleep_manager={"memory_budget_gb": 20})
    wait_for(lambda: r.state("m3") == "asleep", what="m3 slept at start: it does not fit")
    with Poller(r.config) as poller:
        for model in ("m3", "m1", "m2", "m3", "m1"):
            response = r.complete(model)
            assert response.status_code == 200, (model, response.text)
    awake = [sum(1 for s in sample if s["memory_bytes"] > 0) for sample in poller.samples]
    assert len(awake) > 10 and max(awake) <= 2
    states = r.get("/models").json()["models"]
    assert sorted(states[m]["state"] for m in ("m1", "m2", "m3")) == ["asleep", "awake", "awake"]


def test_router_sigkilled_and_restarted_by_supervisord_keeps_sleep_states() -> None:
    base = Path(tempfile.mkdtemp(prefix="kvlc"))  # short: supervisord's unix socket path is length-limited
    config = write_config(base, [sim_instance("v1"), sim_instance("s1", dialect="sglang"), sim_instance("a1")])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return kvctl(*args, "-c", str(config.path))

    try:
        up = run("up")
        assert up.returncode == 0, up.stdout + up.stderr
        r = Router(config)
        for model in ("v1", "s1"):
            assert r.post(f"/models/{model}/sleep").json()["state"] == "asleep"
        before = {i.name: sim_state(i) for i in config.instances}
        slept = r.get("/sleep/status").json()["sleeping_models"]
        old_pid = json.loads(run("status", "--json").stdout)["router"]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            pid = json.loads(run("status", "--json").stdout)["router"]["pid"]
            return bool(pid) and pid != old_pid and r.get("/health").status_code == 200

        wait_for(restarted, timeout=60, interval=0.3, what="supervisord to restart the router")
        wait_for(lambda: r.state("a1") == "awake", what="the restarted router to reconcile")
        assert {m: r.state(m) for m in ("v1", "s1", "a1")} == {"v1": "asleep", "s1": "asleep", "a1": "awake"}
        # Why and since when they sleep survived the restart (the state file).
        kept = r.get("/sleep/status").json()["sleeping_models"]
        for model in ("v1", "s1"):
            assert kept[model]["cause"] == "manual" and kept[model]["manual_sleep"] is True
            assert kept[model]["sleep_start_time"] == slept[model]["sleep_start_time"]
        after = {i.name: sim_state(i) for i in config.instances}
        for name in before:  # reconciling asked; it slept or woke nothing
            assert (after[name]["sleep_calls"], after[name]["wake_calls"]) == (before[name]["sleep_calls"], before[name]["wake_calls"])
        response = r.complete("s1")
        assert response.status_code == 200, response.text
        assert sim_state(config.instance("s1"))["wake_calls"] == 1
    finally:
        run("down", "--timeout", "5")
        shutil.rmtree(base, ignore_errors=True)
