"""The simulated engine (`python -m kvctl.sim`) as real subprocesses, both dialects."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from kvctl import config as config_mod
from kvctl.engines import adapter_for
from kvctl.sim.app import create_app
from kvctl.sim.dialects import DIALECTS
from kvctl.sim.settings import SimSettings
from kvctl.sim.state import Settings

from helpers import Procs, alive, free_port, tree_pids, wait_for, wait_http_ok

MODEL = "org/sim-model"


def _start(procs: Procs, *extra: str, dialect: str = "vllm", model: str = MODEL, **kwargs) -> str:
    port = free_port()
    procs.start_sim(model, port, "--dialect", dialect, *extra, **kwargs)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/health")
    return url


def _state(url: str) -> dict:
    return httpx.get(url + "/sim/state", timeout=5).json()


def _sse(text: str) -> list[dict | str]:
    """Parse an SSE body strictly: only `data: ...` events separated by blank lines."""
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, str]]:
    """One plain sim per dialect, shared by the read-mostly tests."""
    with Procs() as procs:
        yield {dialect: _start(procs, dialect=dialect) for dialect in ("vllm", "sglang")}


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


# --------------------------------------------------------------------------- plain endpoints


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_health_and_models(sims: dict[str, str], dialect: str) -> None:
    url = sims[dialect]
    assert httpx.get(url + "/health").status_code == 200
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL, "model", dialect)]
    listed = openai.OpenAI(base_url=url + "/v1", api_key="x").models.list()
    assert [m.id for m in listed] == [MODEL]
    if dialect == "vllm":
        assert "version" in httpx.get(url + "/version").json()
        assert httpx.get(url + "/health_generate").status_code == 404
    else:
        assert httpx.get(url + "/health_generate").status_code == 200
        assert httpx.get(url + "/get_model_info").json()["model_path"] == MODEL
        assert httpx.post(url + "/sleep").status_code == 404


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_completion_and_chat_non_stream_with_openai_client(sims: dict[str, str], dialect: str) -> None:
    client = openai.OpenAI(base_url=sims[dialect] + "/v1", api_key="x", max_retries=0)
    done = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    assert done.object == "text_completion" and done.model == MODEL
    assert done.choices[0].finish_reason == "length"
    assert len(done.choices[0].text.split()) == 5
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (3, 5, 8)
    default = client.completions.create(model=MODEL, prompt="x")
    assert default.usage.completion_tokens == 16  # max_tokens defaults to 16

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}], max_tokens=4
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert len(chat.choices[0].message.content.split()) == 4
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (4, 4)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_format_one_token_per_chunk(sims: dict[str, str], endpoint: str) -> None:
    url = sims["vllm"]
    chat = endpoint == "chat"
    body: dict = {"model": MODEL, "max_tokens": 3, "stream": True}
    body.update({"messages": [{"role": "user", "content": "a b"}]} if chat else {"prompt": "a b"})
    path = "/v1/chat/completions" if chat else "/v1/completions"

    plain = httpx.post(url + path, json=body)
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("text/event-stream")
    events = _sse(plain.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        chunks = chunks[1:]
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1

    body["stream_options"] = {"include_usage": True}
    events = _sse(httpx.post(url + path, json=body).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


def test_openai_client_streams_with_usage(sims: dict[str, str]) -> None:
    client = openai.OpenAI(base_url=sims["sglang"] + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count to three"}], max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 3


def test_text_is_deterministic(sims: dict[str, str]) -> None:
    def complete(url: str, prompt: str, stream: bool = False) -> str:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream})
        if stream:
            return "".join(e["choices"][0]["text"] for e in _sse(r.text)[:-1])
        return r.json()["choices"][0]["text"]

    first = complete(sims["vllm"], "the same prompt")
    assert complete(sims["vllm"], "the same prompt") == first
    assert complete(sims["vllm"], "the same prompt", stream=True) == first
    assert complete(sims["sglang"], "the same prompt") == first  # replicas agree, whatever the dialect
    assert complete(sims["vllm"], "another prompt") != first


def test_embeddings(sims: dict[str, str]) -> None:
    for url in sims.values():
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.embeddings.create(model=MODEL, input=["hello world", "bye"])  # base64 on the wire
        assert [d.index for d in out.data] == [0, 1]
        assert out.usage.prompt_tokens == 3
        floats = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": "hello world"}).json()
        assert floats["data"][0]["embedding"] == pytest.approx(out.data[0].embedding, abs=1e-6)
        assert out.data[0].embedding != out.data[1].embedding


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", json.dumps({"model": MODEL}).encode(), 400),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**6}).encode(), 400),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}).encode(), 400),
    ("/v1/embeddings", json.dumps({"model": MODEL, "input": 3}).encode(), 400),
]


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_bad_requests_get_the_engines_error_shape(sims: dict[str, str], dialect: str) -> None:
    url = sims[dialect]
    for path, content, status in BAD:
        r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, content, r.text)
        error = r.json()["error"] if dialect == "vllm" else r.json()
        assert error["code"] == status and error["type"] == "BadRequestError" and error["message"], r.text
        if dialect == "sglang":
            assert r.json()["object"] == "error"
    wrong = httpx.post(url + "/v1/completions", json={"model": "other/model", "prompt": "x"})
    if dialect == "vllm":
        assert wrong.status_code == 404
        assert wrong.json()["error"]["message"] == "The model `other/model` does not exist."
        assert wrong.json()["error"]["type"] == "NotFoundError"
    else:
        assert wrong.status_code == 200  # SGLang serves whatever `model` says
    assert _state(url)["in_flight"] == 0


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_metrics_use_the_dialects_names(sims: dict[str, str], dialect: str) -> None:
    names = DIALECTS[dialect]  # the real engines' names: tests/test_engines.py
    text = httpx.get(sims[dialect] + "/metrics").text
    for name in (names.running, names.waiting, names.kv_usage):
        assert f'{name}{{model_name="{MODEL}"}} ' in text
    assert f"{dialect}:generation_tokens_total" in text
    other = "sglang:" if dialect == "vllm" else "vllm:"
    assert other not in text


def _sleep_state(url: str) -> dict[str, float]:
    """vllm:engine_sleep_state by its sleep_state label."""
    found = re.findall(r'^vllm:engine_sleep_state\{model_name="[^"]*",sleep_state="(\w+)"\} (\S+)$', httpx.get(url + "/metrics").text, re.MULTILINE)
    return {state: float(value) for state, value in found}


def test_vllm_sleep_state_gauge_follows_sleep_and_wake(procs: Procs) -> None:
    url = _start(procs)
    assert _sleep_state(url) == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    httpx.post(url + "/sleep?level=1").raise_for_status()
    assert _sleep_state(url) == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
    httpx.post(url + "/wake_up").raise_for_status()
    httpx.post(url + "/sleep?level=2").raise_for_status()
    assert _sleep_state(url) == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}
    httpx.post(url + "/wake_up").raise_for_status()
    assert _sleep_state(url)["awake"] == 1.0


# --------------------------------------------------------------------------- vLLM sleep API


def test_vllm_request_while_asleep_is_parked_until_wake(procs: Procs, pool: ThreadPoolExecutor) -> None:
    url = _start(procs, "--memory-gb", "2")
    assert _state(url)["memory_bytes"] == 2 * 2**30
    # vLLM reads level/mode from the query string only; this body must be ignored.
    r = httpx.post(url + "/sleep?level=1", json={"level": 2, "mode": "wait"})
    assert r.status_code == 200
    assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
    state = _state(url)
    assert state["sleeping"] and state["memory_bytes"] == 0 and state["sleep_calls"] == 1
    assert state["last_sleep_params"] == {"level": "1", "mode": None}
    assert state["weights_loaded"]  # level 1 keeps a copy of the weights

    parked: Future = pool.submit(httpx.post, url + "/v1/completions", json={"model": MODEL, "prompt": "p", "max_tokens": 2}, timeout=30)
    wait_for(lambda: _state(url)["in_flight"] == 1, 10, what="the request to be parked")
    assert not parked.done()
    assert 'vllm:num_requests_waiting{model_name="org/sim-model"} 1.0' in httpx.get(url + "/metrics").text

    assert httpx.post(url + "/wake_up").status_code == 200
    response = parked.result(timeout=10)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    state = _state(url)
    assert not state["sleeping"] and state["memory_bytes"] == 2 * 2**30
    assert (state["wake_calls"], state["in_flight"], state["requests_served"]) == (1, 0, 1)


def test_vllm_sleep_level_2_loses_weights_and_partial_wake(procs: Procs) -> None:
    url = _start(procs)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
    normal = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert httpx.post(url + "/sleep", params={"level": 2, "mode": "wait"}).status_code == 200
    assert _state(url)["last_sleep_params"] == {"level": "2", "mode": "wait"}
    assert httpx.post(url + "/sleep?level=7").status_code == 400
    assert httpx.post(url + "/sleep?mode=later").status_code == 400

    assert httpx.post(url + "/wake_up?tags=weights").status_code == 200
    assert httpx.get(url + "/is_sleeping").json()["is_sleeping"]  # the KV cache is still released
    assert httpx.post(url + "/wake_up?tags=bogus").status_code == 400
    assert httpx.post(url + "/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert not httpx.get(url + "/is_sleeping").json()["is_sleeping"]

    assert not _state(url)["weights_loaded"]
    garbage = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert garbage != normal  # a level-2 wake without reloading serves nonsense, as vLLM does
    assert httpx.post(url + "/collective_rpc", json={"method": "reload_weights"}).status_code == 200
    assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == normal
    assert _state(url)["update_weights_calls"] == 1


def test_vllm_sleep_abort_ends_running_streams(procs: Procs) -> None:
    url = _start(procs, "--tokens-per-second", "50")
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "p", "max_tokens": 500, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.post(url + "/sleep", timeout=10).status_code == 200  # mode defaults to abort
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "abort"
    state = _state(url)
    assert state["sleep_aborted"] == 1 and state["in_flight"] == 0 and state["sleeping"]


def test_vllm_sleep_wait_and_keep_modes(procs: Procs, pool: ThreadPoolExecutor) -> None:
    url = _start(procs, "--tokens-per-second", "100")

    def stream_started(max_tokens: int) -> Future:
        body = {"model": MODEL, "prompt": "p", "max_tokens": max_tokens, "stream": True}
        future = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
        wait_for(lambda: _state(url)["running"] == 1, 10, what="a running stream")
        return future

    first = stream_started(30)
    assert httpx.post(url + "/sleep?mode=wait", timeout=30).status_code == 200
    assert _state(url)["requests_served"] == 1  # the sleep waited for the stream to finish
    assert _sse(first.result(timeout=10).text)[-2]["choices"][0]["finish_reason"] == "length"
    assert httpx.post(url + "/wake_up").status_code == 200

    second = stream_started(200)  # 2 s of tokens: still running when the sleep lands
    assert httpx.post(url + "/sleep?mode=keep", timeout=30).status_code == 200
    state = _state(url)
    assert state["sleeping"] and state["running"] == 1 and not second.done()  # paused, not ended
    assert httpx.post(url + "/wake_up").status_code == 200
    events = _sse(second.result(timeout=10).text)
    assert len(events) == 201 and events[-2]["choices"][0]["finish_reason"] == "length"
    assert _state(url)["sleep_aborted"] == 0


# --------------------------------------------------------------------------- SGLang memory API


def test_sglang_request_while_released_fails_and_works_after_resume(procs: Procs) -> None:
    url = _start(procs, dialect="sglang")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
    normal = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert httpx.post(url + "/release_memory_occupation", json={"tags": []}).status_code == 200
    state = _state(url)
    assert state["sleeping"] and state["memory_bytes"] == 0 and state["last_sleep_params"] == {"tags": []}
    failed = httpx.post(url + "/v1/completions", json=body)
    assert failed.status_code == 503 and failed.json()["object"] == "error"
    assert httpx.get(url + "/health_generate").status_code == 503
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/update_weights_from_disk", json={"model_path": MODEL}).json()["success"] is False

    assert httpx.post(url + "/resume_memory_occupation", json={}).status_code == 200
    state = _state(url)
    assert not state["sleeping"] and state["memory_bytes"] > 0
    assert not state["weights_loaded"]  # released without --enable-weights-cpu-backup
    assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] != normal
    reload = httpx.post(url + "/update_weights_from_disk", json={"model_path": MODEL})
    assert reload.status_code == 200 and reload.json()["success"] is True
    assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == normal
    state = _state(url)
    assert (state["sleep_calls"], state["wake_calls"], state["update_weights_calls"], state["weights_loaded"]) == (1, 1, 2, True)
    assert httpx.post(url + "/release_memory_occupation", json={"tags": ["gpu"]}).status_code == 400
    assert httpx.post(url + "/update_weights_from_disk", json={}).status_code == 400


def test_sglang_partial_release_and_cpu_backup(procs: Procs) -> None:
    url = _start(procs, "--enable-memory-saver", "--enable-weights-cpu-backup", dialect="sglang")
    assert httpx.post(url + "/release_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    state = _state(url)
    assert state["sleeping"] and state["released_tags"] == ["kv_cache"] and state["memory_bytes"] > 0
    assert httpx.post(url + "/release_memory_occupation").status_code == 200  # no body = all tags
    assert httpx.post(url + "/resume_memory_occupation").status_code == 200
    state = _state(url)
    assert not state["sleeping"] and state["weights_loaded"]  # the CPU backup restored them


# --------------------------------------------------------------------------- faults and process behaviour


def test_load_seconds_delays_listening_and_unknown_args_are_ignored(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sim.log"
    with log.open("w") as fh:
        started = time.monotonic()
        procs.start_sim(MODEL, port, "--load-seconds", "1.5", "--enable-sleep-mode", "--gpu-memory-utilization", "0.5", stderr=fh)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")
    wait_http_ok(f"http://127.0.0.1:{port}/health")
    assert time.monotonic() - started >= 1.5  # never listening before loaded
    text = log.read_text()
    assert "ignoring engine args: --enable-sleep-mode --gpu-memory-utilization 0.5" in text


def test_crash_after_exits_after_n_generations(procs: Procs) -> None:
    port = free_port()
    proc = procs.start_sim(MODEL, port, "--crash-after", "2")
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/health")
    assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    stream = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True})
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")  # the Nth is served whole
    wait_for(lambda: proc.poll() is not None, 10, what="the sim to exit")
    assert proc.returncode == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_fail_rate_one_answers_500(procs: Procs) -> None:
    url = _start(procs, "--fail-rate", "1.0")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="x")
    raw = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert raw.status_code == 500 and raw.json()["error"]["code"] == 500
    state = _state(url)
    assert (state["failed"], state["requests_served"], state["in_flight"]) == (2, 0, 0)
    assert httpx.get(url + "/health").status_code == 200


def test_hang_on_sleep_and_wake(procs: Procs) -> None:
    hang_sleep = _start(procs, "--hang-on-sleep")
    hang_wake = _start(procs, "--hang-on-wake")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(hang_sleep + "/sleep?level=1", timeout=0.5)
    assert _state(hang_sleep)["sleep_calls"] == 1 and not _state(hang_sleep)["sleeping"]

    assert httpx.post(hang_wake + "/sleep?level=1").status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(hang_wake + "/wake_up", timeout=0.5)
    state = _state(hang_wake)
    assert state["wake_calls"] == 1 and state["sleeping"]


def test_client_disconnect_mid_stream_and_while_parked_aborts(procs: Procs, pool: ThreadPoolExecutor) -> None:
    url = _start(procs, "--tokens-per-second", "20")
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: _state(url)["running"] == 1, 10, what="a running stream")
    wait_for(lambda: _state(url)["aborted"] == 1, 10, what="the stream to be aborted")
    assert _state(url)["in_flight"] == 0

    assert httpx.post(url + "/sleep?level=1").status_code == 200
    parked = pool.submit(httpx.post, url + "/v1/completions", json={"model": MODEL, "prompt": "p"}, timeout=1.0)
    wait_for(lambda: _state(url)["in_flight"] == 1, 10, what="the request to be parked")
    with pytest.raises(httpx.ReadTimeout):
        parked.result(timeout=10)  # the client gives up and closes its connection
    wait_for(lambda: _state(url)["aborted"] == 2, 10, what="the parked request to be dropped")
    state = _state(url)
    assert state["in_flight"] == 0 and state["max_in_flight"] == 1
    assert httpx.post(url + "/wake_up").status_code == 200
    assert _state(url)["requests_served"] == 0


def test_concurrent_requests_track_max_in_flight(procs: Procs, pool: ThreadPoolExecutor) -> None:
    url = _start(procs, "--ttft-ms", "200")
    barrier = threading.Barrier(4)

    def one() -> int:
        barrier.wait()
        return httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30).status_code

    assert [f.result() for f in [pool.submit(one) for _ in range(4)]] == [200] * 4
    state = _state(url)
    assert state["max_in_flight"] >= 2 and state["in_flight"] == 0 and state["requests_served"] == 4


# --------------------------------------------------------------------------- the adapter's command line


def test_sim_adapter_command_runs_the_sim(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "kvctl.yaml"
    cfg.write_text(
        f"""\
