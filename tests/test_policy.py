"""Lifecycle policy as pure functions (kvctl/router/policy.py): no processes, no clock."""

from __future__ import annotations

from kvctl.config import SleepManagerConfig, SleepSettings
from kvctl.router.policy import Holder, Sleeper, choose_victims, idle_threshold, next_protection_end, protected, shortfall, sleep_due, stops_in, wake_order

SM = SleepManagerConfig(min_awake_seconds=5, max_swap_wait_seconds=60)


def holder(
    name: str,
    *,
    memory: float = 10,
    priority: int = 0,
    last_used: float = 0,
    awake_for: float = 100,
    busy: bool = False,
    used: bool = True,
    can_sleep: bool = True,
) -> Holder:
    return Holder(name, "m-" + name, memory, priority, last_used, awake_for, busy, used, can_sleep)


def names(victims: list[Holder] | None) -> list[str] | None:
    return None if victims is None else [v.name for v in victims]


def test_least_recently_used_first_and_only_as_many_as_needed() -> None:
    holders = [holder("a", last_used=30), holder("b", last_used=10), holder("c", last_used=20)]
    assert names(choose_victims(holders, 10, SM, starving=False)) == ["b"]
    assert names(choose_victims(holders, 15, SM, starving=False)) == ["b", "c"]


def test_lower_priority_first_even_when_used_more_recently() -> None:
    holders = [holder("important", priority=10, last_used=1), holder("casual", priority=0, last_used=99)]
    assert names(choose_victims(holders, 10, SM, starving=False)) == ["casual"]


def test_idle_before_busy_within_a_priority() -> None:
    holders = [holder("busy", busy=True, last_used=1), holder("idle", last_used=50)]
    assert names(choose_victims(holders, 10, SM, starving=False)) == ["idle"]


def test_not_enough_sleepable_memory_means_none() -> None:
    holders = [holder("pinned", can_sleep=False), holder("small", memory=4)]
    assert choose_victims(holders, 10, SM, starving=False) is None


def test_a_model_woken_for_work_is_protected_for_min_awake_seconds_unless_a_waiter_starves() -> None:
    fresh = holder("fresh", awake_for=2, used=True)
    assert protected(fresh, SM)
    assert choose_victims([fresh], 10, SM, starving=False) is None
    assert next_protection_end([fresh], SM) == 3
    assert names(choose_victims([fresh], 10, SM, starving=True)) == ["fresh"]
    # Woken but never used and idle: nothing to protect.
    assert not protected(holder("unused", awake_for=2, used=False), SM)
    assert not protected(holder("old", awake_for=6, busy=True), SM)


def test_idle_threshold_per_instance_global_and_pinned() -> None:
    off, on = SleepManagerConfig(auto_sleep_enabled=False, idle_threshold_seconds=300), SleepManagerConfig(auto_sleep_enabled=True, idle_threshold_seconds=300)
    assert idle_threshold(SleepSettings(), off) is None
    assert idle_threshold(SleepSettings(), on) == 300
    assert idle_threshold(SleepSettings(idle_seconds=2), off) == 2  # the instance's own setting applies alone
    assert idle_threshold(SleepSettings(enabled=False, idle_seconds=2), on) is None


def test_stops_in() -> None:
    assert stops_in(10, SleepSettings()) is None
    assert stops_in(1, SleepSettings(stop_after_seconds=3)) == 2
    assert stops_in(5, SleepSettings(stop_after_seconds=3)) == 0


def test_sleep_due_counts_idleness_and_min_sleep_duration_after_a_wake() -> None:
    sm = SleepManagerConfig(auto_sleep_enabled=True, idle_threshold_seconds=10, min_sleep_duration=30)
    assert sleep_due(SleepSettings(), sm, idle_for=4, since_woken=None) == 6
    assert sleep_due(SleepSettings(), sm, idle_for=15, since_woken=None) == -5  # overdue: now
    # Woken 20 s ago: idle long enough, but not asleep again before min_sleep_duration.
    assert sleep_due(SleepSettings(), sm, idle_for=15, since_woken=20) == 10
    assert sleep_due(SleepSettings(idle_seconds=2), sm, idle_for=1, since_woken=None) == 1
    assert sleep_due(SleepSettings(enabled=False), sm, idle_for=100, since_woken=None) is None
    assert sleep_due(SleepSettings(), SleepManagerConfig(auto_sleep_enabled=False), idle_for=10**6, since_woken=None) is None


def test_shortfall_counts_memory_being_freed() -> None:
    assert shortfall(10, 10, 20) == 0  # exactly fits
    assert shortfall(10, 10.5, 20) == 0.5
    assert shortfall(10, 10.5, 20, freeing_gb=0.5) == 0  # an instance going to sleep frees enough
    assert shortfall(30, 0, 20) == 10  # over budget already
    assert shortfall(10, 10 + 1e-12, 20) == 0  # float noise is not a shortfall


def test_wake_order_asleep_before_stopped_then_fewer_failed_wakes_then_config_order() -> None:
    sleepers = [Sleeper("stopped", True, 0), Sleeper("failed-twice", False, 2), Sleeper("first", False, 0), Sleeper("second", False, 0)]
    assert [s.name for s in wake_order(sleepers)] == ["first", "second", "failed-twice", "stopped"]
    assert wake_order([]) == []
