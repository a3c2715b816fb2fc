"""The model lifecycle (SPEC §6): one state machine per instance, wake on request, safe
sleep, auto-sleep, the memory budget, and reconciling with the engines.

States: ``starting → awake ⇄ draining → asleep → waking → awake``, ``down`` (not healthy)
and ``failed`` (its crash loop gave up). A state changes only in :meth:`Lifecycle._set_state`,
which refuses transitions that are not in ``_TRANSITIONS``, logs the change with its cause,
publishes it as an event and wakes everything waiting for a change.

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
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import httpx

from kvctl import procstate
from kvctl.config import Config, Instance
from kvctl.engines import EngineAdapter, adapter_for
from kvctl.errors import EngineError, EngineTimeout, KvctlError
from kvctl.paths import RunPaths
from kvctl.router import kv, logs, overload, policy, state_file
from kvctl.router.events import Event, EventBus
from kvctl.supervisor import Supervisor

if TYPE_CHECKING:
    from kvctl.router.metrics import Metrics

log = logging.getLogger("kvctl.router")

_PROBE_TIMEOUT_SECONDS = 5.0
_QUEUE_FULL_RETRY_AFTER = 1
_WAKE_FAILED_RETRY_AFTER = 5
_ASLEEP_RETRY_AFTER = 30
# An instance that is starting or down is probed this often, so a (re)started engine is
# routed as soon as it answers rather than at the next health interval.
_FAST_PROBE_SECONDS = 0.25
ENGINE_STOP_TIMEOUT_SECONDS = 30.0  # SIGTERM, then SIGKILL (supervisord's stopasgroup/killasgroup)


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    AWAKE = "awake"
    DRAINING = "draining"
    ASLEEP = "asleep"
    WAKING = "waking"
    DOWN = "down"
    FAILED = "failed"
    STOPPED = "stopped"


S = InstanceState
# Every state may go to `starting`: a reload that changed the engine's program restarts it.
_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.STARTING: frozenset({S.AWAKE, S.ASLEEP, S.DOWN, S.FAILED, S.STOPPED}),
    S.AWAKE: frozenset({S.DRAINING, S.DOWN, S.STARTING}),
    # draining → awake: the drain timed out, the engine refused, or an arrival cancelled
    # an automatic sleep before the engine call; → waking: it arrived during the call;
    # → stopped: a manual stop of an awake instance drains it first.
    S.DRAINING: frozenset({S.AWAKE, S.ASLEEP, S.WAKING, S.DOWN, S.STARTING, S.STOPPED}),
    S.ASLEEP: frozenset({S.WAKING, S.DOWN, S.STARTING, S.STOPPED}),
    # waking → starting: a verified wake that stays wrong after a reload restarts the engine.
    S.WAKING: frozenset({S.AWAKE, S.ASLEEP, S.DOWN, S.STARTING}),
    S.DOWN: frozenset({S.AWAKE, S.ASLEEP, S.FAILED, S.STARTING, S.STOPPED}),
    S.FAILED: frozenset({S.AWAKE, S.ASLEEP, S.DOWN, S.STARTING, S.STOPPED}),
    # stopped → awake/asleep: someone else started it (`kvctl restart`, `kvctl up`).
    S.STOPPED: frozenset({S.STARTING, S.AWAKE, S.ASLEEP}),
}
# Why an instance sleeps (SPEC §15), as /sleep/status and /metrics report it.
SLEEP_CAUSES = ("manual", "idle", "budget", "policy")
# States in which an instance holds its GPU memory, for the budget. A starting engine is
# not counted: at `up`, the ones that do not fit are put to sleep when they become ready.
_HOLDS_MEMORY = frozenset({S.AWAKE, S.DRAINING, S.WAKING})
# Aggregate model state: the first of these that any replica is in.
_MODEL_STATE_ORDER = (S.AWAKE, S.WAKING, S.DRAINING, S.ASLEEP, S.STARTING, S.STOPPED, S.DOWN, S.FAILED)


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
    evicted: list[str] = field(default_factory=list)  # instances put to sleep to make room

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "success": self.success, "message": self.message, "state": self.state, "evicted": self.evicted}


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
    awake_at: float = 0.0  # monotonic: when it last became awake (swap-aware serving)
    asleep_since: float | None = None  # wall clock
    sleep_cause: str | None = None  # one of SLEEP_CAUSES while asleep
    failure: str | None = None  # why it is `failed`
    retiring: bool = False  # removed from the config: drains, then leaves
    cancellable: bool = False  # draining for an automatic sleep: an arrival cancels it
    cancel_requested: bool = False
    engine_call: bool = False  # the engine's sleep call is under way
    wake_failures: int = 0  # consecutive; a replica whose wake failed is tried last
    launching: bool = False  # started on demand: holds its memory while it loads
    used_since_awake: bool = False  # served a request since it last became awake (swap-aware serving)
    reference: str | None = None  # the verify probe's answer when the engine was first ready
    started_once: bool = False  # `start: asleep` applies to the first start only
    restarting: bool = False  # the old engine still answers until supervisord has stopped it

    @property
    def memory(self) -> float:
        # `memory_gb: auto`: the engine's GPU memory as NVML measures it, its KV cache included;
        # otherwise a kvcached engine's weights and fixed buffers plus the KV cache it really holds (SPEC §13).
        if self.inst.memory_auto:
            return kv.gpu_gb(self.inst, awake=self.state is S.AWAKE)
        return (self.inst.memory_gb or 0.0) + kv.held_gb(self.inst)

    @property
    def holds_memory(self) -> bool:
        return self.state in _HOLDS_MEMORY or (self.state is S.STARTING and self.launching)


# Instance settings that are router policy; every other field shapes the engine's program.
_POLICY_FIELDS = frozenset({"aliases", "memory_gb", "memory_auto", "kv_limit_gb", "sleep", "startup_timeout_seconds"})


def _engine_fields(inst: Instance) -> dict[str, Any]:
    return {f.name: getattr(inst, f.name) for f in fields(inst) if f.name not in _POLICY_FIELDS}


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[_Slot]
    exclude: frozenset[str]
    since: float = field(default_factory=time.monotonic)


class Lifecycle:
    """Instance states for the router; see the module docstring."""

    def __init__(
        self, config: Config, metrics: Metrics | None = None, events: EventBus | None = None, adapter: Callable[[Instance], EngineAdapter] = adapter_for
    ) -> None:
        self._config = config
        self._adapter = adapter  # tests may give engines of their own
        self._sm = config.sleep_manager
        self._metrics = metrics
        self.events = events or EventBus()
        self._slots = [_Slot(inst) for inst in config.instances]
        self._by_model: dict[str, list[_Slot]] = {}
        self._by_name: dict[str, _Slot] = {}
        self._queues: dict[str, deque[_Waiter]] = {}
        self._index()
        self._wakes: dict[str, asyncio.Task[ActionResult]] = {}  # single flight per model
        self._evicted: dict[str, list[str]] = {}  # per model being woken: who was slept for it
        # Models whose wake waits for room in the budget, in arrival order: memory freed for the
        # first is not taken by a later one (or by the model just slept, whose queue refills).
        self._room_queue: deque[str] = deque()
        self._changed = asyncio.Event()
        # Set on a state change or a reload: the auto-sleep loop computes its next due time again.
        # (A finished request only pushes idleness further away, so it does not need to.)
        self._policy_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_tasks: dict[str, asyncio.Task[Any]] = {}
        self._client: httpx.AsyncClient | None = None
        self._state_path = RunPaths(config.run_dir).router_state
        self._persisted = state_file.read(self._state_path)
        # Called when an instance becomes awake: (instance, fresh engine rather than a wake, state).
        self.on_awake: Callable[[Instance, bool, str], None] | None = None

    def _index(self) -> None:
        """Rebuild the lookups from `_slots`; a retiring slot keeps its name (for release) but takes no new requests."""
        self._by_model = {}
        for slot in self._slots:
            if not slot.retiring:
                self._by_model.setdefault(slot.inst.model, []).append(slot)
        self._by_name = {slot.inst.name: slot for slot in self._slots}
        self._queues = {model: self._queues[model] if model in self._queues else deque() for model in self._by_model}

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Probe every engine once, reconcile states in config order, start the loops."""
        self._client = httpx.AsyncClient(timeout=_PROBE_TIMEOUT_SECONDS)
        healthy = await asyncio.gather(*(self._probe(slot) for slot in self._slots))
        for slot, ok in zip(self._slots, healthy, strict=True):
            if ok:  # in config order, so the first instances keep their place in the budget
                await self._came_up(slot, trust_state_file=True)
            else:
                self._reconcile_not_running(slot)
        for slot in self._slots:
            log.info(
                "instance %s %s: %s engine at %s, %s",
                slot.inst.name,
                slot.inst.model,
                slot.inst.engine,
                slot.inst.url,
                slot.state.value,
                extra=logs.fields(instance=slot.inst.name, model=slot.inst.model, engine=slot.inst.engine, url=slot.inst.url, state=slot.state.value),
            )
            self._start_health_loop(slot)
        self._spawn(self._auto_sleep_loop())

    def reload(self, config: Config) -> list[str]:
        """Apply a new config in place (SPEC §14); returns one line per change to an instance.

        Unchanged instances keep their state and counters. An instance whose engine program
        changed is `starting` again (`kvctl up` restarts it). A removed instance stops
        taking requests, lets its in-flight ones finish, then leaves; waiters for a model
        that is gone get 404."""
        old = {slot.inst.name: slot for slot in self._slots if not slot.retiring}
        new = {inst.name: inst for inst in config.instances}
        self._config, self._sm = config, config.sleep_manager
        changes: list[str] = []
        slots: list[_Slot] = []
        for inst in config.instances:
            slot = old.get(inst.name)
            if slot is None:
                slot = _Slot(inst)
                changes.append(f"instance {inst.name}: added")
                self._emit(slot, S.STARTING, S.STARTING, "added by reload")
                self._start_health_loop(slot)
            elif slot.inst != inst:
                restarted = _engine_fields(slot.inst) != _engine_fields(inst)
                slot.inst = inst
                changes.append(f"instance {inst.name}: {'engine changed' if restarted else 'settings changed'}")
                if restarted:
                    slot.failures = 0
                    self._set_state(slot, S.STARTING, "reload: engine settings changed")
            slots.append(slot)
        for name, slot in old.items():
            if name not in new:
                slot.retiring = True
                slots.append(slot)
                changes.append(f"instance {name}: removed")
                self._spawn(self._retire(slot))
        self._slots = slots + [slot for slot in self._slots if slot.retiring and slot not in slots]
        gone = set(self._by_model) - {inst.model for inst in config.instances}
        for model in gone:
            self._fail_waiters(model, Unavailable(404, "model_not_found", f"model {model!r} was removed from the configuration"))
        self._index()
        for model in list(self._wakes):
            if model not in self._by_model:
                self._wakes.pop(model).cancel()
        self._policy_changed.set()
        for model in self._by_model:
            self._dispatch(model)
        self._notify()
        return changes

    def _reconcile_not_running(self, slot: _Slot) -> None:
        """An engine that does not answer at router start: `stopped` when its policy or kvctl
        stopped it (it starts on demand), else starting (it may be loading)."""
        persisted = self._persisted.get(slot.inst.name)
        if slot.inst.sleep.start == "stopped":
            slot.started_once = True
            self._set_state(slot, S.STOPPED, "policy: start stopped", sleep_cause="policy")
        elif persisted is not None and persisted.state == S.STOPPED.value:
            slot.started_once = True
            self._set_state(slot, S.STOPPED, "reconciled: stopped by kvctl", sleep_cause=persisted.cause, asleep_since=persisted.since)

    async def _retire(self, slot: _Slot) -> None:
        while slot.in_flight > 0:
            await self._wait_change(3600)
        task = self._health_tasks.pop(slot.inst.name, None)
        if task is not None and self._by_name.get(slot.inst.name) is slot:
            task.cancel()
        self._slots = [s for s in self._slots if s is not slot]
        if self._by_name.get(slot.inst.name) is slot:
            del self._by_name[slot.inst.name]
        log.info("instance %s %s: removed (drained)", slot.inst.name, slot.inst.model, extra=logs.fields(instance=slot.inst.name, model=slot.inst.model))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self._queues:
            self._fail_waiters(model, Unavailable(503, "model_unavailable", f"model {model}: the router is shutting down"))

        if self._client is not None:
            await self._client.aclose()

    def _processes(self) -> Supervisor:
        """supervisord of this run dir: the router starts and stops engines through it (SPEC §15).
        A new client each time: calls run in worker threads, and a client is not thread-safe."""
        return Supervisor(RunPaths(self._config.run_dir))

    def _start_health_loop(self, slot: _Slot) -> None:
        self._health_tasks[slot.inst.name] = self._spawn(self._health_loop(slot))

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
            raise Unavailable(
                429, "queue_full", f"model {model}: {len(queue)} requests already wait for it (max_queue_per_model={limit})", _QUEUE_FULL_RETRY_AFTER
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), excluded)
        queue.append(waiter)
        # A model that has to be started (not just woken) gets its engines' startup timeout.
        slots = self._by_model[model]
        cold = any(slot.state is S.STOPPED or slot.launching for slot in slots) and not any(
            slot.state in (S.AWAKE, S.ASLEEP, S.WAKING, S.DRAINING) for slot in slots
        )
        timeout, setting = self._sm.wake_timeout_seconds, "wake_timeout_seconds"
        if cold:
            timeout, setting = max(timeout, *(slot.inst.startup_timeout_seconds for slot in slots)), "startup_timeout_seconds"
        self._dispatch(model)
        try:
            await asyncio.wait({waiter.fut}, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(model, waiter)
            raise
        if not waiter.fut.done():
            self._abandon(model, waiter)
            raise Unavailable(
                503,
                "wake_timeout",
                f"model {model} did not become available within {setting}={timeout:g} (state: {self.model_state(model)})",
                _WAKE_FAILED_RETRY_AFTER,
            )
        return waiter.fut.result().inst  # raises the Unavailable a failed wake left there

    def release(self, inst: Instance) -> None:
        slot = self._by_name[inst.name]
        if slot.inst is not inst:  # a reload replaced the name's instance meanwhile: find the one that served
            slot = next((s for s in self._slots if s.inst is inst), slot)
        if slot.in_flight > 0:
            slot.in_flight -= 1
        slot.idle_since = slot.last_used = time.monotonic()
        self._notify()

    def report_connect_failure(self, inst: Instance) -> None:
        slot = self._by_name[inst.name]
        slot.failures = max(slot.failures, self._config.router.health_failure_threshold)
        if slot.state not in (S.DOWN, S.STARTING, S.FAILED):
            self._set_state(slot, S.DOWN, "connection refused; down until a health probe succeeds")
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
                "healthy": slot.state not in (S.DOWN, S.FAILED) and slot.failures == 0,
                "in_flight": slot.in_flight,
                "memory_gb": slot.inst.memory_gb,
                "state_since": slot.since,
                "cause": slot.sleep_cause,
                "failure": slot.failure,
                "policy": self._policy_view(slot),
                "sleeps_in": self._countdown(self._sleep_due(slot, time.monotonic())),
                "stops_in": self._countdown(self._stop_due(slot)),
            }
            for slot in self._slots
            if not slot.retiring and (model is None or slot.inst.model == model)
        ]

    def _policy_view(self, slot: _Slot) -> dict[str, Any]:
        sleep = slot.inst.sleep
        return {
            "idle_seconds": policy.idle_threshold(sleep, self._sm),
            "start": sleep.start,
            "stop_after_seconds": sleep.stop_after_seconds,
            "priority": sleep.priority,
            "verify": sleep.verify,
            "sleep_enabled": sleep.enabled,
        }

    @staticmethod
    def _countdown(due: float | None) -> float | None:
        return None if due is None else round(max(0.0, due), 1)

    def sleep_status(self) -> dict[str, Any]:
        now = time.time()
        sleeping: dict[str, dict[str, Any]] = {}
        for model, slots in self._by_model.items():
            if all(slot.state is S.ASLEEP for slot in slots):
                start = min(slot.asleep_since or now for slot in slots)
                causes = [slot.sleep_cause for slot in slots]
                cause = next((c for c in SLEEP_CAUSES if c in causes), None)
                sleeping[model] = {"sleep_start_time": start, "sleep_duration": now - start, "manual_sleep": cause == "manual", "cause": cause}
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

    async def sleep_model(self, model: str, cause: str = "manual") -> ActionResult:
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
            self._begin_drain(slot, cause, cancellable=cause != "manual")
        results = await asyncio.gather(*(self._complete_sleep(slot, cause, cause) for slot in targets))
        state = self.model_state(model)
        for result in results:
            if not result.success:
                return ActionResult(model, False, result.message, state, result.status)
        down = [f"{slot.inst.name} ({slot.state.value})" for slot in slots if slot.state in (S.DOWN, S.STARTING, S.FAILED)]
        if down:
            return ActionResult(model, False, f"model {model}: instance(s) {', '.join(down)} not ready", state, 503)
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
                wakeable = self._wakeable(slots)
                if wakeable:
                    task = self._start_wake(wakeable[0], "manual")
                elif all(slot.state in (S.DOWN, S.FAILED) for slot in slots):
                    return ActionResult(model, False, self._unavailable(model).message, self.model_state(model), 503)
            if task is not None:
                result = await asyncio.shield(task)
                if not result.success:
                    return ActionResult(model, False, result.message, self.model_state(model), result.status, result.evicted)
                if any(slot.state is S.AWAKE for slot in slots):
                    return ActionResult(model, True, result.message, self.model_state(model), 200, result.evicted)
                continue
            # draining, waking after a cancelled sleep, or starting: wait for it to settle
            if not await self._wait_change(deadline - time.monotonic()):
                return ActionResult(model, False, f"model {model} is still {self.model_state(model)}; try again", self.model_state(model), 504)

    # ------------------------------------------------------------------ the state machine

    def _set_state(
        self, slot: _Slot, new: InstanceState, cause: str, duration: float | None = None, *, sleep_cause: str | None = None, asleep_since: float | None = None
    ) -> None:
        """The only place an instance's state changes. `cause` says why, in words (logged and
        published); `duration` is the engine call's, for sleeps and wakes."""
        old = slot.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"instance {slot.inst.name}: illegal transition {old.value} -> {new.value}")
        slot.state = new
        slot.since = time.time()
        now = time.monotonic()
        if new is S.AWAKE and old is not S.DRAINING:
            slot.idle_since = slot.last_used = slot.awake_at = now  # a model never used is idle from readiness
            slot.used_since_awake = False
            if old is S.WAKING:
                slot.woken_at = now
        if old is S.STARTING:
            slot.launching = False
        if new in (S.ASLEEP, S.STOPPED):
            slot.asleep_since = asleep_since or slot.since
            slot.sleep_cause = sleep_cause
        elif new is not S.DRAINING:
            slot.sleep_cause = slot.asleep_since = None
        if new is not S.DRAINING:
            slot.cancellable = slot.cancel_requested = False
        if new is not S.FAILED:
            slot.failure = None
        self._emit(slot, old, new, cause, duration)
        if new is S.AWAKE and old is not S.DRAINING:
            self._became_awake(slot, old)
        if new in (S.AWAKE, S.ASLEEP, S.STOPPED):
            self._persist(slot)
        self._policy_changed.set()
        self._notify()

    def _emit(self, slot: _Slot, old: InstanceState, new: InstanceState, cause: str, duration: float | None = None) -> None:
        inst = slot.inst
        took = f" [engine call {duration:.2f}s]" if duration is not None else ""
        level = logging.WARNING if new in (S.DOWN, S.FAILED) else logging.INFO
        log.log(
            level,
            "%s %s: %s -> %s (%s)%s",
            inst.name,
            inst.model,
            old.value,
            new.value,
            cause,
            took,
            extra=logs.fields(instance=inst.name, model=inst.model, **{"from": old.value, "to": new.value}, cause=cause, duration_seconds=duration),
        )
        self.events.publish(Event(inst.name, inst.model, old.value, new.value, cause, duration))

    def _became_awake(self, slot: _Slot, old: InstanceState) -> None:
        """Started, restarted or woken: the KV-cache hook (kv_limit_gb) runs."""
        if self.on_awake is not None:
            self.on_awake(slot.inst, old is not S.WAKING, slot.state.value)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> bool:
        """Wait until something changes; False when `timeout` passed first."""
        if timeout <= 0:
            return False
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def _persist(self, slot: _Slot) -> None:
        record = state_file.Record(slot.state.value, slot.sleep_cause, slot.asleep_since)
        if self._persisted.get(slot.inst.name) == record:
            return
        self._persisted[slot.inst.name] = record
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
        slot.used_since_awake = True
        slot.last_used = time.monotonic()

    def _dispatch(self, model: str) -> None:
        """Serve queued requests in arrival order; if some remain, make the model come up."""
        queue = self._queues.get(model)
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
                    self._set_state(slot, S.AWAKE, "automatic sleep cancelled by a request")
                    return True
        if model in self._wakes or any(slot.state in (S.WAKING, S.STARTING) or slot.cancel_requested for slot in slots):
            return False
        wakeable = self._wakeable(slots)
        if wakeable:
            if self._sm.wakeup_on_request:
                self._start_wake(wakeable[0])
            else:
                self._fail_waiters(
                    model,
                    Unavailable(
                        503,
                        "model_asleep",
                        f"model {model} is {wakeable[0].state.value} and wakeup_on_request is false; wake it with `kvctl wake`",
                        _ASLEEP_RETRY_AFTER,
                    ),
                )
            return False
        if any(slot.state is S.DRAINING for slot in slots):
            return False  # a manual sleep: once asleep, the waiters wake it
        self._fail_waiters(model, self._unavailable(model))
        return False

    def _unavailable(self, model: str) -> Unavailable:
        """Why no instance of `model` can serve: a failed start names its reason."""
        failed = [slot for slot in self._by_model[model] if slot.state is S.FAILED]
        if failed and all(slot.state in (S.FAILED, S.DOWN) for slot in self._by_model[model]):
            reasons = "; ".join(f"instance {slot.inst.name} failed to start: {slot.failure}" for slot in failed)
            return Unavailable(503, "model_failed", f"model {model}: {reasons} (fix it, then `kvctl restart NAME` or `kvctl up`)", _WAKE_FAILED_RETRY_AFTER)
        retry = max(1, math.ceil(self._config.router.health_check_interval_seconds))
        return Unavailable(503, "model_unavailable", f"model {model}: no healthy instance (all down)", retry)

    @staticmethod
    def _wakeable(slots: list[_Slot]) -> list[_Slot]:
        """Replicas a wake can bring up, in the order to try them: asleep before stopped (a
        wake is cheaper than a cold start), failed wakes last, then config order."""
        candidates = (slot for slot in slots if slot.state in (S.ASLEEP, S.STOPPED))
        return sorted(candidates, key=lambda slot: (slot.state is S.STOPPED, slot.wake_failures))

    def _fail_waiters(self, model: str, error: Unavailable) -> None:
        queue = self._queues.get(model, deque())
        while queue:
            waiter = queue.popleft()
            if not waiter.fut.done():
                waiter.fut.set_exception(error.copy())

    def _abandon(self, model: str, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled or timed out): leave the queue, return what it got."""
        try:
            self._queues.get(model, deque()).remove(waiter)
        except ValueError:
            pass
        if not waiter.fut.done():
            waiter.fut.cancel()
        elif not waiter.fut.cancelled() and waiter.fut.exception() is None:
            self.release(waiter.fut.result().inst)

    # ------------------------------------------------------------------ wake

    def _start_wake(self, slot: _Slot, cause: str = "request") -> asyncio.Task[ActionResult]:
        model = slot.inst.model
        self._evicted[model] = []
        task = self._spawn(self._wake(slot, cause))
        self._wakes[model] = task
        task.add_done_callback(lambda t: self._wakes.pop(model) if self._wakes.get(model) is t else None)
        return task

    async def _wake(self, slot: _Slot, cause: str) -> ActionResult:
        """Bring an asleep or stopped instance up for its model's waiters: make room in the
        budget, then wake the engine (or start its process)."""
        model = slot.inst.model
        deadline = time.monotonic() + max(self._sm.wake_timeout_seconds, slot.inst.startup_timeout_seconds if slot.state is S.STOPPED else 0)
        self._room_queue.append(model)
        try:
            while slot.state in (S.ASLEEP, S.STOPPED):
                room, recheck = self._make_room(slot)
                if room:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    message = (
                        f"model {model} could not be woken within wake_timeout_seconds={self._sm.wake_timeout_seconds:g}: "
                        f"the memory budget ({self._sm.memory_budget_gb:g} GB) is held by {self._budget_holders(slot)}"
                    )
                    log.warning(message, extra=logs.fields(instance=slot.inst.name, model=model))
                    self._fail_waiters(model, Unavailable(503, "wake_timeout", message, _WAKE_FAILED_RETRY_AFTER))
                    return ActionResult(model, False, message, self.model_state(model), 504, self._evicted.pop(model, []))
                # Wait for a change, or for the moment a protected holder may be slept.
                await self._wait_change(remaining if recheck is None else min(remaining, recheck + 0.01))
        finally:
            self._room_queue.remove(model)
            self._notify()  # the next model in the room queue may go
        if slot.state is S.STOPPED:
            result = await self._cold_start(slot, deadline, cause)
        elif slot.state is not S.ASLEEP:  # it went down (or came back otherwise) meanwhile
            self._dispatch(model)
            return ActionResult(
                model,
                slot.state is S.AWAKE,
                f"instance {slot.inst.name} is {slot.state.value}",
                self.model_state(model),
                200 if slot.state is S.AWAKE else 503,
                self._evicted.pop(model, []),
            )
        else:
            self._set_state(slot, S.WAKING, cause)
            result = await self._finish_wake(slot, deadline, cause)
        result.evicted = self._evicted.pop(model, [])
        return result

    async def _cold_start(self, slot: _Slot, deadline: float, cause: str) -> ActionResult:
        """Start a stopped instance's process through supervisord and wait until it is ready."""
        inst, model = slot.inst, slot.inst.model
        slot.launching = True
        self._set_state(slot, S.STARTING, f"{cause}: starting the engine")
        self._count(self._metrics.starts_total if self._metrics else None, model, cause)
        try:
            await asyncio.to_thread(self._processes().start, inst.name)
        except KvctlError as exc:
            slot.launching = False
            self._set_state(slot, S.STOPPED, f"start failed: {_first_line(exc)}", sleep_cause=slot.sleep_cause)
            error = Unavailable(503, "start_failed", f"model {model}: starting instance {inst.name} failed: {exc}", _WAKE_FAILED_RETRY_AFTER)
            self._fail_waiters(model, error)
            return ActionResult(model, False, error.message, self.model_state(model), 502)
        while slot.state is S.STARTING and await self._wait_change(deadline - time.monotonic()):
            pass
        if slot.state is S.AWAKE:
            return ActionResult(model, True, f"model {model} is awake (started)", self.model_state(model), 200)
        if slot.state is S.STARTING:
            message = f"model {model}: instance {inst.name} did not become ready within startup_timeout_seconds={inst.startup_timeout_seconds:g}"
            self._fail_waiters(model, Unavailable(503, "start_timeout", message, _WAKE_FAILED_RETRY_AFTER))
            return ActionResult(model, False, message, self.model_state(model), 504)
        self._dispatch(model)  # failed or down: the waiters get why
        return ActionResult(model, False, f"instance {inst.name} is {slot.state.value}", self.model_state(model), 503)

    def _budget_holders(self, slot: _Slot) -> str:
        """Who holds the memory budget and why each cannot be slept, for a wake that waited in vain."""
        held = []
        for s in self._slots:
            if s.holds_memory and s.memory > 0 and s is not slot:
                why = (
                    "sleep disabled"
                    if not s.inst.sleep.enabled
                    else f"{s.in_flight} in flight"
                    if s.in_flight
                    else "requests queued"
                    if self._queues.get(s.inst.model)
                    else s.state.value
                )
                held.append(f"{s.inst.name} ({s.memory:g} GB, {why})")
        return ", ".join(held) or "nothing (the instance alone exceeds it)"

    async def _finish_wake(self, slot: _Slot, deadline: float, cause: str) -> ActionResult:
        """The engine part of a wake; the slot is already `waking`."""
        inst, model = slot.inst, slot.inst.model
        adapter = self._adapter(inst)
        started = time.monotonic()
        error: EngineError | None = None
        try:
            await adapter.wake(self._http, inst, timeout=max(deadline - started, 0.1))
        except EngineError as exc:
            error = exc
        sleeping = await adapter.is_sleeping(self._http, inst) if error is not None else False
        if error is None and inst.sleep.verify and slot.state is S.WAKING and not await self._verify(slot):
            return ActionResult(model, False, f"instance {inst.name} answered wrongly after waking; restarting it", self.model_state(model), 503)
        took = time.monotonic() - started
        if slot.state is not S.WAKING:
            self._dispatch(model)
            return ActionResult(model, False, f"instance {inst.name} went {slot.state.value} while waking", self.model_state(model), 503)
        if error is None or sleeping is False:
            slot.wake_failures = 0
            self._set_state(slot, S.AWAKE, cause, took)
            self._count_wake(model, "ok", took, cause)
            self._dispatch(model)
            return ActionResult(model, True, f"model {model} is awake", self.model_state(model), 200)
        timed_out = isinstance(error, EngineTimeout)
        slot.wake_failures += 1
        self._set_state(slot, S.ASLEEP, f"wake failed: {_first_line(error)}", took, sleep_cause=slot.sleep_cause, asleep_since=slot.asleep_since)
        self._count_wake(model, "timeout" if timed_out else "failed", took, cause)
        code = "wake_timeout" if timed_out else "wake_failed"
        message = f"model {model}: waking instance {inst.name} {'timed out' if timed_out else 'failed'}: {error}"
        self._fail_waiters(model, Unavailable(503, code, message, _WAKE_FAILED_RETRY_AFTER))
        return ActionResult(model, False, message, self.model_state(model), 504 if timed_out else 502)

    async def _verify(self, slot: _Slot) -> bool:
        """A woken engine must answer the fixed probe as it did when first ready (SPEC §15).
        On a mismatch: reload its weights and probe again; still wrong: restart it.
        True when it may serve; False when it is being restarted. Requests wait meanwhile."""
        inst, model = slot.inst, slot.inst.model
        adapter = self._adapter(inst)
        answer = await self._probe_answer(slot)
        if slot.reference is None or answer == slot.reference:
            slot.reference = slot.reference or answer
            self._count(self._metrics.verifications_total if self._metrics else None, model, "ok")
            return True
        log.warning(
            "%s %s: verify: the answer after waking differs from the one recorded at start; reloading the weights",
            inst.name,
            model,
            extra=logs.fields(instance=inst.name, model=model, check="verify", result="mismatch"),
        )
        try:
            await adapter.reload_weights(self._http, inst, timeout=inst.startup_timeout_seconds)
            answer = await self._probe_answer(slot)
        except EngineError as exc:
            log.warning("%s %s: verify: reloading the weights failed: %s", inst.name, model, _first_line(exc))
            answer = None
        if answer == slot.reference:
            log.info(
                "%s %s: verify: correct after reloading the weights",
                inst.name,
                model,
                extra=logs.fields(instance=inst.name, model=model, check="verify", result="reloaded"),
            )
            self._count(self._metrics.verifications_total if self._metrics else None, model, "reloaded")
            return True
        self._count(self._metrics.verifications_total if self._metrics else None, model, "restarted")
        slot.launching = slot.restarting = True
        self._set_state(slot, S.STARTING, "verify: still wrong after reloading the weights; restarting the engine")
        try:
            await asyncio.to_thread(self._processes().restart, inst.name, ENGINE_STOP_TIMEOUT_SECONDS)
        except KvctlError as exc:
            log.error("%s %s: verify: restarting the engine failed: %s", inst.name, model, _first_line(exc))
        finally:
            slot.restarting = False
        return False

    async def _probe_answer(self, slot: _Slot) -> str | None:
        try:
            return await self._adapter(slot.inst).probe(self._http, slot.inst)
        except EngineError as exc:
            log.warning("%s %s: verify probe failed: %s", slot.inst.name, slot.inst.model, _first_line(exc))
            return None

    def _make_room(self, slot: _Slot) -> tuple[bool, float | None]:
        """(True, None) when bringing `slot` up fits the memory budget now. Otherwise start
        putting to sleep what policy chooses (SPEC §15) and return (False, seconds until a
        protected holder may be chosen, or None) — the caller waits and asks again."""
        budget = self._sm.memory_budget_gb
        if budget is None or slot.memory <= 0:
            return True, None
        if self._room_queue and self._room_queue[0] != slot.inst.model:
            return False, None  # an earlier wake waits for room: its turn first
        held = sum(s.memory for s in self._slots if s.holds_memory)
        short = held + slot.memory - budget
        if short <= 1e-9:
            return True, None
        short -= sum(s.memory for s in self._slots if s.state is S.DRAINING)  # being freed already
        if short <= 1e-9:
            return False, None
        now = time.monotonic()
        by_name = {s.inst.name: s for s in self._slots}
        holders = [
            policy.Holder(
                name=s.inst.name,
                model=s.inst.model,
                memory_gb=s.memory,
                priority=s.inst.sleep.priority,
                last_used=s.last_used,
                awake_for=now - s.awake_at,
                busy=bool(s.in_flight or self._queues.get(s.inst.model)),
                used_since_awake=s.used_since_awake,
                can_sleep=s.inst.sleep.enabled and s.inst.model != slot.inst.model,
            )
            for s in self._slots
            if s.state is S.AWAKE
        ]
        queue = self._queues.get(slot.inst.model)
        starving = bool(queue and now - queue[0].since >= self._sm.max_swap_wait_seconds)
        victims = policy.choose_victims(holders, short, self._sm, starving=starving)
        if victims is None:
            return False, policy.next_protection_end(holders, self._sm)
        for victim in victims:
            self._evicted.setdefault(slot.inst.model, []).append(victim.name)
            self._sleep_in_background(by_name[victim.name], "budget", f"budget: making room for {slot.inst.model}")
        return False, None

    def _count_wake(self, model: str, result: str, seconds: float, cause: str) -> None:
        if self._metrics is not None:
            self._metrics.wakes_total.labels(model, result, cause.split(":")[0]).inc()
            self._metrics.wake_duration_seconds.labels(model).observe(seconds)

    @staticmethod
    def _count(counter: Any, model: str, label: str) -> None:
        if counter is not None:
            counter.labels(model, label).inc()

    # ------------------------------------------------------------------ sleep

    def _begin_drain(self, slot: _Slot, reason: str, *, cancellable: bool) -> None:
        """Stop admitting to `slot` (synchronously, so no other decision sees it awake)."""
        self._set_state(slot, S.DRAINING, reason)
        slot.cancellable = cancellable

    def _sleep_in_background(self, slot: _Slot, kind: str, reason: str) -> None:
        self._begin_drain(slot, reason, cancellable=kind == "idle")
        self._spawn(self._complete_sleep(slot, kind, reason))

    async def _complete_sleep(self, slot: _Slot, kind: str, reason: str) -> ActionResult:
        """Drain, call the engine, confirm, mark asleep. The slot is already `draining`.
        `kind` is the sleep cause (SLEEP_CAUSES); `reason` says it in words."""
        inst, model = slot.inst, slot.inst.model
        deadline = time.monotonic() + self._sm.drain_timeout_seconds
        while slot.in_flight > 0 and slot.state is S.DRAINING:
            if not await self._wait_change(deadline - time.monotonic()):
                message = (
                    f"sleep of {inst.name} aborted: {slot.in_flight} request(s) still in flight after drain_timeout_seconds={self._sm.drain_timeout_seconds:g}"
                )
                self._set_state(slot, S.AWAKE, f"sleep aborted: {slot.in_flight} request(s) still in flight after the drain timeout")
                self._dispatch(model)
                return ActionResult(model, False, message, self.model_state(model), 409)
        if slot.state is not S.DRAINING:
            return ActionResult(model, False, f"sleep of {inst.name} cancelled: instance is {slot.state.value}", self.model_state(model), 409)
        adapter = self._adapter(inst)
        slot.engine_call = True
        started = time.monotonic()
        error: EngineError | None = None
        try:
            await adapter.sleep(self._http, inst, timeout=self._sm.wake_timeout_seconds)
        except EngineError as exc:
            error = exc
        try:
            sleeping = await adapter.is_sleeping(self._http, inst)
        finally:
            slot.engine_call = False
        took = time.monotonic() - started
        if slot.state is not S.DRAINING:
            self._dispatch(model)
            return ActionResult(model, False, f"instance {inst.name} went {slot.state.value} while going to sleep", self.model_state(model), 503)
        if sleeping is False or (error is not None and sleeping is not True):
            if error is None:
                error = EngineError(f"{inst.name}: the engine accepted the sleep call but reports is_sleeping=false")
            self._set_state(slot, S.AWAKE, f"sleep failed: {_first_line(error)}", took)
            self._dispatch(model)
            return ActionResult(model, False, str(error), self.model_state(model), 504 if isinstance(error, EngineTimeout) else 502)
        if slot.cancel_requested:
            # A request arrived while the engine was going to sleep: wake it straight back.
            self._set_state(slot, S.WAKING, "automatic sleep cancelled by a request during the engine call", took)
            await self._finish_wake(slot, time.monotonic() + self._sm.wake_timeout_seconds, "request")
            return ActionResult(model, False, f"sleep of {inst.name} cancelled by a request", self.model_state(model), 409)
        self._set_state(slot, S.ASLEEP, reason, took, sleep_cause=kind)
        if self._metrics is not None:
            self._metrics.sleeps_total.labels(model, kind).inc()
        self._dispatch(model)
        return ActionResult(model, True, f"instance {inst.name} is asleep", self.model_state(model), 200)

    def _sleep_due(self, slot: _Slot, now: float) -> float | None:
        """Seconds until `slot` may be put to sleep for idleness (<= 0: now), or None."""
        threshold = policy.idle_threshold(slot.inst.sleep, self._sm)
        if threshold is None or slot.state is not S.AWAKE or slot.in_flight or self._queues.get(slot.inst.model):
            return None
        due = threshold - (now - slot.idle_since)
        if slot.woken_at is not None:  # min_sleep_duration keeps automatic sleeps from chasing wakes
            due = max(due, self._sm.min_sleep_duration - (now - slot.woken_at))
        return due

    def _stop_due(self, slot: _Slot) -> float | None:
        """Seconds until an asleep `slot` is stopped by its stop_after_seconds (<= 0: now), or None."""
        if slot.state is not S.ASLEEP or slot.asleep_since is None:
            return None
        return policy.stops_in(time.time() - slot.asleep_since, slot.inst.sleep)

    def _idle_slots(self) -> list[_Slot]:
        now = time.monotonic()
        return [slot for slot in self._slots if (due := self._sleep_due(slot, now)) is not None and due <= 0]

    async def _auto_sleep_loop(self) -> None:
        """Idle instances go to sleep, long-asleep ones stop (SPEC §6, §15). It wakes at the next
        moment one may be due (at most every check_interval_seconds), and on a state change or a
        reload."""
        wait = 0.0
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
            # races with the event, and `close()` then waits for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.05)):
                    await self._policy_changed.wait()
            self._policy_changed.clear()
            now = time.monotonic()
            wait = self._sm.check_interval_seconds
            for slot in list(self._slots):
                sleep_due, stop_due = self._sleep_due(slot, now), self._stop_due(slot)
                if sleep_due is not None and sleep_due <= 0:
                    threshold = policy.idle_threshold(slot.inst.sleep, self._sm)
                    self._sleep_in_background(slot, "idle", f"idle {threshold:g}s")
                elif stop_due is not None and stop_due <= 0:
                    self._spawn(self._stop(slot, "policy", f"policy: asleep {slot.inst.sleep.stop_after_seconds:g}s (stop_after_seconds)"))
                else:
                    # A busy instance is due no sooner than a full threshold after its last request.
                    threshold = policy.idle_threshold(slot.inst.sleep, self._sm) if slot.state is S.AWAKE else None
                    wait = min([wait, *(due for due in (sleep_due, stop_due, threshold) if due is not None)])

    async def _stop(self, slot: _Slot, kind: str, reason: str) -> ActionResult:
        """Stop an instance's process through supervisord (drained first when awake); state `stopped`."""
        inst, model = slot.inst, slot.inst.model
        if slot.state is S.AWAKE:
            self._begin_drain(slot, reason, cancellable=False)
            deadline = time.monotonic() + self._sm.drain_timeout_seconds
            while slot.in_flight > 0 and slot.state in (S.DRAINING,) and await self._wait_change(deadline - time.monotonic()):
                pass
        if slot.state not in (S.DRAINING, S.ASLEEP, S.DOWN, S.FAILED):
            return ActionResult(model, False, f"instance {inst.name} is {slot.state.value}; not stopped", self.model_state(model), 409)
        if slot.in_flight:
            self._set_state(slot, S.AWAKE, f"stop aborted: {slot.in_flight} request(s) still in flight after the drain timeout")
            self._dispatch(model)
            return ActionResult(model, False, f"stop of {inst.name} aborted: requests still in flight", self.model_state(model), 409)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._processes().stop, inst.name, ENGINE_STOP_TIMEOUT_SECONDS)
        except KvctlError as exc:
            if slot.state is S.DRAINING:
                self._set_state(slot, S.AWAKE, f"stop failed: {_first_line(exc)}")
            self._dispatch(model)
            return ActionResult(model, False, f"stopping {inst.name} failed: {exc}", self.model_state(model), 502)
        if slot.state in (S.DRAINING, S.ASLEEP, S.DOWN, S.FAILED):
            self._set_state(slot, S.STOPPED, reason, time.monotonic() - started, sleep_cause=kind)
            self._count(self._metrics.stops_total if self._metrics else None, model, kind)
        self._dispatch(model)
        stopped = slot.state in (S.STOPPED,)  # (after awaits: mypy's narrowing of slot.state no longer holds)
        return ActionResult(model, stopped, f"instance {inst.name} is {slot.state.value}", self.model_state(model), 200)

    async def stop_model(self, model: str) -> ActionResult:
        """`kvctl sleep M --stop`: stop every instance's process (SPEC §15)."""
        slots = self._by_model.get(model)
        if slots is None:
            return ActionResult(model, False, f"unknown model {model!r}", "unknown", 404)
        targets = [slot for slot in slots if slot.state is not S.STOPPED and not slot.inst.external]
        results = await asyncio.gather(*(self._stop(slot, "manual", "manual") for slot in targets))
        failed = [result for result in results if not result.success]
        if failed:
            return ActionResult(model, False, failed[0].message, self.model_state(model), failed[0].status)
        return ActionResult(model, True, f"model {model} is stopped" if targets else f"model {model} was already stopped", self.model_state(model), 200)

    # ------------------------------------------------------------------ health and truth

    async def _probe(self, slot: _Slot) -> bool | None:
        """One health probe (not traffic: it changes no idle time). None when the router itself
        is out of file descriptors: that says nothing about the engine."""
        try:
            response = await self._http.get(slot.inst.url + self._adapter(slot.inst).health_path)
        except httpx.HTTPError as exc:
            return None if _exhausted(exc) else False
        return response.status_code == 200

    async def _health_loop(self, slot: _Slot) -> None:
        while True:
            router = self._config.router
            fast = slot.state in (S.STARTING, S.DOWN, S.FAILED, S.STOPPED)
            await asyncio.sleep(min(_FAST_PROBE_SECONDS, router.health_check_interval_seconds) if fast else router.health_check_interval_seconds)
            if slot.restarting:
                continue
            healthy = await self._probe(slot)
            if healthy is None:
                continue
            if healthy:
                slot.failures = 0
                if slot.state in (S.STARTING, S.DOWN, S.FAILED, S.STOPPED):
                    await self._came_up(slot, trust_state_file=False)
                continue
            slot.failures += 1
            if slot.failures >= router.health_failure_threshold and slot.state not in (S.DOWN, S.STARTING, S.FAILED, S.STOPPED):
                self._set_state(slot, S.DOWN, f"health: {slot.failures} failed probes")
                self._dispatch(slot.inst.model)
            if slot.state in (S.DOWN, S.STARTING):
                self._check_failed(slot)

    def _check_failed(self, slot: _Slot) -> None:
        """An engine whose crash loop gave up (the launcher's record) is `failed`, with the reason."""
        record = procstate.read(self._config.run_dir, slot.inst.name)
        if record is not None and record.failed:
            slot.failure = record.reason
            self._set_state(slot, S.FAILED, f"start failed: {record.reason}")
            self._dispatch(slot.inst.model)

    async def _came_up(self, slot: _Slot, *, trust_state_file: bool) -> None:
        """Reconcile an instance that answers again with what the engine really is."""
        sleeping = await self._adapter(slot.inst).is_sleeping(self._http, slot.inst)
        persisted = self._persisted.get(slot.inst.name)
        was_asleep = trust_state_file and persisted is not None and persisted.state == S.ASLEEP.value
        if sleeping is None:
            # The engine cannot tell. One already running when the router started is as the
            # state file says; one that (re)started since is a fresh engine, so awake.
            sleeping, cause = was_asleep, "reconciled: state file says asleep" if was_asleep else "engine ready"
        else:
            cause = "reconciled: engine reports asleep" if sleeping else "engine ready"
        if slot.state not in (S.STARTING, S.DOWN, S.FAILED, S.STOPPED):
            return
        if sleeping:
            # Why and since when it sleeps survive a router restart (the state file), when known.
            known = persisted if persisted is not None and persisted.state == S.ASLEEP.value else None
            self._set_state(slot, S.ASLEEP, cause, sleep_cause=known.cause if known else None, asleep_since=known.since if known else None)
            self._dispatch(slot.inst.model)
            return
        if slot.inst.sleep.verify and slot.reference is None:
            slot.reference = await self._probe_answer(slot)  # what a correct engine answers
            if slot.state not in (S.STARTING, S.DOWN, S.FAILED, S.STOPPED):
                return
        launched_for_requests = slot.launching
        self._set_state(slot, S.AWAKE, cause)
        first_start, slot.started_once = not slot.started_once, True
        budget = self._sm.memory_budget_gb
        if first_start and not launched_for_requests and slot.inst.sleep.start == "asleep" and slot.inst.sleep.enabled:
            self._sleep_in_background(slot, "policy", "policy: start asleep")
        elif slot.state in (S.AWAKE,) and budget is not None and slot.inst.sleep.enabled and not launched_for_requests:
            held = sum(s.memory for s in self._slots if s.holds_memory)
            if held > budget + 1e-9:
                self._sleep_in_background(slot, "budget", f"budget: does not fit ({held:g} of {budget:g} GB awake)")
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


def _first_line(error: Exception) -> str:
    lines = str(error).splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _exhausted(exc: BaseException) -> bool:
    """Whether an error (or its cause) is the router's own lack of file descriptors."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in overload.EXHAUSTED:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
