"""`kvctl stats`: per-model state, load, traffic and memory, read from the router's API.

`gather` joins three router answers (`/traffic/stats?window=`, `/models`, `/sleep/status`)
into one row per configured model, in config order; `readings` polls it for `--live`,
keeping (not raising) an unreachable router. `kvctl.display` draws both. The JSON shape of
`gather` is what `kvctl stats --json` prints (documented in README).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvctl.client import RouterClient, RouterRequestError, RouterUnreachable, json_object
from kvctl.config import Config


def gather(client: RouterClient, config: Config, window: float) -> dict[str, Any]:
    """One snapshot: {"router", "window_seconds", "auto_sleep_enabled", "idle_threshold_seconds", "models": {model: row}}."""
    traffic = json_object(client.get("/traffic/stats", window=f"{window:g}").get("traffic_stats"))
    models = json_object(client.get("/models").get("models"))
    sleep = json_object(client.get("/sleep/status"))
    candidates = set(sleep.get("sleep_candidates") or ())
    rows = {
        model: _row(model, instances, json_object(traffic.get(model)), json_object(models.get(model)), candidates)
        for model, instances in config.models().items()
    }
    return {
        "router": client.url,
        "window_seconds": window,
        "auto_sleep_enabled": sleep.get("auto_sleep_enabled"),
        "idle_threshold_seconds": sleep.get("idle_threshold_seconds"),
        "models": rows,
    }


def _row(model: str, configured: list[Any], traffic: dict[str, Any], info: dict[str, Any], candidates: set[str]) -> dict[str, Any]:
    instances = [i for i in info.get("instances") or () if isinstance(i, dict)]
    awake = [i for i in instances if i.get("state") == "awake"]
    # memory_gb comes from the config; it is "known" when any replica of the model declares it.
    memory = [i.get("memory_gb") for i in awake if isinstance(i.get("memory_gb"), (int, float))]
    declared = any(inst.memory_gb is not None for inst in configured)
    total = traffic.get("lifetime_total_requests", traffic.get("total_requests"))
    ok = traffic.get("lifetime_successful_requests", traffic.get("successful_requests"))
    failed = traffic.get("lifetime_failed_requests", traffic.get("failed_requests"))
    return {
        "state": info.get("state", "unknown"),
        "instances": len(instances) or len(configured),
        "instances_awake": len(awake),
        "in_flight": traffic.get("in_flight", sum(i.get("in_flight", 0) for i in instances)),
        "queued": traffic.get("queued", 0),
        "request_rate": traffic.get("request_rate"),
        "window_requests": traffic.get("total_requests"),
        "total_requests": total,
        "successful_requests": ok,
        "failed_requests": failed,
        "success_rate": 100.0 * ok / total if isinstance(ok, int) and isinstance(total, int) and total else None,
        "latency_p50_ms": _ms(traffic.get("p50_latency")),
        "latency_p95_ms": _ms(traffic.get("p95_latency")),
        "ttft_p50_ms": _ms(traffic.get("p50_ttft")),
        "idle_seconds": traffic.get("idle_time_seconds"),
        "sleep_candidate": model in candidates,
        "memory_gb": sum(memory) if declared else None,
        "kv": traffic.get("kv"),  # kvcached: {"used_bytes", "limit_bytes", "prealloc_bytes"} of its instances, or null
    }


def _ms(seconds: Any) -> float | None:
    return seconds * 1000 if isinstance(seconds, (int, float)) else None


@dataclass(frozen=True)
class Reading:
    """One poll of `stats --live`: the last snapshot gathered (None before the first), when it
    was gathered, and this poll's failure as (title, message) when it failed."""

    snapshot: dict[str, Any] | None
    at: float
    error: tuple[str, str] | None = None


def readings(client: RouterClient, config: Config, window: float, interval: float) -> Iterator[Reading]:
    """A reading every `interval` seconds, forever (the caller ends it: Ctrl-C)."""
    last: dict[str, Any] | None = None
    last_at = 0.0
    while True:
        error = None
        try:
            last, last_at = gather(client, config, window), time.time()
        except RouterUnreachable as exc:
            error = ("router unreachable", str(exc))
        except RouterRequestError as exc:
            error = ("router error", str(exc))
        yield Reading(last, last_at, error)
        time.sleep(interval)  # the refresh period itself, not a wait for a condition
