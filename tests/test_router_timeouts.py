"""Router timeouts: to the first byte and between chunks, never a total one."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from helpers import Procs, sim_instance, start_engines, start_router, write_config


def _stream_lines(base: str, model: str, max_tokens: int) -> list[str]:
    body = {"model": model, "prompt": "a long answer", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


def test_a_generation_longer_than_the_first_byte_timeout_is_never_cut(tmp_path: Path, procs: Procs) -> None:
    # 30 tokens at 10/s take ~3 s: three times the first-byte timeout, each gap well inside the idle one.
    config = write_config(tmp_path, [sim_instance("org/long", tokens_per_second=10)], router={"request_timeout_seconds": 1, "stream_idle_timeout_seconds": 1})
    start_engines(procs, config)
    base = start_router(procs, config)
    lines = _stream_lines(base, "org/long", 30)
    assert lines[-1] == "data: [DONE]"
    assert len([line for line in lines if '"text"' in line]) == 30


def test_a_stream_that_stalls_between_chunks_ends_with_an_error_event(tmp_path: Path, procs: Procs) -> None:
    # One token every 4 s against a 1 s idle timeout: the first chunk comes, then the stall.
    config = write_config(tmp_path, [sim_instance("org/stall", tokens_per_second=0.25)], router={"stream_idle_timeout_seconds": 1})
    start_engines(procs, config)
    base = start_router(procs, config)
    lines = _stream_lines(base, "org/stall", 5)
    assert "data: [DONE]" not in lines
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "stream_timeout" and "org/stall" in error["message"]
    assert httpx.get(base + "/health").status_code == 200
