"""The router's data plane end to end: real sim engines, the real router, the openai client."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvctl.config import Config

from helpers import Procs, sim_instance, sim_state, start_engines, start_router, write_config

VLLM_MODEL = "org/vllm-model"  # a `/` in the name
SGLANG_MODEL = "sglang-model"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, str]]:
    tmp_path: Path = tmp_path_factory.mktemp("router")
    vllm = sim_instance(VLLM_MODEL, name="vllm1")
    vllm["aliases"] = ["vm", "short/alias"]
    config = write_config(tmp_path, [vllm, sim_instance(SGLANG_MODEL, name="sgl1", dialect="sglang")])
    with Procs() as procs:
        start_engines(procs, config)
        yield config, start_router(procs, config)


@pytest.mark.parametrize("model", [VLLM_MODEL, SGLANG_MODEL, "vm"])
def test_openai_client_chat_and_completions(stack: tuple[Config, str], model: str) -> None:
    _, base = stack
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    canonical = VLLM_MODEL if model == "vm" else model

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}], max_tokens=5)
    assert chat.choices[0].message.content
    assert chat.model == canonical  # an alias is forwarded with `model` rewritten
    assert chat.usage is not None and chat.usage.completion_tokens == 5

    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}], max_tokens=5, stream=True)
        if c.choices
    ]
    assert "".join(pieces).strip()

    completion = client.completions.create(model=model, prompt="once upon", max_tokens=4)
    assert completion.choices[0].text and completion.model == canonical

    streamed = [c.choices[0].text for c in client.completions.create(model=model, prompt="once upon", max_tokens=4, stream=True) if c.choices]
    assert "".join(streamed) == completion.choices[0].text  # the sim is deterministic per prompt


def test_v1_models_lists_models_and_aliases(stack: tuple[Config, str]) -> None:
    _, base = stack
    models = openai.OpenAI(base_url=base + "/v1", api_key="unused").models.list()
    ids = {m.id for m in models.data}
    assert ids == {VLLM_MODEL, SGLANG_MODEL, "vm", "short/alias"}
    body = httpx.get(base + "/v1/models").json()
    assert body["object"] == "list"
    alias = next(m for m in body["data"] if m["id"] == "vm")
    assert alias["root"] == VLLM_MODEL and alias["state"] == "awake"


def test_headers_request_id_and_stream_buffering(stack: tuple[Config, str]) -> None:
    _, base = stack
    body = {"model": VLLM_MODEL, "prompt": "x", "max_tokens": 2}
    kept = httpx.post(base + "/v1/completions", json=body, headers={"X-Request-Id": "my-id-42", "Connection": "keep-alive"})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "my-id-42"
    made = httpx.post(base + "/v1/completions", json=body)
    assert len(made.headers["x-request-id"]) >= 16
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as stream:
        assert stream.headers["x-accel-buffering"] == "no"
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "keep-alive" not in stream.headers
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_engine_errors_pass_through(stack: tuple[Config, str]) -> None:
    _, base = stack
    response = httpx.post(base + "/v1/completions", json={"model": VLLM_MODEL, "prompt": "x", "max_tokens": -3})
    assert response.status_code == 400  # the engine's own 400, not the router's
    assert "error" in response.json() or "message" in response.json()


def test_engine_admin_paths_are_not_proxied(stack: tuple[Config, str]) -> None:
    config, base = stack
    for path in (
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/update_weights_from_disk",
        "/v1/../sleep",
        "/is_sleeping",
    ):
        response = httpx.post(base + path, json={"model": VLLM_MODEL})
        assert response.status_code in (404, 405), path
        assert response.json()["error"]["code"] in ("not_found", "method_not_allowed")
    for inst in config.instances:
        state = sim_state(inst)
        assert state["sleep_calls"] == 0 and state["sleeping"] is False


def test_introspection_endpoints(stack: tuple[Config, str]) -> None:
    _, base = stack
    httpx.post(base + "/v1/completions", json={"model": VLLM_MODEL, "prompt": "x", "max_tokens": 2}).raise_for_status()
    with httpx.stream("POST", base + "/v1/completions", json={"model": VLLM_MODEL, "prompt": "x", "max_tokens": 2, "stream": True}) as s:
        s.read()
    encoded = urllib.parse.quote(VLLM_MODEL, safe="")
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert httpx.get(base + "/health/all").json()["status"] == "ok"
    for name in (VLLM_MODEL, encoded):
        health = httpx.get(f"{base}/health/{name}")
        assert health.status_code == 200 and health.json()["model"] == VLLM_MODEL
        for route in ("/traffic/stats/model/", "/traffic/stats/"):
            stats = httpx.get(f"{base}{route}{name}?window=300").json()
            assert stats["window_seconds"] == 300
            s = stats["model_stats"]
            assert s["total_requests"] >= 2 and s["successful_requests"] >= 2 and s["p50_latency"] is not None
            assert s["p50_ttft"] is not None and s["in_flight"] == 0 and s["queued"] == 0 and s["is_idle"] is False
    assert httpx.get(f"{base}/health/nope").status_code == 404
    models = httpx.get(base + "/models").json()["models"]
    assert set(models) == {VLLM_MODEL, SGLANG_MODEL}
    assert models[VLLM_MODEL]["endpoint"].startswith("http://127.0.0.1:") and models[VLLM_MODEL]["engine"] == "sim"
    everything = httpx.get(base + "/traffic/stats").json()
    assert set(everything["traffic_stats"]) == {VLLM_MODEL, SGLANG_MODEL} and everything["window_seconds"] == 60
    for route in ("/traffic/idle", "/models/idle"):
        idle = httpx.get(base + route, params={"threshold": 0}).json()
        assert set(idle["idle_models"]) == {VLLM_MODEL, SGLANG_MODEL}
    for route in ("/traffic/active", "/models/active"):
        active = httpx.get(base + route, params={"threshold": 3600}).json()
        assert VLLM_MODEL in active["active_models"]
    for bad in (
        "/traffic/stats?window=abc",
        "/traffic/stats?window=0",
        "/traffic/stats?window=-5",
        "/traffic/stats?window=nan",
        "/traffic/stats?window=1e9",
        "/traffic/idle?threshold=x",
        "/models/active?threshold=-1",
        f"/traffic/stats/{encoded}?window=inf",
    ):
        response = httpx.get(base + bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    metrics = httpx.get(base + "/metrics").text
    assert f'kvctl_requests_total{{model="{VLLM_MODEL}",status="200"}}' in metrics
    assert "kvctl_ttft_seconds_bucket" in metrics and "kvctl_request_latency_seconds_bucket" in metrics
    assert f'kvctl_in_flight{{model="{VLLM_MODEL}"}} 0.0' in metrics
    assert f'kvctl_model_state{{kvctl_model_state="awake",model="{SGLANG_MODEL}"}} 1.0' in metrics
