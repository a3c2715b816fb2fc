"""Per-model traffic statistics with memory bounded however long the router runs.

Only configured models have state (created up front); a request naming anything else
records nothing. Counts over a window come from one-second buckets in a ring (windows
up to MAX_WINDOW_SECONDS); latency and TTFT percentiles from the most recent
_SAMPLES requests inside the window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kvctl.percentile import percentile

MAX_WINDOW_SECONDS = 3600
_SAMPLES = 1024


class _ModelTraffic:
    __slots__ = (
        "_count",
        "_failed",
        "_lat_sum",
        "_ok",
        "_sec",
        "failed",
        "last_activity",
        "latencies",
        "ok",
        "since",
        "total",
        "ttfts",
    )

    def __init__(self, now: float) -> None:
        self.total = self.ok = self.failed = 0
        self._sec = [-1] * MAX_WINDOW_SECONDS
        self._count = [0] * MAX_WINDOW_SECONDS
        self._ok = [0] * MAX_WINDOW_SECONDS
        self._failed = [0] * MAX_WINDOW_SECONDS
        self._lat_sum = [0.0] * MAX_WINDOW_SECONDS
        self.latencies: deque[tuple[float, float]] = deque(maxlen=_SAMPLES)
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=_SAMPLES)
        self.last_activity: float | None = None  # wall clock of the last request's last byte
        self.since = now  # idle is measured from here until the first request finishes

    def record(self, now: float, ok: bool, latency: float, ttft: float | None) -> None:
        sec = int(now)
        slot = sec % MAX_WINDOW_SECONDS
        if self._sec[slot] != sec:
            self._sec[slot] = sec
            self._count[slot] = self._ok[slot] = self._failed[slot] = 0
            self._lat_sum[slot] = 0.0
        self._count[slot] += 1
        self._lat_sum[slot] += latency
        self.total += 1
        if ok:
            self.ok += 1
            self._ok[slot] += 1
        else:
            self.failed += 1
            self._failed[slot] += 1
        self.latencies.append((now, latency))
        if ttft is not None:
            self.ttfts.append((now, ttft))
        self.last_activity = now

    def window(self, now: float, seconds: float) -> tuple[int, int, int, float]:
        """(requests, ok, failed, latency sum) over the last `seconds`."""
        newest = int(now)
        oldest = newest - int(seconds) + 1
        count = ok = failed = 0
        lat = 0.0
        for slot, sec in enumerate(self._sec):
            if oldest <= sec <= newest:
                count += self._count[slot]
                ok += self._ok[slot]
                failed += self._failed[slot]
                lat += self._lat_sum[slot]
        return count, ok, failed, lat


class TrafficMonitor:
    """Traffic per configured model. `in_flight`/`queued` come from the lifecycle."""

    def __init__(
        self, models: Iterable[str], idle_threshold: float, in_flight: Callable[[str], int] = lambda m: 0, queued: Callable[[str], int] = lambda m: 0
    ) -> None:
        now = time.time()
        self._models = {model: _ModelTraffic(now) for model in models}
        self.idle_threshold = idle_threshold
        self._in_flight = in_flight
        self._queued = queued

    def set_models(self, models: Iterable[str], idle_threshold: float) -> None:
        """A reload: new models start empty, removed ones are dropped, the rest keep their history."""
        now = time.time()
        self._models = {model: self._models.get(model) or _ModelTraffic(now) for model in models}
        self.idle_threshold = idle_threshold

    def __contains__(self, model: str) -> bool:
        return model in self._models

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def record(self, model: str, ok: bool, latency: float, ttft: float | None = None) -> None:
        """A request finished (its last byte was sent, or it failed). Unknown models: ignored."""
        state = self._models.get(model)
        if state is not None:
            state.record(time.time(), ok, latency, ttft)

    def size(self) -> int:
        """Entries held, for tests that check the state does not grow with client input."""
        return len(self._models) + sum(len(s.latencies) + len(s.ttfts) for s in self._models.values())

    def idle_seconds(self, model: str, now: float | None = None) -> float:
        if self._in_flight(model) or self._queued(model):
            return 0.0
        state = self._models[model]
        now = time.time() if now is None else now
        return max(0.0, now - (state.last_activity or state.since))

    def stats(self, model: str, window: float, idle_threshold: float | None = None) -> dict[str, Any]:
        state = self._models[model]
        now = time.time()
        count, ok, failed, lat = state.window(now, window)
        cutoff = now - window
        latencies = [v for t, v in state.latencies if t >= cutoff]
        ttfts = [v for t, v in state.ttfts if t >= cutoff]
        idle = self.idle_seconds(model, now)
        threshold = self.idle_threshold if idle_threshold is None else idle_threshold
        return {
            "model_name": model,
            "total_requests": count,
            "successful_requests": ok,
            "failed_requests": failed,
            "lifetime_total_requests": state.total,
            "lifetime_successful_requests": state.ok,
            "lifetime_failed_requests": state.failed,
            "request_rate": count / window,
            "avg_response_time": lat / count if count else None,
            "p50_latency": percentile(latencies, 50),
            "p95_latency": percentile(latencies, 95),
            "avg_ttft": sum(ttfts) / len(ttfts) if ttfts else None,
            "p50_ttft": percentile(ttfts, 50),
            "p95_ttft": percentile(ttfts, 95),
            "last_activity_time": state.last_activity,
            "idle_time_seconds": idle,
            "is_idle": idle >= threshold,
            "in_flight": self._in_flight(model),
            "queued": self._queued(model),
        }

    def idle_models(self, threshold: float) -> list[str]:
        return [m for m in self._models if self.idle_seconds(m) >= threshold]

    def active_models(self, threshold: float) -> list[str]:
        return [m for m in self._models if self.idle_seconds(m) < threshold]
