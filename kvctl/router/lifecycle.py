"""The model lifecycle (SPEC §6): one state machine per instance, wake on request, safe
sleep, auto-sleep, the memory budget, and reconciling with the engines.

States: ``starting → awake ⇄ draining → asleep → waking → awake``, and ``down``. A state
changes only in :meth:`Lifecycle._set_state`, which refuses transitions that are not in
``_TRANSITIONS`` and wakes everything waiting for a change.

Concurrency: everything runs on one event loop. Every decision reads the current state
and acts on it with no ``await`` in between, so the loop itself is the lock and no
decision is taken on a stale snapshot; code that must wait for something (a drain, room
in the memory budget) waits for a change notification and then decides again. Engine
calls are awaited outside any decision: an instance in ``draining`` or ``waking`` belongs
to the operation that put it there, and that operation re-checks the state when the
engine answers (the health loop may have marked the instance down meanwhile).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Collection, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from kvctl.config import Config, Instance
from kvctl.engines import adapter_for
from kvctl.errors import EngineError, EngineTimeout
from kvctl.render import RunPaths
from kvctl.router import state_file

if TYPE_CHECKING:
    from kvctl.router.metrics import Metrics

log = logging.getLogger("kvctl.router.lifecycle")

_PROBE_TIMEOUT_SECONDS = 5.0
_QUEUE_FULL_RETRY_AFTER = 1
_WAKE_FAILED_RETRY_AFTER = 5
_ASLEEP_RETRY_AFTER = 30


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    AWAKE = "awake"
    DRAINING = "draining"
    ASLEEP = "asleep"
    WAKING = "waking"
    DOWN = "down"


S = InstanceState
_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.STARTING: frozenset({S.AWAKE, S.ASLEEP, S.DOWN}),
    S.AWAKE: frozenset({S.DRAINING, S.DOWN}),
    # draining → awake: the drain timed out, the engine refused, or an arrival cancelled
    # an automatic sleep before the engine call; → waking: it arrived during the call.
    S.DRAINING: frozenset({S.AWAKE, S.ASLEEP, S.WAKING, S.DOWN}),
    S.ASLEEP: frozenset({S.WAKING, S.DOWN}),
    S.WAKING: frozenset({S.AWAKE, S.ASLEEP, S.DOWN}),
    S.DOWN: frozenset({S.AWAKE, S.ASLEEP}),
}
# States in which an instance holds its GPU memory, for the budget. A starting engine is
# not counted: at `up`, the ones that do not fit are put to sleep when they become ready.
_HOLDS_MEMORY = frozenset({S.AWAKE, S.DRAINING, S.WAKING})
# Aggregate model state: the first of these that any replica is in.
_MODEL_STATE_ORDER = (S.AWAKE, S.WAKING, S.DRAINING, S.ASLEEP, S.STARTING, S.DOWN)


class Unavailable(Exception):
    """No instance can serve now. The proxy turns it into an OpenAI-shaped error."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def copy(self) -> Unavailable:
        return Unavailable(self.status, self.code, self.message, self.retry_after)


@dataclass
class ActionResult:
    """The outcome of a manual sleep or wake; `status` is the admin route's HTTP code."""

    model_name: str
    success: bool
    message: str
    state: str
    status: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "success": self.success, "message": self.message, "state": self.state}


@dataclass(eq=False)
class _Slot:
    """The router's view of one instance."""

    inst: Instance
    state: InstanceState = S.STARTING
    since: float = field(default_factory=time.time)  # wall clock, for humans
    in_flight: int = 0
    failures: int = 0  # consecutive failed health probes
    last_used: float = 0.0  # monotonic; least recently used is slept first for the budget
    idle_since: float = 0.0  # monotonic: last request finished, or became awake
    woken_at: float | None = None  # monotonic, for min_sleep_duration
    asleep_since: float | None = None  # wall clock
    manual_sleep: bool = False
    cancellable: bool = False  # draining for an automatic sleep: an arrival cancels it
    cancel_requested: bool = False
    engine_call: bool = False  # the engine's sleep call is under way
    wake_failures: int = 0  # consecutive; a replica whose wake failed is tried last

    @property
    def memory(self) -> float:
        return self.inst.memory_gb or 0.0


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[_Slot]
    exclude: frozenset[str]


