"""Traffic statistics: bounded state whatever clients send, windows and percentiles."""

from __future__ import annotations

import asyncio
import gc
import json
import random
from pathlib import Path

from uvicorn.protocols.http.flow_control import FlowControl

from kvctl.router import create_app
from kvctl.router.proxy import Exchange
from kvctl.router.traffic import MAX_WINDOW_SECONDS, TrafficMonitor

from helpers import sim_instance, write_config


class _Transport(asyncio.Transport):
    """Collects what the proxy writes to the client (no sockets: 100k requests take seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _call(app, body: bytes) -> int:
    """One POST /v1/completions handed to the proxy as kvctl's HTTP protocol hands it."""
    transport = _Transport()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    ex = Exchange(transport, FlowControl(transport), headers, b"/v1/completions", True, False, app.proxy.max_body, lambda: None)
    ex.add_body(body)
    ex.end_body()
    await app.proxy.serve(ex)
    return int(bytes(transport.written).split(b" ", 2)[1])


def _samples(app) -> int:
    return sum(len(metric.samples) for metric in app.metrics.registry.collect())


async def test_unknown_models_create_no_state(tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("org/known", name="known")])
    app = create_app(config)
    before = (app.traffic.size(), _samples(app), len(app.proxy._counters), app.lifecycle.queued("org/known"))
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz/.%-_ü模"
    statuses = set()
    for _ in range(100_000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 64)))
        statuses.add(await _call(app, json.dumps({"model": name, "prompt": "x"}).encode()))
    assert statuses == {404}
    assert (app.traffic.size(), _samples(app), len(app.proxy._counters), app.lifecycle.queued("org/known")) == before
    assert app.traffic.models == ["org/known"]


def test_windows_rates_and_percentiles() -> None:
    monitor = TrafficMonitor(["a"], idle_threshold=300)
    for i in range(100):
        monitor.record("a", ok=i % 10 != 0, latency=(i + 1) / 100, ttft=0.01 if i % 2 else None)
    monitor.record("not-configured", ok=True, latency=1.0)  # ignored
    stats = monitor.stats("a", window=60)
    assert stats["total_requests"] == 100 and stats["successful_requests"] == 90 and stats["failed_requests"] == 10
    assert abs(stats["request_rate"] - 100 / 60) < 1e-9
    assert abs(stats["avg_response_time"] - 0.505) < 1e-9
    # Latencies 0.01..1.00: interpolated between closest ranks (as `kvctl bench` does).
    assert abs(stats["p50_latency"] - 0.505) < 1e-9 and abs(stats["p95_latency"] - 0.9505) < 1e-9
    assert stats["p50_ttft"] == 0.01 and stats["is_idle"] is False
    assert monitor.idle_models(0) == ["a"] and monitor.active_models(300) == ["a"]
    # Memory is bounded: a long run keeps a fixed number of samples.
    sizes = []
    for _ in range(3):
        for _ in range(10_000):
            monitor.record("a", ok=True, latency=0.1, ttft=0.01)
        sizes.append(monitor.size())
    assert sizes == [1 + 2 * 1024] * 3
    assert monitor.stats("a", window=MAX_WINDOW_SECONDS)["lifetime_total_requests"] == 30_100


async def test_a_served_request_leaves_no_cyclic_garbage(tmp_path: Path) -> None:
    """Each request's Exchange, task and buffers are freed by reference counting: a cycle left
    per request made the garbage collector cost ~15 µs a request (README, Performance)."""
    config = write_config(tmp_path, [sim_instance("org/known", name="known")])
    app = create_app(config)
    body = json.dumps({"model": "org/unknown", "prompt": "x"}).encode()
    assert await _call(app, body) == 404  # warm: lazily built objects exist from now on
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            assert await _call(app, body) == 404
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable < 200, f"{unreachable} objects in cycles after 200 requests"
