"""Health checks of the engines (SPEC §6, §15): one probe loop per instance that marks it down
after failed probes and reconciles it with what the engine really is when it answers again;
a crash loop that gave up marks it failed; and the verify probe of a woken engine.

The loops run on the lifecycle's event loop and change states only through
`Lifecycle.set_state`, like every other part of the lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import httpx

from kvctl import http1, procstate
from kvctl.errors import EngineError, KvctlError
from kvctl.router import logs
from kvctl.router.events import first_line
from kvctl.router.states import NOT_RUNNING, S, Slot

if TYPE_CHECKING:
    from kvctl.router.lifecycle import Lifecycle

log = logging.getLogger("kvctl.router")

PROBE_TIMEOUT_SECONDS = 5.0
# An instance that is starting or down is probed this often, so a (re)started engine is
# routed as soon as it answers rather than at the next health interval.
_FAST_PROBE_SECONDS = 0.25
ENGINE_STOP_TIMEOUT_SECONDS = 30.0  # SIGTERM, then SIGKILL (supervisord's stopasgroup/killasgroup)


class Health:
    """The probe loops of a lifecycle's instances, and what their answers mean."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lc = lifecycle
        self._loops: dict[str, asyncio.Task[Any]] = {}

    def watch(self, slot: Slot) -> None:
        self._loops[slot.inst.name] = self._lc.spawn(self._loop(slot))

    def forget(self, slot: Slot) -> None:
        """A removed instance left: end its loop (unless a new instance took its name)."""
        task = self._loops.pop(slot.inst.name, None)
        if task is not None and self._lc.by_name.get(slot.inst.name) is slot:
            task.cancel()

    async def probe(self, slot: Slot) -> bool | None:
        """One health probe (not traffic: it changes no idle time). None when the router itself
        is out of file descriptors: that says nothing about the engine."""
        try:
            response = await self._lc.http.get(slot.inst.url + self._lc.adapter(slot.inst).health_path)
        except httpx.HTTPError as exc:
            return None if _exhausted(exc) else False
        return response.status_code == 200

    async def _loop(self, slot: Slot) -> None:
        while True:
            router = self._lc.config.router
            fast = slot.state in NOT_RUNNING
            await asyncio.sleep(min(_FAST_PROBE_SECONDS, router.health_check_interval_seconds) if fast else router.health_check_interval_seconds)
            if slot.restarting:
                continue
            healthy = await self.probe(slot)
            if healthy is None:
                continue
            if healthy:
                slot.failures = 0
                if slot.state in NOT_RUNNING:
                    await self.came_up(slot, trust_state_file=False)
                continue
            slot.failures += 1
            if slot.failures >= router.health_failure_threshold and slot.state not in NOT_RUNNING:
                self._lc.set_state(slot, S.DOWN, f"health: {slot.failures} failed probes")
                self._lc.dispatch(slot.inst.model)
            if slot.state in (S.DOWN, S.STARTING):
                self._check_failed(slot)

    def _check_failed(self, slot: Slot) -> None:
        """An engine whose crash loop gave up (the launcher's record) is `failed`, with the reason."""
        record = procstate.read(self._lc.config.run_dir, slot.inst.name)
        if record is not None and record.failed:
            slot.failure = record.reason
            self._lc.set_state(slot, S.FAILED, f"start failed: {record.reason}")
            self._lc.dispatch(slot.inst.model)

    def not_running(self, slot: Slot) -> None:
        """An engine that does not answer at router start: `stopped` when its policy or kvctl
        stopped it (it starts on demand), else starting (it may be loading)."""
        persisted = self._lc.persisted.get(slot.inst.name)
        if slot.inst.sleep.start == "stopped":
            slot.started_once = True
            self._lc.set_state(slot, S.STOPPED, "policy: start stopped", sleep_cause="policy")
        elif persisted is not None and persisted.state == S.STOPPED.value:
            slot.started_once = True
            self._lc.set_state(slot, S.STOPPED, "reconciled: stopped by kvctl", sleep_cause=persisted.cause, asleep_since=persisted.since)

    async def came_up(self, slot: Slot, *, trust_state_file: bool) -> None:
        """Reconcile an instance that answers again with what the engine really is."""
        lc = self._lc
        sleeping = await lc.adapter(slot.inst).is_sleeping(lc.http, slot.inst)
        persisted = lc.persisted.get(slot.inst.name)
        was_asleep = trust_state_file and persisted is not None and persisted.state == S.ASLEEP.value
        if sleeping is None:
            # The engine cannot tell. One already running when the router started is as the
            # state file says; one that (re)started since is a fresh engine, so awake.
            sleeping, cause = was_asleep, "reconciled: state file says asleep" if was_asleep else "engine ready"
        else:
            cause = "reconciled: engine reports asleep" if sleeping else "engine ready"
        if slot.state not in NOT_RUNNING:
            return
        if sleeping:
            # Why and since when it sleeps survive a router restart (the state file), when known.
            known = persisted if persisted is not None and persisted.state == S.ASLEEP.value else None
            lc.set_state(slot, S.ASLEEP, cause, sleep_cause=known.cause if known else None, asleep_since=known.since if known else None)
            lc.dispatch(slot.inst.model)
            return
        if slot.inst.sleep.verify and slot.reference is None:
            slot.reference = await self._probe_answer(slot)  # what a correct engine answers
            if slot.state not in NOT_RUNNING:
                return
        launched_for_requests = slot.launching
        lc.set_state(slot, S.AWAKE, cause)
        lc.became_ready(slot, launched_for_requests=launched_for_requests)

    async def verify(self, slot: Slot) -> bool:
        """A woken engine must answer the fixed probe as it did when first ready (SPEC §15).
        On a mismatch: reload its weights and probe again; still wrong: restart it.
        True when it may serve; False when it is being restarted. Requests wait meanwhile."""
        lc, inst, model = self._lc, slot.inst, slot.inst.model
        answer = await self._probe_answer(slot)
        if slot.reference is None or answer == slot.reference:
            slot.reference = slot.reference or answer
            lc.metrics.verifications_total.labels(model, "ok").inc()
            return True
        log.warning(
            "%s %s: verify: the answer after waking differs from the one recorded at start; reloading the weights",
            inst.name,
            model,
            extra=logs.fields(instance=inst.name, model=model, check="verify", result="mismatch"),
        )
        try:
            await lc.adapter(inst).reload_weights(lc.http, inst, timeout=inst.startup_timeout_seconds)
            answer = await self._probe_answer(slot)
        except EngineError as exc:
            log.warning("%s %s: verify: reloading the weights failed: %s", inst.name, model, first_line(exc))
            answer = None
        if answer == slot.reference:
            log.info(
                "%s %s: verify: correct after reloading the weights",
                inst.name,
                model,
                extra=logs.fields(instance=inst.name, model=model, check="verify", result="reloaded"),
            )
            lc.metrics.verifications_total.labels(model, "reloaded").inc()
            return True
        lc.metrics.verifications_total.labels(model, "restarted").inc()
        slot.launching = slot.restarting = True
        lc.set_state(slot, S.STARTING, "verify: still wrong after reloading the weights; restarting the engine")
        try:
            await asyncio.to_thread(lc.processes().restart, inst.name, ENGINE_STOP_TIMEOUT_SECONDS)
        except KvctlError as exc:
            log.error("%s %s: verify: restarting the engine failed: %s", inst.name, model, first_line(exc))
        finally:
            slot.restarting = False
        return False

    async def _probe_answer(self, slot: Slot) -> str | None:
        try:
            return await self._lc.adapter(slot.inst).probe(self._lc.http, slot.inst)
        except EngineError as exc:
            log.warning("%s %s: verify probe failed: %s", slot.inst.name, slot.inst.model, first_line(exc))
            return None


def _exhausted(exc: BaseException) -> bool:
    """Whether an error (or its cause) is the router's own lack of file descriptors."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in http1.EXHAUSTED:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