class Lifecycle:
    """Instance states for the router; see the module docstring."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self._config = config
        self._sm = config.sleep_manager
        self._metrics = metrics
        self._slots = [_Slot(inst) for inst in config.instances]
        self._by_model: dict[str, list[_Slot]] = {}
        for slot in self._slots:
            self._by_model.setdefault(slot.inst.model, []).append(slot)
        self._by_name = {slot.inst.name: slot for slot in self._slots}
        self._queues: dict[str, deque[_Waiter]] = {model: deque() for model in self._by_model}
        self._wakes: dict[str, asyncio.Task[ActionResult]] = {}  # single flight per model
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: httpx.AsyncClient | None = None
        self._state_path = RunPaths(config.run_dir).router_state
        self._persisted = state_file.read(self._state_path)

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Probe every engine once, reconcile states in config order, start the loops."""
        self._client = httpx.AsyncClient(timeout=_PROBE_TIMEOUT_SECONDS)
        healthy = await asyncio.gather(*(self._probe(slot) for slot in self._slots))
        for slot, ok in zip(self._slots, healthy):
            if ok:  # in config order, so the first instances keep their place in the budget
                await self._came_up(slot, trust_state_file=True)
        for slot in self._slots:
            self._spawn(self._health_loop(slot))
        if self._sm.auto_sleep_enabled:
            self._spawn(self._auto_sleep_loop())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self._queues:
            self._fail_waiters(model, Unavailable(503, "model_unavailable", f"model {model}: the router is shutting down"))
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ data plane

    async def acquire(self, model: str, exclude: Collection[str] = ()) -> Instance:
        """An awake, healthy instance of `model` with its in-flight count already taken.

        Waits in the model's FIFO queue while a wake runs (starting one if needed); a
        cancelled caller leaves the queue. Raises Unavailable."""
        if model not in self._by_model:
            raise Unavailable(404, "model_not_found", f"model {model!r} is not configured")
        excluded = frozenset(exclude)
        queue = self._queues[model]
        if not queue:
            slot = self._pick(model, excluded)
            if slot is not None:
                self._take(slot)
                return slot.inst
        limit = self._config.router.max_queue_per_model
        if len(queue) >= limit:
            raise Unavailable(429, "queue_full", f"model {model}: {len(queue)} requests already wait for it (max_queue_per_model={limit})", _QUEUE_FULL_RETRY_AFTER)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), excluded)
        queue.append(waiter)
        self._dispatch(model)
        try:
            await asyncio.wait({waiter.fut}, timeout=self._sm.wake_timeout_seconds)
        except asyncio.CancelledError:
            self._abandon(model, waiter)
            raise
        if not waiter.fut.done():
            self._abandon(model, waiter)
            raise Unavailable(503, "wake_timeout",
                              f"model {model} did not become available within wake_timeout_seconds={self._sm.wake_timeout_seconds:g} (state: {self.model_state(model)})",
                              _WAKE_FAILED_RETRY_AFTER)
        return waiter.fut.result().inst  # raises the Unavailable a failed wake left there

    def release(self, inst: Instance) -> None:
        slot = self._by_name[inst.name]
        if slot.in_flight > 0:
            slot.in_flight -= 1
        slot.idle_since = slot.last_used = time.monotonic()
        self._notify()

    def report_connect_failure(self, inst: Instance) -> None:
        slot = self._by_name[inst.name]
        slot.failures = max(slot.failures, self._config.router.health_failure_threshold)
        if slot.state not in (S.DOWN, S.STARTING):
            log.warning("instance %s: connection refused, marked down until a health probe succeeds", inst.name)
            self._set_state(slot, S.DOWN)
            self._dispatch(inst.model)

    # ------------------------------------------------------------------ introspection

    def in_flight(self, model: str) -> int:
        return sum(slot.in_flight for slot in self._by_model.get(model, ()))

    def queued(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def model_state(self, model: str) -> str:
        states = {slot.state for slot in self._by_model.get(model, ())}
        for state in _MODEL_STATE_ORDER:
            if state in states:
                return state.value
        return "unknown"

    def instances(self, model: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "name": slot.inst.name,
                "model": slot.inst.model,
                "engine": slot.inst.engine,
                "url": slot.inst.url,
                "state": slot.state.value,
                "healthy": slot.state is not S.DOWN and slot.failures == 0,
                "in_flight": slot.in_flight,
                "memory_gb": slot.inst.memory_gb,
                "state_since": slot.since,
            }
            for slot in self._slots
            if model is None or slot.inst.model == model
        ]

    def sleep_status(self) -> dict[str, Any]:
        now = time.time()
        sleeping: dict[str, dict[str, Any]] = {}
        for model, slots in self._by_model.items():
            if all(slot.state is S.ASLEEP for slot in slots):
                start = min(slot.asleep_since or now for slot in slots)
                sleeping[model] = {"sleep_start_time": start, "sleep_duration": now - start, "manual_sleep": any(slot.manual_sleep for slot in slots)}
        return {
            "sleeping_models": sleeping,
            "sleep_candidates": self.sleep_candidates(),
            "auto_sleep_enabled": self._sm.auto_sleep_enabled,
            "idle_threshold_seconds": self._sm.idle_threshold_seconds,
            "wake_on_request": self._sm.wakeup_on_request,
        }

    def sleep_candidates(self) -> list[str]:
        """Models with an instance idle long enough to be slept now (whether or not
        auto-sleep is enabled; /sleep/status says that)."""
        return sorted({slot.inst.model for slot in self._idle_slots()})

    # ------------------------------------------------------------------ admin actions

    async def sleep_model(self, model: str, *, manual: bool = True) -> ActionResult:
        slots = self._by_model.get(model)
        if slots is None:
            return ActionResult(model, False, f"unknown model {model!r}", "unknown", 404)
        deadline = time.monotonic() + self._sm.wake_timeout_seconds + self._sm.drain_timeout_seconds
        # Let a wake or a drain under way finish, then act on the settled state.
        while any(slot.state in (S.WAKING, S.DRAINING) for slot in slots):
            if not await self._wait_change(deadline - time.monotonic()):
                return ActionResult(model, False, f"model {model} is still {self.model_state(model)}; try again", self.model_state(model), 504)
        targets = [slot for slot in slots if slot.state is S.AWAKE]
        refused = [slot.inst.name for slot in targets if not slot.inst.sleep.enabled]
        if refused:
            return ActionResult(model, False, f"sleep is disabled (sleep.enabled: false) for {', '.join(refused)}", self.model_state(model), 409)
        for slot in targets:
            self._begin_drain(slot, cancellable=not manual)
        results = await asyncio.gather(*(self._complete_sleep(slot, manual) for slot in targets))
        state = self.model_state(model)
        for result in results:
            if not result.success:
                return ActionResult(model, False, result.message, state, result.status)
        down = [slot.inst.name for slot in slots if slot.state in (S.DOWN, S.STARTING)]
        if down:
            return ActionResult(model, False, f"model {model}: instance(s) {', '.join(down)} not ready (down or starting)", state, 503)
        message = f"model {model} is asleep" if targets else f"model {model} was already asleep"
        return ActionResult(model, True, message, state, 200)

    async def wake_model(self, model: str) -> ActionResult:
        slots = self._by_model.get(model)
        if slots is None:
            return ActionResult(model, False, f"unknown model {model!r}", "unknown", 404)
        deadline = time.monotonic() + self._sm.wake_timeout_seconds + self._sm.drain_timeout_seconds
        while True:
            if any(slot.state is S.AWAKE for slot in slots):
                return ActionResult(model, True, f"model {model} is awake", self.model_state(model), 200)
            task = self._wakes.get(model)
            if task is None:
                asleep = self._asleep(slots)
                if asleep:
                    task = self._start_wake(asleep[0])
                elif all(slot.state is S.DOWN for slot in slots):
                    return ActionResult(model, False, f"model {model}: every instance is down", self.model_state(model), 503)
            if task is not None:
                result = await asyncio.shield(task)
                if not result.success:
                    return ActionResult(model, False, result.message, self.model_state(model), result.status)
                continue
            # draining, waking after a cancelled sleep, or starting: wait for it to settle
            if not await self._wait_change(deadline - time.monotonic()):
                return ActionResult(model, False, f"model {model} is still {self.model_state(model)}; try again", self.model_state(model), 504)

    # ------------------------------------------------------------------ the state machine

    def _set_state(self, slot: _Slot, new: InstanceState) -> None:
        """The only place an instance's state changes."""
        old = slot.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"instance {slot.inst.name}: illegal transition {old.value} -> {new.value}")
        slot.state = new
        slot.since = time.time()
        now = time.monotonic()
        if new is S.AWAKE and old is not S.DRAINING:
            slot.idle_since = slot.last_used = now  # a model never used is idle from readiness
            if old is S.WAKING:
                slot.woken_at = now
        if new is S.ASLEEP:
            slot.asleep_since = slot.since
        if new is not S.DRAINING:
            slot.cancellable = slot.cancel_requested = False
        log.info("instance %s: %s -> %s", slot.inst.name, old.value, new.value)
        if new in (S.AWAKE, S.ASLEEP):
            self._persist(slot, new)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> bool:
        """Wait until something changes; False when `timeout` passed first."""
        if timeout <= 0:
            return False
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _persist(self, slot: _Slot, state: InstanceState) -> None:
        if self._persisted.get(slot.inst.name) == state.value:
            return
        self._persisted[slot.inst.name] = state.value
        try:
            state_file.write(self._state_path, self._persisted)
        except OSError as exc:
            log.warning("cannot write %s: %s", self._state_path, exc)

    # ------------------------------------------------------------------ queue and dispatch

    def _pick(self, model: str, exclude: frozenset[str]) -> _Slot | None:
        best: _Slot | None = None
        for slot in self._by_model[model]:
            if slot.state is S.AWAKE and slot.inst.name not in exclude and (best is None or slot.in_flight < best.in_flight):
                best = slot
        return best

    def _take(self, slot: _Slot) -> None:
        slot.in_flight += 1
        slot.last_used = time.monotonic()

    def _dispatch(self, model: str) -> None:
        """Serve queued requests in arrival order; if some remain, make the model come up."""
        queue = self._queues[model]
        while queue:
            for waiter in list(queue):
                if waiter.fut.done():
                    queue.remove(waiter)
                    continue
                slot = self._pick(model, waiter.exclude)
                if slot is not None:
                    self._take(slot)
                    waiter.fut.set_result(slot)
                    queue.remove(waiter)
            if not queue or not self._make_progress(model):
                return

    def _make_progress(self, model: str) -> bool:
        """Requests wait for `model`: cancel an automatic drain, start a wake, or fail them.
        True when an instance became awake at once (dispatch again)."""
        slots = self._by_model[model]
        if any(slot.state is S.AWAKE for slot in slots):
            return False  # the waiters left excluded it (a retry); they wait for health or their deadline
        for slot in slots:
            if slot.state is S.DRAINING and slot.cancellable and not slot.cancel_requested:
                slot.cancel_requested = True
                if not slot.engine_call:
                    log.info("instance %s: automatic sleep cancelled by a request", slot.inst.name)
                    self._set_state(slot, S.AWAKE)
                    return True
        if model in self._wakes or any(slot.state in (S.WAKING, S.STARTING) or slot.cancel_requested for slot in slots):
            return False
        asleep = self._asleep(slots)
        if asleep:
            if self._sm.wakeup_on_request:
                self._start_wake(asleep[0])
            else:
                self._fail_waiters(model, Unavailable(503, "model_asleep", f"model {model} is asleep and wakeup_on_request is false; wake it with `kvctl wake`", _ASLEEP_RETRY_AFTER))
            return False
        if any(slot.state is S.DRAINING for slot in slots):
            return False  # a manual sleep: once asleep, the waiters wake it
        retry = max(1, math.ceil(self._config.router.health_check_interval_seconds))
        self._fail_waiters(model, Unavailable(503, "model_unavailable", f"model {model}: no healthy instance (all down)", retry))
        return False

    @staticmethod
    def _asleep(slots: list[_Slot]) -> list[_Slot]:
        """Asleep replicas in the order to wake them: config order, failed wakes last."""
        return sorted((slot for slot in slots if slot.state is S.ASLEEP), key=lambda slot: slot.wake_failures)

    def _fail_waiters(self, model: str, error: Unavailable) -> None:
        queue = self._queues[model]
        while queue:
            waiter = queue.popleft()
            if not waiter.fut.done():
                waiter.fut.set_exception(error.copy())

    def _abandon(self, model: str, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled or timed out): leave the queue, return what it got."""
        try:
            self._queues[model].remove(waiter)
        except ValueError:
            pass
        if not waiter.fut.done():
            waiter.fut.cancel()
        elif not waiter.fut.cancelled() and waiter.fut.exception() is None:
            self.release(waiter.fut.result().inst)

    # ------------------------------------------------------------------ wake

    def _start_wake(self, slot: _Slot) -> asyncio.Task[ActionResult]:
        model = slot.inst.model
        task = self._spawn(self._wake(slot))
        self._wakes[model] = task
        task.add_done_callback(lambda t: self._wakes.pop(model) if self._wakes.get(model) is t else None)
        return task

    async def _wake(self, slot: _Slot) -> ActionResult:
        model = slot.inst.model
        deadline = time.monotonic() + self._sm.wake_timeout_seconds
        while slot.state is S.ASLEEP and not self._make_room(slot):
            if not await self._wait_change(deadline - time.monotonic()):
                message = f"model {model} could not be woken within wake_timeout_seconds={self._sm.wake_timeout_seconds:g}: the memory budget is held by busy instances"
                self._fail_waiters(model, Unavailable(503, "wake_timeout", message, _WAKE_FAILED_RETRY_AFTER))
                return ActionResult(model, False, message, self.model_state(model), 504)
        if slot.state is not S.ASLEEP:  # it went down (or came back otherwise) meanwhile
            self._dispatch(model)
            return ActionResult(model, slot.state is S.AWAKE, f"instance {slot.inst.name} is {slot.state.value}", self.model_state(model), 200 if slot.state is S.AWAKE else 503)
        self._set_state(slot, S.WAKING)
        return await self._finish_wake(slot, deadline)

    async def _finish_wake(self, slot: _Slot, deadline: float) -> ActionResult:
        """The engine part of a wake; the slot is already `waking`."""
        inst, model = slot.inst, slot.inst.model
        adapter = adapter_for(inst)
        started = time.monotonic()
        error: EngineError | None = None
        try:
            await adapter.wake(self._http, inst, timeout=max(deadline - started, 0.1))
        except EngineError as exc:
            error = exc
        sleeping = await adapter.is_sleeping(self._http, inst) if error is not None else False
        if slot.state is not S.WAKING:
            self._dispatch(model)
            return ActionResult(model, False, f"instance {inst.name} went {slot.state.value} while waking", self.model_state(model), 503)
        if error is None or sleeping is False:
            slot.wake_failures = 0
            self._set_state(slot, S.AWAKE)
            self._count_wake(model, "ok", time.monotonic() - started)
            self._dispatch(model)
            return ActionResult(model, True, f"model {model} is awake", self.model_state(model), 200)
        timed_out = isinstance(error, EngineTimeout)
        slot.wake_failures += 1
        self._set_state(slot, S.ASLEEP)
        self._count_wake(model, "timeout" if timed_out else "failed", time.monotonic() - started)
        log.warning("instance %s: wake failed: %s", inst.name, error)
        code = "wake_timeout" if timed_out else "wake_failed"
        message = f"model {model}: waking instance {inst.name} {'timed out' if timed_out else 'failed'}: {error}"
        self._fail_waiters(model, Unavailable(503, code, message, _WAKE_FAILED_RETRY_AFTER))
        return ActionResult(model, False, message, self.model_state(model), 504 if timed_out else 502)

    def _make_room(self, slot: _Slot) -> bool:
        """True when waking `slot` fits the memory budget now; otherwise start sleeping the
        least recently used idle instances that free enough, and return False (wait)."""
        budget = self._sm.memory_budget_gb
        if budget is None or slot.memory <= 0:
            return True
        held = sum(s.memory for s in self._slots if s.state in _HOLDS_MEMORY)
        short = held + slot.memory - budget
        if short <= 1e-9:
            return True
        short -= sum(s.memory for s in self._slots if s.state is S.DRAINING)  # being freed already
        if short <= 1e-9:
            return False
        idle = sorted(
            (s for s in self._slots
             if s.state is S.AWAKE and s.in_flight == 0 and s.memory > 0 and s.inst.sleep.enabled
             and s.inst.model != slot.inst.model and not self._queues[s.inst.model]),
            key=lambda s: s.last_used,
        )
        victims: list[_Slot] = []
        for victim in idle:
            if short <= 1e-9:
                break
            victims.append(victim)
            short -= victim.memory
        if short > 1e-9:
            return False  # not enough idle memory yet: wait for requests to finish
        for victim in victims:
            log.info("memory budget: sleeping %s to make room for %s", victim.inst.name, slot.inst.name)
            self._begin_drain(victim, cancellable=False)
            self._spawn(self._complete_sleep(victim, manual=False))
        return False

    def _count_wake(self, model: str, result: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.wakes_total.labels(model, result).inc()
            self._metrics.wake_duration_seconds.labels(model).observe(seconds)

    # ------------------------------------------------------------------ sleep

    def _begin_drain(self, slot: _Slot, *, cancellable: bool) -> None:
        """Stop admitting to `slot` (synchronously, so no other decision sees it awake)."""
        self._set_state(slot, S.DRAINING)
        slot.cancellable = cancellable

    async def _complete_sleep(self, slot: _Slot, manual: bool) -> ActionResult:
        """Drain, call the engine, confirm, mark asleep. The slot is already `draining`."""
        inst, model = slot.inst, slot.inst.model
        deadline = time.monotonic() + self._sm.drain_timeout_seconds
        while slot.in_flight > 0 and slot.state is S.DRAINING:
            if not await self._wait_change(deadline - time.monotonic()):
                message = f"sleep of {inst.name} aborted: {slot.in_flight} request(s) still in flight after drain_timeout_seconds={self._sm.drain_timeout_seconds:g}"
                log.warning(message)
                self._set_state(slot, S.AWAKE)
                self._dispatch(model)
                return ActionResult(model, False, message, self.model_state(model), 409)
        if slot.state is not S.DRAINING:
            return ActionResult(model, False, f"sleep of {inst.name} cancelled: instance is {slot.state.value}", self.model_state(model), 409)
        adapter = adapter_for(inst)
        slot.engine_call = True
        error: EngineError | None = None
        try:
            await adapter.sleep(self._http, inst, timeout=self._sm.wake_timeout_seconds)
        except EngineError as exc:
            error = exc
        try:
            sleeping = await adapter.is_sleeping(self._http, inst)
        finally:
            slot.engine_call = False
        if slot.state is not S.DRAINING:
            self._dispatch(model)
            return ActionResult(model, False, f"instance {inst.name} went {slot.state.value} while going to sleep", self.model_state(model), 503)
        if sleeping is False or (error is not None and sleeping is not True):
            self._set_state(slot, S.AWAKE)
            self._dispatch(model)
            if error is None:
                error = EngineError(f"{inst.name}: the engine accepted the sleep call but reports is_sleeping=false")
            log.warning("instance %s: sleep failed: %s", inst.name, error)
            return ActionResult(model, False, str(error), self.model_state(model), 504 if isinstance(error, EngineTimeout) else 502)
        if slot.cancel_requested:
            # A request arrived while the engine was going to sleep: wake it straight back.
            log.info("instance %s: automatic sleep cancelled by a request during the engine call; waking", inst.name)
            self._set_state(slot, S.WAKING)
            await self._finish_wake(slot, time.monotonic() + self._sm.wake_timeout_seconds)
            return ActionResult(model, False, f"sleep of {inst.name} cancelled by a request", self.model_state(model), 409)
        self._set_state(slot, S.ASLEEP)
        slot.manual_sleep = manual
        if self._metrics is not None:
            self._metrics.sleeps_total.labels(model, "true" if manual else "false").inc()
        self._dispatch(model)
        return ActionResult(model, True, f"instance {inst.name} is asleep", self.model_state(model), 200)

    def _idle_slots(self) -> list[_Slot]:
        now = time.monotonic()
        return [
            slot for slot in self._slots
            if slot.state is S.AWAKE and slot.inst.sleep.enabled and slot.in_flight == 0
            and not self._queues[slot.inst.model]
            and now - slot.idle_since >= self._sm.idle_threshold_seconds
            and (slot.woken_at is None or now - slot.woken_at >= self._sm.min_sleep_duration)
        ]

    async def _auto_sleep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sm.check_interval_seconds)
            for slot in self._idle_slots():
                log.info("instance %s: idle for %.0fs, putting it to sleep", slot.inst.name, time.monotonic() - slot.idle_since)
                self._begin_drain(slot, cancellable=True)
                self._spawn(self._complete_sleep(slot, manual=False))

    # ------------------------------------------------------------------ health and truth

    async def _probe(self, slot: _Slot) -> bool:
        """One health probe (not traffic: it changes no idle time)."""
        try:
            response = await self._http.get(slot.inst.url + adapter_for(slot.inst).health_path)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _health_loop(self, slot: _Slot) -> None:
        threshold = self._config.router.health_failure_threshold
        while True:
            await asyncio.sleep(self._config.router.health_check_interval_seconds)
            if await self._probe(slot):
                slot.failures = 0
                if slot.state in (S.STARTING, S.DOWN):
                    await self._came_up(slot, trust_state_file=False)
                continue
            slot.failures += 1
            if slot.failures >= threshold and slot.state not in (S.DOWN, S.STARTING):
                log.warning("instance %s: %d health probes failed, marked down", slot.inst.name, slot.failures)
                self._set_state(slot, S.DOWN)
                self._dispatch(slot.inst.model)

    async def _came_up(self, slot: _Slot, *, trust_state_file: bool) -> None:
        """Reconcile an instance that answers again with what the engine really is."""
        sleeping = await adapter_for(slot.inst).is_sleeping(self._http, slot.inst)
        if sleeping is None:
            # The engine cannot tell. One already running when the router started is as the
            # state file says; one that (re)started since is a fresh engine, so awake.
            sleeping = trust_state_file and self._persisted.get(slot.inst.name) == S.ASLEEP.value
        if slot.state not in (S.STARTING, S.DOWN):
            return
        self._set_state(slot, S.ASLEEP if sleeping else S.AWAKE)
        budget = self._sm.memory_budget_gb
        if slot.state is S.AWAKE and budget is not None and slot.inst.sleep.enabled:
            held = sum(s.memory for s in self._slots if s.state in _HOLDS_MEMORY)
            if held > budget + 1e-9:
                log.info("memory budget: %s does not fit (%.1f of %.1f GB), putting it to sleep", slot.inst.name, held, budget)
                self._begin_drain(slot, cancellable=False)
                self._spawn(self._complete_sleep(slot, manual=False))
        self._dispatch(slot.inst.model)

    # ------------------------------------------------------------------ helpers

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("Lifecycle.start() was not called")
        return self._client

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lifecycle task failed", exc_info=task.exception())
