"""The short history the dashboard charts (SPEC §12), so a freshly opened `/ui` shows the
last 15 minutes at once: per model, requests per second, median TTFT and the GPU memory its
awake instances hold, sampled every STEP_SECONDS by one task.

Sampling reads what the router keeps anyway (the traffic counters and instance states): no
work per request, and a fixed number of samples however long the router runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from kvctl.router.lifecycle import Lifecycle
from kvctl.router.traffic import TrafficMonitor

STEP_SECONDS = 5.0
SPAN_SECONDS = 900.0


@dataclass(frozen=True)
class _Point:
    request_rate: float
    ttft_p50: float | None  # seconds
    memory_gb: float  # held by the model's instances that are awake, draining or waking


@dataclass(frozen=True)
class _Sample:
    time: float
    models: dict[str, _Point]


class History:
    def __init__(self, traffic: TrafficMonitor, lifecycle: Lifecycle) -> None:
        self._traffic = traffic
        self._lifecycle = lifecycle
        self._samples: deque[_Sample] = deque(maxlen=int(SPAN_SECONDS / STEP_SECONDS) + 1)
        self._totals: dict[str, int] = {}  # lifetime request count per model at the last sample
        self._last = time.time()

    async def run(self) -> None:
        """Sample until cancelled (the router's lifespan owns the task)."""
        while True:
            await asyncio.sleep(STEP_SECONDS)
            self.sample()

    def sample(self) -> None:
        now = time.time()
        elapsed = max(now - self._last, 1e-3)
        held: dict[str, float] = {}
        for slot in self._lifecycle.slots:  # as the budget counts it (Slot.memory: declared, measured KV, or NVML)
            if slot.holds_memory:
                held[slot.inst.model] = held.get(slot.inst.model, 0.0) + slot.memory
        points: dict[str, _Point] = {}
        totals: dict[str, int] = {}
        for model in self._traffic.models:  # the configured models now (a reload changes them)
            stats = self._traffic.stats(model, STEP_SECONDS)
            total = totals[model] = stats["lifetime_total_requests"]
            # The lifetime count's growth, so consecutive samples neither overlap nor leave gaps
            # (a model new to the traffic monitor, at start or added by a reload, starts at 0).
            rate = (total - self._totals.get(model, 0)) / elapsed
            points[model] = _Point(rate, stats["p50_ttft"], held.get(model, 0.0))
        self._samples.append(_Sample(now, points))
        self._totals, self._last = totals, now

    def as_json(self, since: float = 0.0) -> dict[str, Any]:
        """Samples newer than `since` (a unix time; 0: all), as one column per figure."""
        samples = [s for s in self._samples if s.time > since]
        models: dict[str, dict[str, list[float | None]]] = {}
        for model in self._traffic.models:
            points = [s.models.get(model) for s in samples]  # None before a reload added the model
            models[model] = {
                "request_rate": [None if p is None else round(p.request_rate, 3) for p in points],
                "ttft_p50": [None if p is None or p.ttft_p50 is None else round(p.ttft_p50, 4) for p in points],
                "memory_gb": [None if p is None else round(p.memory_gb, 3) for p in points],
            }
        return {"now": time.time(), "step_seconds": STEP_SECONDS, "span_seconds": SPAN_SECONDS, "time": [s.time for s in samples], "models": models}
