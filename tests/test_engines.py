"""Engine adapters against the simulated engine's faithful vLLM/SGLang APIs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kvctl import config as config_mod
from kvctl.engines import adapter_for

from helpers import Procs, free_port, wait_http_ok


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
