"""Lifecycle policy as pure functions (SPEC §6, §15): who is idle, who stops, whom to put
to sleep to make room. The lifecycle builds small snapshots of its instances and acts on
the answers; nothing here awaits, calls an engine or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvctl.config import SleepManagerConfig, SleepSettings

_EPSILON = 1e-9


def idle_threshold(sleep: SleepSettings, sm: SleepManagerConfig) -> float | None:
    """Seconds of idleness after which an instance is put to sleep, or None for never.

    An instance's own `idle_seconds` applies whether or not auto-sleep is on globally (the
    operator asked for it on that instance); otherwise the global threshold, when on."""
    if not sleep.enabled:
        return None
    if sleep.idle_seconds is not None:
        return sleep.idle_seconds
    return sm.idle_threshold_seconds if sm.auto_sleep_enabled else None


def sleeps_in(idle_for: float, sleep: SleepSettings, sm: SleepManagerConfig) -> float | None:
    """Seconds until an awake, idle instance is put to sleep (None: it will not be)."""
    threshold = idle_threshold(sleep, sm)
    return None if threshold is None else max(0.0, threshold - idle_for)


def stops_in(asleep_for: float, sleep: SleepSettings) -> float | None:
    """Seconds until an asleep instance's process is stopped (None: it will not be)."""
    if sleep.stop_after_seconds is None:
        return None
    return max(0.0, sleep.stop_after_seconds - asleep_for)


@dataclass(frozen=True)
class Holder:
    """An awake instance that holds memory, as the budget sees it."""

    name: str
    model: str
    memory_gb: float
    priority: int
    last_used: float  # monotonic
    awake_for: float  # seconds since it became awake
    busy: bool  # requests in flight or queued for its model
    used_since_awake: bool  # it served something since it woke (it was woken for work)
    can_sleep: bool  # sleep enabled, and not the model being woken


def protected(holder: Holder, sm: SleepManagerConfig) -> bool:
    """A model woken for its queue keeps the GPU for min_awake_seconds while it has work,
    so two busy models take turns instead of swapping on every request."""
    return holder.awake_for < sm.min_awake_seconds and (holder.busy or holder.used_since_awake)


def choose_victims(holders: list[Holder], short_gb: float, sm: SleepManagerConfig, *, starving: bool) -> list[Holder] | None:
    """Instances to put to sleep so that `short_gb` more fits, or None when not possible now.

    Order: lower priority first, then idle before busy, then least recently used. A protected
    instance is spared unless a waiter has starved past max_swap_wait_seconds (`starving`).
    A busy victim is drained first (its requests finish; new ones queue)."""
    eligible = [h for h in holders if h.can_sleep and h.memory_gb > 0 and (starving or not protected(h, sm))]
    eligible.sort(key=lambda h: (h.priority, h.busy, h.last_used))
    victims: list[Holder] = []
    for holder in eligible:
        if short_gb <= _EPSILON:
            break
        victims.append(holder)
        short_gb -= holder.memory_gb
    return victims if short_gb <= _EPSILON else None


def next_protection_end(holders: list[Holder], sm: SleepManagerConfig) -> float | None:
    """Seconds until the first protected holder loses its protection (to wait no longer)."""
    ends = [sm.min_awake_seconds - h.awake_for for h in holders if h.can_sleep and protected(h, sm)]
    return max(0.0, min(ends)) if ends else None
