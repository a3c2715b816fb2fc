"""The router's error corpus: every status of SPEC §7, malformed bodies, weird model names, auth."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvctl.config import Config
from kvctl.errors import UsageError
from kvctl.router.server import check_bind

from helpers import BROKEN_ENGINE, Procs, free_port, kvctl, sim_instance, start_engine, start_router, wait_for, wait_http_ok, write_config

LIMIT = 65536


def _shaped(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, str]]:
    tmp_path: Path = tmp_path_factory.mktemp("errors")
    broken_port, cut_port, dead_port = free_port(), free_port(), free_port()
    instances = [
        sim_instance("good", name="good"),
        sim_instance("slow", name="slow", ttft_ms=5000),
        {"model": "broken", "name": "broken", "engine": "sim", "port": broken_port, "external": True},
        {"model": "cut", "name": "cut", "engine": "sim", "port": cut_port, "external": True},
        {"model": "dead", "name": "dead", "engine": "sim", "port": dead_port, "external": True},
    ]
    config = write_config(tmp_path, instances, router={"max_body_bytes": LIMIT, "request_timeout_seconds": 1.0}, sleep_manager={"wake_timeout_seconds": 1.5})
    with Procs() as procs:
        for inst in config.instances[:2]:
            start_engine(procs, inst)
        for port, mode in ((broken_port, "drop"), (cut_port, "cut")):
            procs.start([sys.executable, "-c", BROKEN_ENGINE, str(port), mode])
            wait_http_ok(f"http://127.0.0.1:{port}/health")
        base = start_router(procs, config, awake=False)
        wait_for(
            lambda: all(httpx.get(f"{base}/health/{m}").json()["state"] == "awake" for m in ("good", "slow", "broken", "cut")),
            what="good, slow, broken and cut awake",
        )
        yield config, base


def _post(base: str, body: bytes | str, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(base + path, content=body if isinstance(body, bytes) else body.encode(), headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (b"[" * 50000, "invalid_json"),  # deep nesting: a RecursionError, not a 500
        (b"[]", "invalid_body"),
        (b'"a string"', "invalid_body"),
        (b"42", "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "invalid_model"),
        (b'{"model": null}', "invalid_model"),
        (b'{"model": 5}', "invalid_model"),
        (b'{"model": ["good"]}', "invalid_model"),
        (b'{"model": {"name": "good"}}', "invalid_model"),
        (b'{"model": ""}', "invalid_model"),
    ],
)
def test_malformed_bodies_are_400(stack: tuple[Config, str], body: bytes, code: str) -> None:
    _, base = stack
    _shaped(_post(base, body), 400, code)


@pytest.mark.parametrize("name", ["模型/ü", "../../etc/passwd", "../good", " good", "good\u0000", "a" * 50000, "%2Fgood", "GOOD", "\U0001f600"])
def test_unknown_and_weird_model_names_are_404(stack: tuple[Config, str], name: str) -> None:
    _, base = stack
    error = _shaped(_post(base, json.dumps({"model": name, "messages": []})), 404, "model_not_found")
    assert error["param"] == "model" and len(error["message"]) < 400  # a huge name is not echoed whole


def test_too_large_bodies_are_413(stack: tuple[Config, str]) -> None:
    config, base = stack
    port = config.router.port
    # Declared too large: refused on the header, before any of the body is read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the router closes the connection after answering
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer

    # Chunked (no declared size): refused while reading, once past the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "good", "prompt": "'
        for _ in range(LIMIT // 16384):
            yield b"x" * 16384

    _shaped(httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413, "request_too_large")
    # Just under the limit is fine.
    padding = "x" * (LIMIT - 200)
    assert _post(base, json.dumps({"model": "good", "prompt": padding, "max_tokens": 1}), "/v1/completions").status_code == 200


def test_engine_failures_are_502_503_504(stack: tuple[Config, str]) -> None:
    _, base = stack
    body = json.dumps({"model": "broken", "prompt": "x", "max_tokens": 2})
    assert "broken" in _shaped(_post(base, body, "/v1/completions"), 502, "engine_failed")["message"]
    slow = _shaped(_post(base, json.dumps({"model": "slow", "prompt": "x", "max_tokens": 2}), "/v1/completions"), 504, "upstream_timeout")
    assert "slow" in slow["message"]
    # A non-streamed answer cut mid-body: the connection is closed, never a short "complete" body.
    with pytest.raises(httpx.RemoteProtocolError):
        _post(base, json.dumps({"model": "cut", "prompt": "x"}), "/v1/completions")
    dead = _post(base, json.dumps({"model": "dead", "prompt": "x"}), "/v1/completions")
    error = _shaped(dead, 503)
    assert "dead" in error["message"] and int(dead.headers["retry-after"]) > 0


def test_router_healthy_after_the_corpus_and_never_500(stack: tuple[Config, str]) -> None:
    _, base = stack
    for path in ("/v1/completions", "/v1/embeddings", "/v1/chat/completions"):
        for body in (b"{", b"[]", b'{"model": 1}', b'{"model": "nope"}'):
            assert _post(base, body, path).status_code < 500
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert _post(base, json.dumps({"model": "good", "prompt": "still", "max_tokens": 2}), "/v1/completions").status_code == 200


def test_queue_full_is_429_with_retry_after(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("m", name="m")], router={"max_queue_per_model": 0})
    start_engine(procs, config.instances[0])
    base = start_router(procs, config)
    assert httpx.post(base + "/models/m/sleep", timeout=30).json()["state"] == "asleep"
    full = _post(base, json.dumps({"model": "m", "prompt": "x"}), "/v1/completions")
    _shaped(full, 429, "queue_full")
    assert int(full.headers["retry-after"]) > 0


def test_auth(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m", name="m")], router={"api_keys": ["key-one", "key-two"], "admin_token": "admin-secret"})
    start_engine(procs, config.instances[0])
    base = start_router(procs, config, token="key-one")
    body = {"model": "org/m", "prompt": "x", "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "key-one"},
        {"Authorization": "Basic key-one"},
        {"Authorization": "Bearer key-one-and-more"},
    ):
        _shaped(httpx.post(base + "/v1/completions", json=body, headers=headers), 401, "invalid_api_key")
        _shaped(httpx.get(base + "/v1/models", headers=headers), 401)
        _shaped(httpx.get(base + "/traffic/stats", headers=headers), 401)
    assert httpx.get(base + "/health").status_code == 200  # stays open for probes
    client = openai.OpenAI(base_url=base + "/v1", api_key="key-two", max_retries=0)
    assert client.completions.create(model="org/m", prompt="x", max_tokens=2).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).completions.create(model="org/m", prompt="x")
    # Mutating admin routes want the admin token, not an api key.
    _shaped(httpx.post(base + "/models/org/m/sleep", headers={"Authorization": "Bearer key-one"}), 401)
    _shaped(httpx.post(base + "/action/wakeup/org%2Fm"), 401)
    slept = httpx.post(base + "/models/org/m/sleep", headers={"Authorization": "Bearer admin-secret"}, timeout=30)
    assert slept.status_code == 200 and slept.json() == {
        "model_name": "org/m",
        "success": True,
        "message": slept.json()["message"],
        "state": "asleep",
        "evicted": [],
    }
    woke = httpx.post(base + "/action/wakeup/org%2Fm", headers={"Authorization": "Bearer admin-secret"}, timeout=30)
    assert woke.status_code == 200 and woke.json()["state"] == "awake"
    assert httpx.get(base + "/sleep/status", headers={"Authorization": "Bearer admin-secret"}).status_code == 200


def test_non_loopback_without_keys_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("m", name="m")])
    path = tmp_path / "open.yaml"
    data = json.loads(config.path.read_text())
    data["router"]["router_host"] = "0.0.0.0"
    path.write_text(json.dumps(data))
    done = kvctl("router", "-c", str(path), timeout=60)
    assert done.returncode != 0
    assert "api_keys" in done.stderr and "Traceback" not in done.stderr
    # serve() checks again, whatever built the Config.
    wide = dataclasses.replace(config, router=dataclasses.replace(config.router, host="0.0.0.0"))
    with pytest.raises(UsageError, match="api_keys"):
        check_bind(wide)
    check_bind(dataclasses.replace(wide, router=dataclasses.replace(wide.router, allow_unauthenticated=True)))
    check_bind(dataclasses.replace(wide, router=dataclasses.replace(wide.router, api_keys=("k",))))
