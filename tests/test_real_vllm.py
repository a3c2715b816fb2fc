"""The lifecycle against a real vLLM (CPU build, tiny random Llama). Opt-in:

    scripts/setup_real_vllm.sh && KVCTL_REAL_VLLM=1 pytest tests/test_real_vllm.py -s

On CPU vLLM refuses --enable-sleep-mode, but with VLLM_SERVER_DEV_MODE=1 its /sleep,
/wake_up and /is_sleeping still work as a state machine and it parks requests sent while
asleep: exactly what the router must gate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from kvctl.config import Config
from kvctl.engines import adapter_for

from helpers import Procs, free_port, router_process, wait_for, wait_http_ok, write_config

DIR = Path(os.environ.get("KVCTL_REAL_VLLM_DIR", Path.home() / ".cache" / "kvctl-real-vllm"))
PYTHON = DIR / "venv" / "bin" / "python"
MODEL = DIR / "model"

pytestmark = [
    pytest.mark.skipif(os.environ.get("KVCTL_REAL_VLLM") != "1", reason="set KVCTL_REAL_VLLM=1 (after scripts/setup_real_vllm.sh)"),
    pytest.mark.skipif(not (PYTHON.exists() and (MODEL / "config.json").exists()), reason="run scripts/setup_real_vllm.sh first"),
    pytest.mark.timeout(900),
]


class Setup:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.inst = config.instances[0]
        self.model = self.inst.model
        self.url = config.router.url
        self.path = quote(self.model, safe="")

    def is_sleeping(self) -> bool:
        return httpx.get(self.inst.url + "/is_sleeping", timeout=10).json()["is_sleeping"]

    def wakes(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        # Every successful wake, whatever its cause (labels print in alphabetical order).
        return sum(float(v) for v in re.findall(r'^kvctl_wakes_total\{[^}]*result="ok"[^}]*\} (\S+)$', text, re.M))

    def complete(self, max_tokens: int = 8) -> httpx.Response:
        body = {"model": self.model, "prompt": "the model", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        return httpx.post(self.url + "/v1/completions", json=body, timeout=300)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("real")
    with Procs() as procs:
        config = write_config(
            tmp,
            [
                {
                    "name": "tiny",
                    "model": str(MODEL),
                    "engine": "vllm",
                    "python": str(PYTHON),
                    "port": free_port(),
                    "engine_env": {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                    "engine_args": ["--enforce-eager", "--distributed-executor-backend", "uni", "--dtype", "float32", "--max-model-len", "256"],
                    "sleep": {"level": 1},
                }
            ],
            sleep_manager={"wake_timeout_seconds": 120, "drain_timeout_seconds": 120},
        )
        inst = config.instances[0]
        started = time.monotonic()
        log = open(tmp / "vllm.log", "ab")  # noqa: SIM115 - kept open for the subprocess
        procs.start(adapter_for(inst).command(inst), env={**os.environ, **inst.env}, stdout=log, stderr=subprocess.STDOUT)
        wait_http_ok(inst.url + "/health", timeout=600)
        print(f"\nreal vLLM ready in {time.monotonic() - started:.1f}s")
        rlog = open(tmp / "router.log", "ab")  # noqa: SIM115
        router_process(procs, config, stdout=rlog, stderr=subprocess.STDOUT)
        yield Setup(config)


def test_manual_sleep_then_a_request_wakes_it(real: Setup) -> None:
    assert real.complete().status_code == 200
    started = time.monotonic()
    response = httpx.post(f"{real.url}/models/{real.path}/sleep", timeout=300)
    assert response.status_code == 200, response.text
    print(f"sleep took {time.monotonic() - started:.2f}s")
    assert response.json()["state"] == "asleep" and real.is_sleeping()
    again = httpx.post(f"{real.url}/action/sleep/{real.path}", timeout=300)
    assert again.status_code == 200 and real.is_sleeping()
    wakes = real.wakes()
    started = time.monotonic()
    ok = real.complete()
    print(f"request to the sleeping model answered in {time.monotonic() - started:.2f}s")
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 8
    assert real.is_sleeping() is False and real.wakes() == wakes + 1


def test_concurrent_requests_to_a_sleeping_model_wake_it_once(real: Setup) -> None:
    assert httpx.post(f"{real.url}/models/{real.path}/sleep", timeout=300).status_code == 200
    wakes = real.wakes()
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(real.complete())) for _ in range(10)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    print(f"10 concurrent requests to the sleeping model all answered in {time.monotonic() - started:.2f}s")
    assert [r.status_code for r in results] == [200] * 10
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in results)
    assert real.wakes() == wakes + 1 and real.is_sleeping() is False


def test_sleep_waits_for_a_running_stream(real: Setup) -> None:
    body = {"model": real.model, "prompt": "the", "max_tokens": 150, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", real.url + "/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(120)
    response = httpx.post(f"{real.url}/models/{real.path}/sleep", timeout=300)
    reader.join(timeout=300)
    assert response.status_code == 200, response.text
    assert chunks[-1] == "data: [DONE]"
    assert json.loads(chunks[-2][len("data: ") :])["usage"]["completion_tokens"] == 150  # the stream ran to its end
    wait_for(real.is_sleeping, what="vLLM asleep after the stream")
