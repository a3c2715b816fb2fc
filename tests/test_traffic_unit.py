"""The router's traffic windows (kvctl/router/traffic.py) in process, on a clock the test moves."""

from __future__ import annotations

import tracemalloc

import pytest

from kvctl.router import traffic
from kvctl.router.traffic import MAX_WINDOW_SECONDS, TrafficMonitor


class Clock:
    """Stands in for the `time` module inside traffic.py: wall-clock seconds the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(1_000_000.0)
    monkeypatch.setattr(traffic, "time", clock)
    return clock


def test_counts_rates_and_percentiles_cover_only_the_window(clock: Clock) -> None:
    monitor = TrafficMonitor(["m"], idle_threshold=300)
    start = clock.now
    for ok in (True, True, True, False):  # t = start: four requests of 1 s
        monitor.record("m", ok=ok, latency=1.0, ttft=0.5)
    clock.now = start + 30
    monitor.record("m", ok=True, latency=0.1, ttft=0.05)  # t = start+30: two requests of 0.1 s
    monitor.record("m", ok=True, latency=0.1, ttft=0.05)

    clock.now = start + 40
    wide, narrow = monitor.stats("m", window=60), monitor.stats("m", window=20)
    assert (wide["total_requests"], wide["successful_requests"], wide["failed_requests"]) == (6, 5, 1)
    assert wide["request_rate"] == pytest.approx(6 / 60) and wide["avg_response_time"] == pytest.approx(4.2 / 6)
    assert (narrow["total_requests"], narrow["failed_requests"]) == (2, 0)
    assert narrow["request_rate"] == pytest.approx(2 / 20)
    assert narrow["p50_latency"] == pytest.approx(0.1) and narrow["p95_ttft"] == pytest.approx(0.05)
    assert wide["p50_latency"] == pytest.approx(1.0) and wide["p95_latency"] == pytest.approx(1.0)


def test_requests_older_than_the_window_drop_out_but_lifetime_totals_stay(clock: Clock) -> None:
    monitor = TrafficMonitor(["m"], idle_threshold=300)
    for _ in range(5):
        monitor.record("m", ok=True, latency=0.2, ttft=0.1)
    clock.now += 61
    stats = monitor.stats("m", window=60)
    assert (stats["total_requests"], stats["request_rate"], stats["avg_response_time"]) == (0, 0.0, None)
    assert (stats["p50_latency"], stats["p95_latency"], stats["avg_ttft"], stats["p50_ttft"]) == (None, None, None, None)
    assert (stats["lifetime_total_requests"], stats["lifetime_successful_requests"]) == (5, 5)
    assert monitor.stats("m", window=MAX_WINDOW_SECONDS)["total_requests"] == 5


def test_a_second_reused_after_the_longest_window_forgets_what_it_held(clock: Clock) -> None:
    monitor = TrafficMonitor(["m"], idle_threshold=300)
    monitor.record("m", ok=False, latency=9.0)
    clock.now += MAX_WINDOW_SECONDS  # the same one-second bucket of the ring
    monitor.record("m", ok=True, latency=1.0)
    stats = monitor.stats("m", window=MAX_WINDOW_SECONDS)
    assert (stats["total_requests"], stats["failed_requests"], stats["avg_response_time"]) == (1, 0, 1.0)
    assert stats["lifetime_total_requests"] == 2


def test_idle_time_runs_from_the_last_request_and_is_zero_while_one_is_in_flight(clock: Clock) -> None:
    in_flight = {"m": 0}
    monitor = TrafficMonitor(["m"], idle_threshold=60, in_flight=in_flight.__getitem__)
    clock.now += 100
    assert monitor.idle_seconds("m") == 100  # no request yet: idle since the monitor started
    monitor.record("m", ok=True, latency=1.0)
    clock.now += 30
    stats = monitor.stats("m", window=60)
    assert (stats["idle_time_seconds"], stats["is_idle"], stats["last_activity_time"]) == (30, False, clock.now - 30)
    assert monitor.idle_models(60) == [] and monitor.active_models(60) == ["m"]
    clock.now += 30
    assert monitor.idle_models(60) == ["m"]
    in_flight["m"] = 1
    assert monitor.idle_seconds("m") == 0 and monitor.active_models(60) == ["m"]


def test_state_is_bounded_by_the_configured_models_whatever_the_traffic(clock: Clock) -> None:
    models = [f"org/model-{i}" for i in range(20)]
    monitor = TrafficMonitor(models, idle_threshold=300)

    def hour_of_traffic() -> None:
        for second in range(1200):  # a request to every model every 3 s: more than the 1024 samples kept
            clock.now += 3
            for model in models:
                monitor.record(model, ok=True, latency=0.01, ttft=0.001)
            monitor.record(f"unknown-{second}", ok=True, latency=0.01)  # not configured: nothing kept

    tracemalloc.start()
    try:
        hour_of_traffic()  # fills every sample ring
        assert monitor.size() == len(models) * (1 + 2 * 1024) and monitor.models == models
        before = tracemalloc.get_traced_memory()[0]
        hour_of_traffic()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"traffic state grew by {grown} bytes in a second hour"
    assert monitor.size() == len(models) * (1 + 2 * 1024)


def test_a_reload_keeps_the_history_of_kept_models_and_drops_removed_ones(clock: Clock) -> None:
    monitor = TrafficMonitor(["kept", "removed"], idle_threshold=300)
    monitor.record("kept", ok=True, latency=1.0)
    monitor.record("removed", ok=True, latency=1.0)
    monitor.set_models(["kept", "added"], idle_threshold=120)
    assert monitor.models == ["kept", "added"] and "removed" not in monitor and monitor.idle_threshold == 120
    assert monitor.stats("kept", window=60)["total_requests"] == 1
    assert monitor.stats("added", window=60)["lifetime_total_requests"] == 0
    assert monitor.size() == 2 + 1  # two models, one latency sample
