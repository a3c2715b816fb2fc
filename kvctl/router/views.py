"""The lifecycle as JSON: the rows of /models and /health/all, and /sleep/status. Read-only."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvctl.router import policy
from kvctl.router.states import SLEEP_CAUSES, S, Slot

if TYPE_CHECKING:
    from kvctl.router.lifecycle import Lifecycle


def instances(lc: Lifecycle, model: str | None = None) -> list[dict[str, Any]]:
    """One row per instance (of `model`), in config order; removed ones still draining are left out."""
    now = time.monotonic()
    return [_row(lc, slot, now) for slot in lc.slots if not slot.retiring and (model is None or slot.inst.model == model)]


def _row(lc: Lifecycle, slot: Slot, now: float) -> dict[str, Any]:
    sleep = slot.inst.sleep
    return {
        "name": slot.inst.name,
        "model": slot.inst.model,
        "engine": slot.inst.engine,
        "url": slot.inst.url,
        "state": slot.state.value,
        "healthy": slot.state not in (S.DOWN, S.FAILED) and slot.failures == 0,
        "in_flight": slot.in_flight,
        "memory_gb": slot.inst.memory_gb,
        "state_since": slot.since,
        "cause": slot.sleep_cause,
        "failure": slot.failure,
        "policy": {
            "idle_seconds": policy.idle_threshold(sleep, lc.sm),
            "start": sleep.start,
            "stop_after_seconds": sleep.stop_after_seconds,
            "priority": sleep.priority,
            "verify": sleep.verify,
            "sleep_enabled": sleep.enabled,
        },
        "sleeps_in": _countdown(lc.sleep_due(slot, now)),
        "stops_in": _countdown(lc.stop_due(slot)),
    }


def _countdown(due: float | None) -> float | None:
    return None if due is None else round(max(0.0, due), 1)


def sleep_status(lc: Lifecycle) -> dict[str, Any]:
    """/sleep/status: the models whose every instance sleeps, since when and why."""
    now = time.time()
    sleeping: dict[str, dict[str, Any]] = {}
    for model, slots in lc.by_model.items():
        if all(slot.state is S.ASLEEP for slot in slots):
            start = min(slot.asleep_since or now for slot in slots)
            causes = [slot.sleep_cause for slot in slots]
            cause = next((c for c in SLEEP_CAUSES if c in causes), None)
            sleeping[model] = {"sleep_start_time": start, "sleep_duration": now - start, "manual_sleep": cause == "manual", "cause": cause}
    return {
        "sleeping_models": sleeping,
        "sleep_candidates": lc.sleep_candidates(),
        "auto_sleep_enabled": lc.sm.auto_sleep_enabled,
        "idle_threshold_seconds": lc.sm.idle_threshold_seconds,
        "wake_on_request": lc.sm.wakeup_on_request,
    }
