"""Prometheus metrics of the router, in a registry of their own (one per app).

The proxy counts requests, errors, latency and TTFT; the lifecycle counts sleeps and wakes
and their duration. Gauges that mirror lifecycle state (in-flight, queued, state) are
refreshed from the lifecycle when /metrics is scraped, so the hot path never touches them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest

from kvctl.router.states import InstanceState

if TYPE_CHECKING:
    from kvctl.config import Instance
    from kvctl.kvcached import KvInfo

STATES = [state.value for state in InstanceState]
# LLM requests last from milliseconds (embeddings, errors) to many minutes (long generations).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
_WAKE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))


class Mirrored(Protocol):
    """What the gauges mirror (the lifecycle), per model."""

    def in_flight(self, model: str) -> int: ...
    def queued(self, model: str) -> int: ...
    def model_state(self, model: str) -> str: ...


class Metrics:
    """Every metric the router exposes; label values are configured model names only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_total = Counter("kvctl_requests", "Requests forwarded, by model and HTTP status", ["model", "status"], registry=r)
        self.errors_total = Counter("kvctl_errors", "Requests that failed, by model and cause", ["model", "reason"], registry=r)
        self.request_latency_seconds = Histogram(
            "kvctl_request_latency_seconds", "Time from request to last byte sent", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft_seconds = Histogram("kvctl_ttft_seconds", "Time to first streamed byte", ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("kvctl_in_flight", "Requests being served", ["model"], registry=r)
        self.queued = Gauge("kvctl_queued", "Requests waiting for a wake or a free instance", ["model"], registry=r)
        self.state = Enum("kvctl_model_state", "Aggregate model state", ["model"], states=STATES, registry=r)
        self.sleeps_total = Counter(
            "kvctl_sleeps", "Times an instance of a model was put to sleep, by cause (manual, idle, budget, policy)", ["model", "cause"], registry=r
        )
        self.wakes_total = Counter("kvctl_wakes", "Wakes, by result and cause (request, manual)", ["model", "result", "cause"], registry=r)
        self.starts_total = Counter("kvctl_starts", "On-demand starts of stopped instances, by cause", ["model", "cause"], registry=r)
        self.stops_total = Counter("kvctl_stops", "Instances stopped by kvctl, by cause (manual, policy)", ["model", "cause"], registry=r)
        self.verifications_total = Counter("kvctl_verifications", "Verified wakes, by result (ok, reloaded, restarted)", ["model", "result"], registry=r)
        self.wake_duration_seconds = Histogram("kvctl_wake_duration_seconds", "Time a wake took", ["model"], buckets=_WAKE_BUCKETS, registry=r)
        # kvcached segments (SPEC §13); an instance whose segment is unknown has no sample.
        self.kv_used_bytes = Gauge("kvctl_kv_used_bytes", "KV cache in use (kvcached)", ["model", "instance"], registry=r)
        self.kv_limit_bytes = Gauge("kvctl_kv_limit_bytes", "KV cache limit (kvcached)", ["model", "instance"], registry=r)
        self.kv_prealloc_bytes = Gauge("kvctl_kv_prealloc_bytes", "KV cache preallocated, not yet in use (kvcached)", ["model", "instance"], registry=r)

    def render(self, lifecycle: Mirrored, models: list[str], kv: Iterable[tuple[Instance, KvInfo | None]] = ()) -> bytes:
        """Refresh the lifecycle mirrors and the KV-cache gauges, then produce the Prometheus text format."""
        gauges = (self.kv_used_bytes, self.kv_limit_bytes, self.kv_prealloc_bytes)
        for gauge in gauges:
            gauge.clear()  # an instance removed, or its segment gone, leaves no stale sample
        for inst, info in kv:
            if info is not None:
                for gauge, value in zip(gauges, (info.used_bytes, info.limit_bytes, info.prealloc_bytes), strict=True):
                    gauge.labels(inst.model, inst.name).set(value)
        for model in models:
            self.in_flight.labels(model).set(lifecycle.in_flight(model))
            self.queued.labels(model).set(lifecycle.queued(model))
            state = lifecycle.model_state(model)
            if state in STATES:
                self.state.labels(model).state(state)
        return generate_latest(self.registry)
