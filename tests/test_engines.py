"""Engine adapters: the names they read match the real engines', and they drive the sim's
faithful vLLM/SGLang APIs."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import httpx
import pytest

from kvctl import config as config_mod
from kvctl import engines
from kvctl.engines import SglangAdapter, VllmAdapter, adapter_for
from kvctl.sim.dialects import DIALECTS

from helpers import Procs, free_port, wait_for, wait_http_ok, write_segment


@pytest.mark.parametrize("level", [1, 2])
async def test_vllm_wake_after_sleep_serves_the_same_text(tmp_path: Path, procs: Procs, level: int) -> None:
    port = free_port()
    path = tmp_path / "kvctl.yaml"
    path.write_text(f"instances:\n  - model: m\n    engine: sim\n    port: {port}\n    sleep: {{level: {level}}}\n")
    inst = config_mod.load(path).instances[0]
    procs.start_sim("m", port)
    wait_http_ok(f"{inst.url}/health")
    body = {"model": "m", "prompt": "the same prompt", "max_tokens": 8}
    adapter = adapter_for(inst)
    async with httpx.AsyncClient() as client:
        before = (await client.post(f"{inst.url}/v1/completions", json=body)).json()["choices"][0]["text"]
        await adapter.sleep(client, inst)
        assert await adapter.is_sleeping(client, inst) is True
        assert (await client.get(f"{inst.url}/sim/state")).json()["last_sleep_params"]["level"] == str(level)
        await adapter.wake(client, inst)
        assert await adapter.is_sleeping(client, inst) is False
        state = (await client.get(f"{inst.url}/sim/state")).json()
        assert state["weights_loaded"] is True
        after = (await client.post(f"{inst.url}/v1/completions", json=body)).json()["choices"][0]["text"]
    assert after == before


# The real engines' Prometheus names (vLLM v1 metrics loggers, SGLang's scheduler metrics), written
# out here so that neither kvctl's adapters nor the sim can agree with a wrong name of their own.
REAL_METRICS = {
    "vllm": {
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "kv_usage": "vllm:kv_cache_usage_perc",
        "sleep_state": "vllm:engine_sleep_state",
    },
    "sglang": {"running": "sglang:num_running_reqs", "waiting": "sglang:num_queue_reqs", "kv_usage": "sglang:token_usage", "sleep_state": None},
}


def test_the_sim_publishes_the_real_engines_metric_names() -> None:
    published = {name: {role: getattr(d, role) for role in ("running", "waiting", "kv_usage", "sleep_state")} for name, d in DIALECTS.items()}
    assert published == REAL_METRICS


@pytest.mark.parametrize("adapter", [VllmAdapter, SglangAdapter])
def test_the_adapters_read_the_real_engines_metric_names(adapter: type[engines.EngineAdapter]) -> None:
    real = REAL_METRICS[adapter.name]
    assert (adapter.metric_running, adapter.metric_waiting, adapter.metric_kv_usage) == (real["running"], real["waiting"], real["kv_usage"])


def test_every_sim_dialect_is_an_engine_with_an_adapter() -> None:
    for dialect in DIALECTS:
        inst = config_mod.parse(f"instances:\n  - model: m\n    engine: sim\n    port: 12001\n    sim: {{dialect: {dialect}}}\n", Path("/k.yaml")).instances[0]
        assert adapter_for(inst).metric_waiting == REAL_METRICS[dialect]["waiting"]
    assert {engines.engine_name(name) for name in ("VLLM", "sgl", "SGLang", "sim")} == {"vllm", "sglang", "sim"}


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_waiting_reads_the_engines_own_gauge(procs: Procs, dialect: str) -> None:
    """A request that finds no KV room waits inside the engine; the adapter counts it from the
    engine's own /metrics (the rebalancer's 'busy'), and 0 once it runs."""
    port = free_port()
    segment = f"kvctl_test-waiting-{port}"
    env = {**os.environ, "ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": segment}
    procs.start_sim("m", port, "--dialect", dialect, "--memory-gb", "1", env=env)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health")
        write_segment(segment, limit=0)  # no KV room: the next request waits in the engine
        inst = config_mod.parse(
            f"instances:\n  - {{name: w, model: m, engine: sim, sim: {{dialect: {dialect}}}, port: {port}}}\n", Path("kvctl.yaml")
        ).instances[0]
        adapter = adapter_for(inst)

        def waiting() -> int:
            async def read() -> int:
                async with httpx.AsyncClient() as client:
                    return await adapter.waiting(client, inst, 5.0)

            return asyncio.run(read())

        request = threading.Thread(
            target=httpx.post, args=(f"http://127.0.0.1:{port}/v1/completions",), kwargs={"json": {"model": "m", "prompt": "x", "max_tokens": 2}, "timeout": 60}
        )
        request.start()
        wait_for(lambda: waiting() == 1, timeout=20, what="one request waiting in the engine")
        write_segment(segment, limit=1 << 30)
        wait_for(lambda: waiting() == 0, timeout=20, what="the request admitted")
        request.join(timeout=30)
    finally:
        Path(f"/dev/shm/{segment}").unlink(missing_ok=True)
