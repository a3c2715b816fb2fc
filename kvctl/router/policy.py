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


def sleep_due(sleep: SleepSettings, sm: SleepManagerConfig, *, idle_for: float, since_woken: float | None) -> float | None:
    """Seconds until an awake instance with nothing in flight or queued may be put to sleep for
    idleness (<= 0: now), or None for never. `since_woken`: seconds since a wake made it awake
    (None: it was never woken); min_sleep_duration keeps automatic sleeps from chasing wakes."""
    threshold = idle_threshold(sleep, sm)
    if threshold is None:
        return None
    due = threshold - idle_for
    if since_woken is not None:
        due = max(due, sm.min_sleep_duration - since_woken)
    return due


def shortfall(held_gb: float, need_gb: float, budget_gb: float, *, freeing_gb: float = 0.0) -> float:
    """GB to free before `need_gb` more fits in the budget, counting `freeing_gb` that instances
    going to sleep free already; 0 when it fits."""
    short = held_gb + need_gb - budget_gb - freeing_gb
    return short if short > _EPSILON else 0.0


@dataclass(frozen=True)
class Sleeper:
    """An asleep or stopped instance a wake could bring up."""

    name: str
    stopped: bool  # its process is stopped: a cold start, not a wake
    wake_failures: int  # consecutive failed wakes


def wake_order(sleepers: list[Sleeper]) -> list[Sleeper]:
    """The order to try them in: asleep before stopped (a wake is cheaper than a cold start),
    then fewer failed wakes first, then as given (config order)."""
    return sorted(sleepers, key=lambda s: (s.stopped, s.wake_failures))
