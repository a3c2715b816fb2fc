"""The memory budget (SPEC §15): a wake waits, in arrival order, until its instance fits in
`memory_budget_gb`, and what policy chooses (kvctl.router.policy) is put to sleep to make room.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from kvctl.router import policy
from kvctl.router.states import S, Slot

if TYPE_CHECKING:
    from kvctl.router.lifecycle import Lifecycle


class Budget:
    """Room in the budget for a lifecycle's wakes."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lc = lifecycle
        # Models whose wake waits for room in the budget, in arrival order: memory freed for the
        # first is not taken by a later one (or by the model just slept, whose queue refills).
        self._room_queue: deque[str] = deque()
        self._evicted: dict[str, list[str]] = {}  # per model being woken: who was slept for it

    def held(self) -> float:
        """GB the instances hold now."""
        return sum(s.memory for s in self._lc.slots if s.holds_memory)

    def begin(self, model: str) -> None:
        """A wake of `model` begins: nobody was put to sleep for it yet."""
        self._evicted[model] = []

    def evicted(self, model: str) -> list[str]:
        """The instances put to sleep to make room for the wake of `model`, which ended."""
        return self._evicted.pop(model, [])

    async def wait_for_room(self, slot: Slot, deadline: float) -> bool:
        """Wait, in the room queue's order, until bringing `slot` up fits the budget (or it is
        no longer asleep or stopped); False when the deadline passed first."""
        lc = self._lc
        self._room_queue.append(slot.inst.model)
        try:
            while slot.state in (S.ASLEEP, S.STOPPED):
                room, recheck = self._make_room(slot)
                if room:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Wait for a change, or for the moment a protected holder may be slept.
                await lc.wait_change(remaining if recheck is None else min(remaining, recheck + 0.01))
        finally:
            self._room_queue.remove(slot.inst.model)
            lc.notify()  # the next model in the room queue may go
        return True

    def _make_room(self, slot: Slot) -> tuple[bool, float | None]:
        """(True, None) when bringing `slot` up fits the memory budget now. Otherwise start
        putting to sleep what policy chooses and return (False, seconds until a protected
        holder may be chosen, or None) — the caller waits and asks again."""
        lc, model = self._lc, slot.inst.model
        budget = lc.sm.memory_budget_gb
        if budget is None:
            return True, None
        need = slot.memory  # read once: it may be a segment read or an NVML query
        if need <= 0:
            return True, None
        if self._room_queue and self._room_queue[0] != model:
            return False, None  # an earlier wake waits for room: its turn first
        held = self.held()
        if policy.shortfall(held, need, budget) == 0:
            return True, None
        short = policy.shortfall(held, need, budget, freeing_gb=sum(s.memory for s in lc.slots if s.state is S.DRAINING))
        if short == 0:
            return False, None  # what is being freed already is enough
        holders = self._holders(model)
        queue = lc.queues.get(model)
        starving = bool(queue and time.monotonic() - queue[0].since >= lc.sm.max_swap_wait_seconds)
        victims = policy.choose_victims(holders, short, lc.sm, starving=starving)
        if victims is None:
            return False, policy.next_protection_end(holders, lc.sm)
        for victim in victims:
            self._evicted.setdefault(model, []).append(victim.name)
            lc.sleeping.in_background(lc.by_name[victim.name], "budget", f"budget: making room for {model}")
        return False, None

    def _holders(self, waking: str) -> list[policy.Holder]:
        """The awake instances as the budget sees them, while `waking` (a model) waits for room."""
        lc, now = self._lc, time.monotonic()
        return [
            policy.Holder(
                name=s.inst.name,
                model=s.inst.model,
                memory_gb=s.memory,
                priority=s.inst.sleep.priority,
                last_used=s.last_used,
                awake_for=now - s.awake_at,
                busy=bool(s.in_flight or lc.queues.get(s.inst.model)),
                used_since_awake=s.used_since_awake,
                can_sleep=s.inst.sleep.enabled and s.inst.model != waking,
            )
            for s in lc.slots
            if s.state is S.AWAKE
        ]

    def holders_text(self, slot: Slot) -> str:
        """Who holds the memory budget and why each cannot be slept, for a wake that waited in vain."""
        held = []
        for s in self._lc.slots:
            if s.holds_memory and s.memory > 0 and s is not slot:
                if not s.inst.sleep.enabled:
                    why = "sleep disabled"
                elif s.in_flight:
                    why = f"{s.in_flight} in flight"
                else:
                    why = "requests queued" if self._lc.queues.get(s.inst.model) else s.state.value
                held.append(f"{s.inst.name} ({s.memory:g} GB, {why})")
        return ", ".join(held) or "nothing (the instance alone exceeds it)"
