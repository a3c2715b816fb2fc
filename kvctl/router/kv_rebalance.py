"""KV-cache rebalancing (`sleep_manager.kv_rebalance`, SPEC §13): within `kv_budget_gb`, move
kvcached KV limit from idle awake instances to busy ones, never below `kv_min_gb`.

`plan` is the whole decision, a pure function of what the loop measured; `run` measures
every `check_interval_seconds` and writes what `plan` decides. It does not oscillate:

* busy (requests waiting in the engine or the router, or KV held >= 90 % of the limit) and
  idle (nothing in flight for IDLE_CHECKS checks in a row) are far apart: an instance that
  became busy stays busy until it is idle, and one that is neither keeps its limit;
* a busy instance gets an equal share of what the others leave, an idle one shrinks to
  `kv_min_gb` (or what it still holds) — so the next check, seeing the same, computes the same;
* limits move in whole 2 MiB pages (kvcached's page) and only by at least MIN_MOVE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from kvctl.router import kv
from kvctl.router.kv import KvControl
from kvctl.router.lifecycle import Lifecycle
from kvctl.router.states import S

log = logging.getLogger("kvctl.router")
PAGE = 2 * 2**20
BUSY_SHARE = 0.9
IDLE_CHECKS = 3
MIN_MOVE_BYTES = 64 * 2**20
_SCRAPE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Member:
    """An awake kvcached instance whose segment is known, as one check saw it."""

    name: str
    limit: int
    held: int  # used + prealloc
    waiting: int  # requests waiting for it: inside the engine (no KV room) or queued in the router
    idle: bool  # nothing in flight for IDLE_CHECKS checks
    was_busy: bool = False  # busy at the previous check

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.held >= BUSY_SHARE * self.limit or (self.was_busy and not self.idle)


def plan(members: list[Member], budget: int, minimum: int) -> dict[str, tuple[int, str]]:
    """New limits, by instance name, with the reason: only those that move."""

    def pages(n: float) -> int:
        return int(n) // PAGE * PAGE

    target: dict[str, tuple[int, str]] = {}
    busy = [m for m in members if m.busy]
    idle = [m for m in members if not m.busy and m.idle]
    between = [m for m in members if not m.busy and not m.idle]
    for m in idle:
        target[m.name] = (max(minimum, -(-m.held // PAGE) * PAGE), "rebalance: idle")
    fixed = sum(limit for limit, _ in target.values())
    # The in-between keep their limits unless that breaks the budget (one woke with a large
    # limit) or leaves a busy one less than the minimum: then they give way in proportion.
    room = budget - fixed - len(busy) * minimum
    between_total = sum(m.limit for m in between)
    if between_total > room:
        scale = max(room, 0) / between_total
        for m in between:
            target[m.name] = (max(minimum, pages(m.limit * scale)), "rebalance: over kv_budget_gb")
        between_total = sum(target[m.name][0] for m in between)
    if busy:
        share = max(minimum, pages((budget - fixed - between_total) / len(busy)))
        for m in busy:
            target[m.name] = (share, "rebalance: busy")
    step = max(MIN_MOVE_BYTES, budget // 50)
    current = {m.name: m.limit for m in members}
    return {name: (limit, why) for name, (limit, why) in target.items() if abs(limit - current[name]) >= step}


async def run(control: KvControl, lifecycle: Lifecycle) -> None:
    """Every check_interval_seconds while `kv_rebalance` is on: measure, plan, write. Until cancelled."""
    last_active: dict[str, float] = {}
    busy: set[str] = set()
    while True:
        sm = control.config.sleep_manager
        await asyncio.sleep(sm.check_interval_seconds)
        if not sm.kv_rebalance or sm.kv_budget_gb is None:
            continue
        try:
            busy = await _check(control, lifecycle, last_active, busy)
        except Exception:  # one bad check must not end rebalancing
            log.exception("kv rebalance: the check failed")


async def _check(control: KvControl, lifecycle: Lifecycle, last_active: dict[str, float], busy: set[str]) -> set[str]:
    """One round; returns the instances that were busy in it."""
    sm = control.config.sleep_manager
    assert sm.kv_budget_gb is not None
    now = time.monotonic()
    slots = {slot.inst.name: slot for slot in lifecycle.slots if not slot.retiring}
    awake = [inst for inst in control.instances() if inst.name in slots and slots[inst.name].state is S.AWAKE]
    waiting = await asyncio.gather(*(lifecycle.adapter(inst).waiting(lifecycle.http, inst, _SCRAPE_TIMEOUT_SECONDS) for inst in awake))
    members = []
    for inst, engine_waiting in zip(awake, waiting, strict=True):
        info = kv.read(inst)
        if info is None:
            continue
        if slots[inst.name].in_flight or engine_waiting or inst.name not in last_active:
            last_active[inst.name] = now  # first seen counts as active: a woken instance is not idle at once
        members.append(
            Member(
                inst.name,
                info.limit_bytes,
                info.held_bytes,
                engine_waiting + lifecycle.queued(inst.model),
                now - last_active[inst.name] >= IDLE_CHECKS * sm.check_interval_seconds,
                inst.name in busy,
            )
        )
    for name in set(last_active) - {m.name for m in members}:
        del last_active[name]  # asleep or gone: starts over when awake again
    moves = plan(members, int(sm.kv_budget_gb * kv.GiB), int(sm.kv_min_gb * kv.GiB))
    by_name = {inst.name: inst for inst in awake}
    current = {m.name: m.limit for m in members}
    for name in sorted(moves, key=lambda n: moves[n][0] - current[n]):  # shrinks first: the budget holds throughout
        limit, why = moves[name]
        control.set_limit(by_name[name], limit, why, "awake")
    return {m.name for m in members if m.busy}
