"""Helpers for the router tests: run the real router (`python -m kvctl router`) on a config."""

from __future__ import annotations

import json
import socket
import struct
import sys

import httpx

from kvctl.config import Config

from conftest import Procs, wait_for, wait_http_ok


def start_router(procs: Procs, config: Config, *, awake: bool = True, token: str | None = None) -> str:
    """Start the router on `config`; wait until it answers (and every model is awake)."""
    procs.start([sys.executable, "-m", "kvctl", "router", "-c", str(config.path)])
    base = config.router.url
    wait_http_ok(base + "/health")
    if awake:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        wait_for(
            lambda: all(m["state"] == "awake" for m in httpx.get(base + "/models", headers=headers, timeout=5).json()["models"].values()),
            what="every model awake",
        )
    return base


def open_stream(port: int, model: str, max_tokens: int = 1000) -> socket.socket:
    """A raw client that sent a streamed completion request and read its first bytes."""
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in sock.recv(65536)
    return sock


def cut(sock: socket.socket, rst: bool) -> None:
    """Drop a client connection mid-response: a plain close or a TCP reset."""
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