instances:
  - name: s
    model: {MODEL}
    engine: sim
    python: {sys.executable}
    memory_gb: 3
    engine_args: ["--port={port}", "--enable-memory-saver"]
    sim: {{dialect: sglang, ttft_ms: 1, tokens_per_second: 1000, sleep_seconds: 0.1, wake_seconds: 0.1, fail_rate: 0.0, seed: 3, crash_after: 100, hang_on_sleep: false}}
"""
    )
    inst = config_mod.load(cfg).instances[0]
    procs.start(adapter_for(inst).command(inst))
    wait_http_ok(inst.url + "/health")
    state = _state(inst.url)
    assert (state["dialect"], state["model"], state["memory_bytes"]) == ("sglang", MODEL, 3 * 2**30)

    async def cycle() -> None:
        adapter = adapter_for(inst)
        async with httpx.AsyncClient() as client:
            await adapter.sleep(client, inst, timeout=10)
            assert _state(inst.url)["sleeping"]
            await adapter.wake(client, inst, timeout=10)

    asyncio.run(cycle())
    state = _state(inst.url)
    # The SGLang adapter reloads the weights after resuming, as a released SGLang needs.
    assert (state["sleeping"], state["weights_loaded"], state["update_weights_calls"]) == (False, True, 1)


async def test_create_app_serves_in_process() -> None:
    app = create_app(Settings(model=MODEL, port=0, sim=SimSettings(dialect="sglang", tokens_per_second=1000)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        r = await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and len(_sse(r.text)) == 4
        assert (await client.get("/sim/state")).json()["requests_served"] == 1


# --------------------------------------------------------------------------- child processes


def test_spawn_children_outlive_a_killed_parent_and_end_with_a_clean_stop(procs: Procs) -> None:

    assert "--spawn-children" in subprocess.run([sys.executable, "-m", "kvctl.sim", "--help"], capture_output=True, text=True, check=True).stdout
    port, clean_port = free_port(), free_port()
    killed = procs.start_sim(MODEL, port, "--spawn-children", "2")
    clean = procs.start_sim(MODEL, clean_port, "--spawn-children", "1")
    wait_http_ok(f"http://127.0.0.1:{port}/health")
    wait_http_ok(f"http://127.0.0.1:{clean_port}/health")
    children = [pid for pid in tree_pids(killed.pid) if pid != killed.pid]
    clean_children = [pid for pid in tree_pids(clean.pid) if pid != clean.pid]
    try:
        assert len(children) == 2
        assert all(b"kvctl.sim-child" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(10)
        assert all(alive(pid) for pid in children)  # orphaned, like vLLM's workers after a kill -9

        assert len(clean_children) == 1
        clean.send_signal(signal.SIGTERM)
        assert clean.wait(10) == -signal.SIGTERM
        assert not alive(clean_children[0])
    finally:
        for pid in children + clean_children:  # orphans: the procs fixture no longer reaches them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
