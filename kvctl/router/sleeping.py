"""The sleep side of the lifecycle (SPEC §6, §15): drain an instance, put its engine to sleep
and confirm it, stop its process through supervisord, and the auto-sleep loop that does both
for idle and long-asleep instances.

An instance in `draining` belongs to the operation that put it there; it re-checks the state
after every await (a request may cancel an automatic sleep, the health loop may mark it down).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from kvctl.errors import EngineError, EngineTimeout, KvctlError
from kvctl.router import policy
from kvctl.router.events import first_line
from kvctl.router.health import ENGINE_STOP_TIMEOUT_SECONDS
from kvctl.router.states import ActionResult, Outcome, S, Slot

if TYPE_CHECKING:
    from kvctl.router.lifecycle import Lifecycle


class Sleeping:
    """Sleeps and stops of a lifecycle's instances."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lc = lifecycle
        # Set on a state change or a reload: the auto-sleep loop computes its next due time again.
        # (A finished request only pushes idleness further away, so it does not need to.)
        self.policy_changed = asyncio.Event()

    async def sleep_model(self, model: str, cause: str = "manual") -> ActionResult:
        lc = self._lc
        slots = lc.by_model.get(model)
        if slots is None:
            return lc.result(model, Outcome.UNKNOWN_MODEL, f"unknown model {model!r}")
        deadline = time.monotonic() + lc.sm.wake_timeout_seconds + lc.sm.drain_timeout_seconds
        # Let a wake or a drain under way finish, then act on the settled state.
        while any(slot.state in (S.WAKING, S.DRAINING) for slot in slots):
            if not await lc.wait_change(deadline - time.monotonic()):
                return lc.result(model, Outcome.TIMED_OUT, f"model {model} is still {lc.model_state(model)}; try again")
        targets = [slot for slot in slots if slot.state is S.AWAKE]
        refused = [slot.inst.name for slot in targets if not slot.inst.sleep.enabled]
        if refused:
            return lc.result(model, Outcome.REFUSED, f"sleep is disabled (sleep.enabled: false) for {', '.join(refused)}")
        for slot in targets:
            self._begin_drain(slot, cause, cancellable=cause != "manual")
        results = await asyncio.gather(*(self._complete(slot, cause, cause) for slot in targets))
        for result in results:
            if not result.success:
                return lc.result(model, result.outcome, result.message)
        down = [f"{slot.inst.name} ({slot.state.value})" for slot in slots if slot.state in (S.DOWN, S.STARTING, S.FAILED)]
        if down:
            return lc.result(model, Outcome.NOT_READY, f"model {model}: instance(s) {', '.join(down)} not ready")
        return lc.result(model, Outcome.DONE, f"model {model} is asleep" if targets else f"model {model} was already asleep")

    async def stop_model(self, model: str) -> ActionResult:
        """`kvctl sleep M --stop`: stop every instance's process (SPEC §15)."""
        lc = self._lc
        slots = lc.by_model.get(model)
        if slots is None:
            return lc.result(model, Outcome.UNKNOWN_MODEL, f"unknown model {model!r}")
        targets = [slot for slot in slots if slot.state is not S.STOPPED and not slot.inst.external]
        results = await asyncio.gather(*(self._stop(slot, "manual", "manual") for slot in targets))
        failed = [result for result in results if not result.success]
        if failed:
            return lc.result(model, failed[0].outcome, failed[0].message)
        return lc.result(model, Outcome.DONE, f"model {model} is stopped" if targets else f"model {model} was already stopped")

    def in_background(self, slot: Slot, kind: str, reason: str) -> None:
        """Begin draining `slot` now (no other decision sees it awake) and sleep it in a task."""
        self._begin_drain(slot, reason, cancellable=kind == "idle")
        self._lc.spawn(self._complete(slot, kind, reason))

    def _begin_drain(self, slot: Slot, reason: str, *, cancellable: bool) -> None:
        """Stop admitting to `slot` (synchronously, so no other decision sees it awake)."""
        self._lc.set_state(slot, S.DRAINING, reason)
        slot.cancellable = cancellable

    async def _drained(self, slot: Slot) -> bool:
        """Wait for `slot`'s requests to finish while it is draining; False at the drain timeout."""
        deadline = time.monotonic() + self._lc.sm.drain_timeout_seconds
        while slot.in_flight > 0 and slot.state is S.DRAINING:
            if not await self._lc.wait_change(deadline - time.monotonic()):
                return False
        return True

    async def _complete(self, slot: Slot, kind: str, reason: str) -> ActionResult:
        """Drain, call the engine, confirm, mark asleep. The slot is already `draining`.
        `kind` is the sleep cause (states.SLEEP_CAUSES); `reason` says it in words."""
        lc, inst, model = self._lc, slot.inst, slot.inst.model
        if not await self._drained(slot):
            timeout = lc.sm.drain_timeout_seconds
            message = f"sleep of {inst.name} aborted: {slot.in_flight} request(s) still in flight after drain_timeout_seconds={timeout:g}"
            lc.set_state(slot, S.AWAKE, f"sleep aborted: {slot.in_flight} request(s) still in flight after the drain timeout")
            lc.dispatch(model)
            return lc.result(model, Outcome.REFUSED, message)
        if slot.state is not S.DRAINING:
            return lc.result(model, Outcome.REFUSED, f"sleep of {inst.name} cancelled: instance is {slot.state.value}")
        started = time.monotonic()
        error, sleeping = await self._engine_sleep(slot)
        took = time.monotonic() - started
        if slot.state is not S.DRAINING:
            lc.dispatch(model)
            return lc.result(model, Outcome.NOT_READY, f"instance {inst.name} went {slot.state.value} while going to sleep")
        if sleeping is False or (error is not None and sleeping is not True):
            if error is None:
                error = EngineError(f"{inst.name}: the engine accepted the sleep call but reports is_sleeping=false")
            lc.set_state(slot, S.AWAKE, f"sleep failed: {first_line(error)}", took)
            lc.dispatch(model)
            return lc.result(model, Outcome.TIMED_OUT if isinstance(error, EngineTimeout) else Outcome.ENGINE_FAILED, str(error))
        if slot.cancel_requested:
            # A request arrived while the engine was going to sleep: wake it straight back.
            lc.set_state(slot, S.WAKING, "automatic sleep cancelled by a request during the engine call", took)
            await lc.finish_wake(slot, time.monotonic() + lc.sm.wake_timeout_seconds, "request")
            return lc.result(model, Outcome.REFUSED, f"sleep of {inst.name} cancelled by a request")
        lc.set_state(slot, S.ASLEEP, reason, took, sleep_cause=kind)
        lc.metrics.sleeps_total.labels(model, kind).inc()
        lc.dispatch(model)
        return lc.result(model, Outcome.DONE, f"instance {inst.name} is asleep")

    async def _engine_sleep(self, slot: Slot) -> tuple[EngineError | None, bool | None]:
        """Ask the engine to sleep, then whether it sleeps: (the call's error, is_sleeping)."""
        lc, inst = self._lc, slot.inst
        adapter = lc.adapter(inst)
        slot.engine_call = True
        error: EngineError | None = None
        try:
            await adapter.sleep(lc.http, inst, timeout=lc.sm.wake_timeout_seconds)
        except EngineError as exc:
            error = exc
        try:
            return error, await adapter.is_sleeping(lc.http, inst)
        finally:
            slot.engine_call = False

    async def _stop(self, slot: Slot, kind: str, reason: str) -> ActionResult:
        """Stop an instance's process through supervisord (drained first when awake); state `stopped`."""
        lc, inst, model = self._lc, slot.inst, slot.inst.model
        if slot.state is S.AWAKE:
            self._begin_drain(slot, reason, cancellable=False)
            await self._drained(slot)
        if slot.state not in (S.DRAINING, S.ASLEEP, S.DOWN, S.FAILED):
            return lc.result(model, Outcome.REFUSED, f"instance {inst.name} is {slot.state.value}; not stopped")
        if slot.in_flight:
            lc.set_state(slot, S.AWAKE, f"stop aborted: {slot.in_flight} request(s) still in flight after the drain timeout")
            lc.dispatch(model)
            return lc.result(model, Outcome.REFUSED, f"stop of {inst.name} aborted: requests still in flight")
        started = time.monotonic()
        try:
            await asyncio.to_thread(lc.processes().stop, inst.name, ENGINE_STOP_TIMEOUT_SECONDS)
        except KvctlError as exc:
            if slot.state is S.DRAINING:
                lc.set_state(slot, S.AWAKE, f"stop failed: {first_line(exc)}")
            lc.dispatch(model)
            return lc.result(model, Outcome.ENGINE_FAILED, f"stopping {inst.name} failed: {exc}")
        if slot.state in (S.DRAINING, S.ASLEEP, S.DOWN, S.FAILED):
            lc.set_state(slot, S.STOPPED, reason, time.monotonic() - started, sleep_cause=kind)
            lc.metrics.stops_total.labels(model, kind).inc()
        lc.dispatch(model)
        stopped = slot.state in (S.STOPPED,)  # (after awaits: mypy's narrowing of slot.state no longer holds)
        return lc.result(model, Outcome.DONE if stopped else Outcome.NOT_READY, f"instance {inst.name} is {slot.state.value}")

    async def auto_sleep_loop(self) -> None:
        """Idle instances go to sleep, long-asleep ones stop (SPEC §6, §15). It wakes at the next
        moment one may be due (at most every check_interval_seconds), and on a state change or a
        reload."""
        lc = self._lc
        wait = 0.0
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
            # races with the event, and `close()` then waits for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.05)):
                    await self.policy_changed.wait()
            self.policy_changed.clear()
            now = time.monotonic()
            wait = lc.sm.check_interval_seconds
            for slot in list(lc.slots):
                sleep_due, stop_due = lc.sleep_due(slot, now), lc.stop_due(slot)
                threshold = policy.idle_threshold(slot.inst.sleep, lc.sm)
                if sleep_due is not None and sleep_due <= 0 and threshold is not None:
                    self.in_background(slot, "idle", f"idle {threshold:g}s")
                elif stop_due is not None and stop_due <= 0:
                    lc.spawn(self._stop(slot, "policy", f"policy: asleep {slot.inst.sleep.stop_after_seconds:g}s (stop_after_seconds)"))
                else:
                    # A busy instance is due no sooner than a full threshold after its last request.
                    due = (sleep_due, stop_due, threshold if slot.state is S.AWAKE else None)
                    wait = min([wait, *(d for d in due if d is not None)])
