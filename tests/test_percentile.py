"""One percentile definition: the router's traffic figures and `kvctl bench` agree."""

from __future__ import annotations

import statistics

from kvctl.bench import _distribution
from kvctl.percentile import percentile
from kvctl.router.traffic import TrafficMonitor


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == statistics.quantiles([1, 2, 3, 4], n=100, method="inclusive")[89]
    values = [float(v) for v in range(101)]
    assert [percentile(values, q) for q in (1, 50, 99)] == [1.0, 50.0, 99.0]


def test_traffic_stats_and_bench_agree_on_the_same_samples() -> None:
    latencies = [0.010, 0.020, 0.030, 0.045, 0.100, 0.250]
    traffic = TrafficMonitor(["m"], idle_threshold=60)
    for latency in latencies:
        traffic.record("m", True, latency, latency / 2)
    stats = traffic.stats("m", 60)
    bench = _distribution(latencies)
    assert stats["p50_latency"] is not None and bench["p50"] is not None
    assert abs(stats["p50_latency"] * 1000 - bench["p50"]) < 1e-9
    assert stats["p50_ttft"] == percentile([v / 2 for v in latencies], 50)
