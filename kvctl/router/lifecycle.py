"""The model lifecycle (SPEC §6): one state machine per instance, wake on request, safe
sleep, auto-sleep, the memory budget, and reconciling with the engines.

States (kvctl.router.states): ``starting → awake ⇄ draining → asleep → waking → awake``,
``down`` (not healthy), ``failed`` (its crash loop gave up) and ``stopped``. A state changes
only in :meth:`Lifecycle.set_state`, which refuses transitions that are not allowed, logs the
change with its cause, publishes it as an event and wakes everything waiting for a change.

Concurrency: everything runs on one event loop. Every decision reads the current state
and acts on it with no ``await`` in between, so the loop itself is the lock and no
decision is taken on a stale snapshot; code that must wait for something (a drain, room
in the memory budget) waits for a change notification and then decides again. Engine
calls are awaited outside any decision: an instance in ``draining`` or ``waking`` belongs
to the operation that put it there, and that operation re-checks the state when the
engine answers (the health loop may have marked the instance down meanwhile).

Here: the instances' state, the request queues and dispatch, wakes and cold starts. Parts:
the health loops and the verify probe (kvctl.router.health), the sleep side — drain, sleep,
stop, auto-sleep (kvctl.router.sleeping), room in the memory budget (kvctl.router.budget),
the JSON views (kvctl.router.views), the decisions as pure functions (kvctl.router.policy).
They share the state kept here through the attributes and methods without a leading underscore.
"""

from __future__ import annotations

import asyncio
import configparser
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import httpx

from kvctl.config import Config, Instance
from kvctl.engines import EngineAdapter, adapter_for
from kvctl.errors import EngineError, EngineTimeout, KvctlError
from kvctl.paths import RunPaths
from kvctl.router import logs, policy, state_file, views
from kvctl.router.budget import Budget
from kvctl.router.events import Event, EventBus, first_line
from kvctl.router.health import PROBE_TIMEOUT_SECONDS, Health
from kvctl.router.metrics import Metrics
from kvctl.router.sleeping import Sleeping
from kvctl.router.states import TRANSITIONS, ActionResult, InstanceState, Outcome, S, Slot, Unavailable, Waiter, model_state
from kvctl.supervisor import Supervisor

log = logging.getLogger("kvctl.router")

_QUEUE_FULL_RETRY_AFTER = 1
_WAKE_FAILED_RETRY_AFTER = 5
_ASLEEP_RETRY_AFTER = 30


class Lifecycle:
    """Instance states for the router; see the module docstring."""

    def __init__(self, config: Config, metrics: Metrics, events: EventBus | None = None, adapter: Callable[[Instance], EngineAdapter] = adapter_for) -> None:
        self.config = config
        self.adapter = adapter  # tests may give engines of their own
        self.sm = config.sleep_manager
        self.metrics = metrics
        self.events = events or EventBus()
        self.slots = [Slot(inst) for inst in config.instances]
        self.by_model: dict[str, list[Slot]] = {}
        self.by_name: dict[str, Slot] = {}
        self.queues: dict[str, deque[Waiter]] = {}
        self._index()
        self._wakes: dict[str, asyncio.Task[ActionResult]] = {}  # single flight per model
        self._changed = asyncio.Event()
        self._watchers = 0  # callers in wait_change()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: httpx.AsyncClient | None = None
        self.persisted = state_file.SleepStates(RunPaths(config.run_dir).router_state)
        self.health = Health(self)
        self.sleeping = Sleeping(self)
        self.budget = Budget(self)
        # Called when an instance becomes awake: (instance, fresh engine rather than a wake, state).
        self.on_awake: Callable[[Instance, bool, str], None] | None = None

    def _index(self) -> None:
        """Rebuild the lookups from `slots`; a retiring slot keeps its name (for release) but takes no new requests."""
        self.by_model = {}
        for slot in self.slots:
            if not slot.retiring:
                self.by_model.setdefault(slot.inst.model, []).append(slot)
        self.by_name = {slot.inst.name: slot for slot in self.slots}
        self.queues = {model: self.queues[model] if model in self.queues else deque() for model in self.by_model}

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Probe every engine once, reconcile states in config order, start the loops."""
        self._client = httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS)
        healthy = await asyncio.gather(*(self.health.probe(slot) for slot in self.slots))
        for slot, ok in zip(self.slots, healthy, strict=True):
            if ok:  # in config order, so the first instances keep their place in the budget
                await self.health.came_up(slot, trust_state_file=True)
            else:
                self.health.not_running(slot)
        for slot in self.slots:
            inst = slot.inst
            fields = logs.fields(instance=inst.name, model=inst.model, engine=inst.engine, url=inst.url, state=slot.state.value)
            log.info("instance %s %s: %s engine at %s, %s", inst.name, inst.model, inst.engine, inst.url, slot.state.value, extra=fields)
            self.health.watch(slot)
        self.spawn(self.sleeping.auto_sleep_loop())

    def reload(self, config: Config) -> list[str]:
        """Apply a new config in place (SPEC §14); returns one line per change to an instance.

        Unchanged instances keep their state and counters. An instance whose engine program
        changed is `starting` again (`kvctl up` restarts it). A removed instance stops
        taking requests, lets its in-flight ones finish, then leaves; waiters for a model
        that is gone get 404. A program that cannot be rendered raises ConfigError first."""
        before, after = _engines(self.config), _engines(config)
        old = {slot.inst.name: slot for slot in self.slots if not slot.retiring}
        self.config, self.sm = config, config.sleep_manager
        changes: list[str] = []
        slots: list[Slot] = []
        for inst in config.instances:
            slot = old.pop(inst.name, None)
            if slot is None:
                slot = Slot(inst)
                changes.append(f"instance {inst.name}: added")
                self._emit(slot, S.STARTING, S.STARTING, "added by reload")
                self.health.watch(slot)
            elif slot.inst != inst:
                restarted = before.get(inst.name) != after[inst.name]
                slot.inst = inst
                changes.append(f"instance {inst.name}: {'engine changed' if restarted else 'settings changed'}")
                if restarted:
                    slot.failures = 0
                    self.set_state(slot, S.STARTING, "reload: engine settings changed")
            slots.append(slot)
        for name, slot in old.items():  # removed from the config
            slot.retiring = True
            slots.append(slot)
            changes.append(f"instance {name}: removed")
            self.spawn(self._retire(slot))
        self.slots = slots + [slot for slot in self.slots if slot.retiring and slot not in slots]
        for model in set(self.by_model) - {inst.model for inst in config.instances}:
            self.fail_waiters(model, Unavailable("model_not_found", f"model {model!r} was removed from the configuration"))
        self._index()
        for model in list(self._wakes):
            if model not in self.by_model:
                self._wakes.pop(model).cancel()
        self.sleeping.policy_changed.set()
        for model in self.by_model:
            self.dispatch(model)
        self.notify()
        return changes

    async def _retire(self, slot: Slot) -> None:
        while slot.in_flight > 0:
            await self.wait_change(3600)
        self.health.forget(slot)
        self.slots = [s for s in self.slots if s is not slot]
        if self.by_name.get(slot.inst.name) is slot:
            del self.by_name[slot.inst.name]
        log.info("instance %s %s: removed (drained)", slot.inst.name, slot.inst.model, extra=logs.fields(instance=slot.inst.name, model=slot.inst.model))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self.queues:
            self.fail_waiters(model, Unavailable("model_unavailable", f"model {model}: the router is shutting down"))
        if self._client is not None:
            await self._client.aclose()

    def processes(self) -> Supervisor:
        """supervisord of this run dir: the router starts and stops engines through it (SPEC §15).
        A new client each time: calls run in worker threads, and a client is not thread-safe."""
        return Supervisor(RunPaths(self.config.run_dir))

    # ------------------------------------------------------------------ data plane

    async def acquire(self, model: str, exclude: Collection[str] = ()) -> Instance:
        """An awake, healthy instance of `model` with its in-flight count already taken.

        Waits in the model's FIFO queue while a wake runs (starting one if needed); a
        cancelled caller leaves the queue. Raises Unavailable."""
        if model not in self.by_model:
            raise Unavailable("model_not_found", f"model {model!r} is not configured")
        excluded = frozenset(exclude)
        queue = self.queues[model]
        if not queue:
            slot = self._pick(model, excluded)
            if slot is not None:
                self._take(slot)
                return slot.inst
        limit = self.config.router.max_queue_per_model
        if len(queue) >= limit:
            raise Unavailable("queue_full", f"model {model}: {len(queue)} requests already wait for it (max_queue_per_model={limit})", _QUEUE_FULL_RETRY_AFTER)
        waiter = Waiter(asyncio.get_running_loop().create_future(), excluded)
        queue.append(waiter)
        timeout, setting = self._wait_limit(model)
        self.dispatch(model)
        try:
            await asyncio.wait({waiter.fut}, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(model, waiter)
            raise
        if not waiter.fut.done():
            self._abandon(model, waiter)
            message = f"model {model} did not become available within {setting}={timeout:g} (state: {self.model_state(model)})"
            raise Unavailable("wake_timeout", message, _WAKE_FAILED_RETRY_AFTER)
        return waiter.fut.result().inst  # raises the Unavailable a failed wake left there

    def _wait_limit(self, model: str) -> tuple[float, str]:
        """How long a queued request waits, and the setting that says so: a model that has to be
        started (not just woken) gets its engines' startup timeout."""
        slots = self.by_model[model]
        cold = any(slot.state is S.STOPPED or slot.launching for slot in slots) and not any(
            slot.state in (S.AWAKE, S.ASLEEP, S.WAKING, S.DRAINING) for slot in slots
        )
        if cold:
            return max(self.sm.wake_timeout_seconds, *(slot.inst.startup_timeout_seconds for slot in slots)), "startup_timeout_seconds"
        return self.sm.wake_timeout_seconds, "wake_timeout_seconds"

    def release(self, inst: Instance) -> None:
        slot = self.by_name[inst.name]
        if slot.inst is not inst:  # a reload replaced the name's instance meanwhile: find the one that served
            slot = next((s for s in self.slots if s.inst is inst), slot)
        if slot.in_flight > 0:
            slot.in_flight -= 1
        slot.idle_since = slot.last_used = time.monotonic()
        self.notify()

    def report_connect_failure(self, inst: Instance) -> None:
        slot = self.by_name[inst.name]
        slot.failures = max(slot.failures, self.config.router.health_failure_threshold)
        if slot.state not in (S.DOWN, S.STARTING, S.FAILED):
            self.set_state(slot, S.DOWN, "connection refused; down until a health probe succeeds")
            self.dispatch(inst.model)

    # ------------------------------------------------------------------ introspection

    def in_flight(self, model: str) -> int:
        return sum(slot.in_flight for slot in self.by_model.get(model, ()))

    def queued(self, model: str) -> int:
        return len(self.queues.get(model, ()))

    def model_state(self, model: str) -> str:
        return model_state(slot.state for slot in self.by_model.get(model, ()))

    def states(self) -> dict[str, InstanceState]:
        """Each instance's state by name; removed ones still draining are left out."""
        return {slot.inst.name: slot.state for slot in self.slots if not slot.retiring}

    def instances(self, model: str | None = None) -> list[dict[str, Any]]:
        return views.instances(self, model)

    def sleep_status(self) -> dict[str, Any]:
        return views.sleep_status(self)

    def sleep_candidates(self) -> list[str]:
        """Models with an instance idle long enough to be slept now (whether or not
        auto-sleep is enabled; /sleep/status says that)."""
        now = time.monotonic()
        return sorted({slot.inst.model for slot in self.slots if (due := self.sleep_due(slot, now)) is not None and due <= 0})

    def sleep_due(self, slot: Slot, now: float) -> float | None:
        """Seconds until `slot` may be put to sleep for idleness (<= 0: now), or None."""
        if slot.state is not S.AWAKE or slot.in_flight or self.queues.get(slot.inst.model):
            return None
        since_woken = None if slot.woken_at is None else now - slot.woken_at
        return policy.sleep_due(slot.inst.sleep, self.sm, idle_for=now - slot.idle_since, since_woken=since_woken)

    def stop_due(self, slot: Slot) -> float | None:
        """Seconds until an asleep `slot` is stopped by its stop_after_seconds (<= 0: now), or None."""
        if slot.state is not S.ASLEEP or slot.asleep_since is None:
            return None
        return policy.stops_in(time.time() - slot.asleep_since, slot.inst.sleep)

    # ------------------------------------------------------------------ admin actions

    async def sleep_model(self, model: str, cause: str = "manual") -> ActionResult:
        return await self.sleeping.sleep_model(model, cause)

    async def stop_model(self, model: str) -> ActionResult:
        return await self.sleeping.stop_model(model)

    async def wake_model(self, model: str) -> ActionResult:
        slots = self.by_model.get(model)
        if slots is None:
            return self.result(model, Outcome.UNKNOWN_MODEL, f"unknown model {model!r}")
        deadline = time.monotonic() + self.sm.wake_timeout_seconds + self.sm.drain_timeout_seconds
        while True:
            if any(slot.state is S.AWAKE for slot in slots):
                return self.result(model, Outcome.DONE, f"model {model} is awake")
            task = self._wakes.get(model)
            if task is None:
                wakeable = self._wakeable(slots)
                if wakeable:
                    task = self._start_wake(wakeable[0], "manual")
                elif all(slot.state in (S.DOWN, S.FAILED) for slot in slots):
                    return self.result(model, Outcome.NOT_READY, self._unavailable(model).message)
            if task is not None:
                result = await asyncio.shield(task)
                if not result.success:
                    return self.result(model, result.outcome, result.message, result.evicted)
                if any(slot.state is S.AWAKE for slot in slots):
                    return self.result(model, Outcome.DONE, result.message, result.evicted)
                continue
            # draining, waking after a cancelled sleep, or starting: wait for it to settle
            if not await self.wait_change(deadline - time.monotonic()):
                return self.result(model, Outcome.TIMED_OUT, f"model {model} is still {self.model_state(model)}; try again")

    def result(self, model: str, outcome: Outcome, message: str, evicted: list[str] | None = None) -> ActionResult:
        """An action's result, with the model's state as it is now."""
        return ActionResult(model, outcome, message, self.model_state(model), evicted or [])

    # ------------------------------------------------------------------ the state machine

    def set_state(
        self, slot: Slot, new: InstanceState, cause: str, duration: float | None = None, *, sleep_cause: str | None = None, asleep_since: float | None = None
    ) -> None:
        """The only place an instance's state changes. `cause` says why, in words (logged and
        published); `duration` is the engine call's, for sleeps and wakes."""
        old = slot.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
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
        if new is S.AWAKE and old is not S.DRAINING and self.on_awake is not None:
            self.on_awake(slot.inst, old is not S.WAKING, slot.state.value)  # the KV-cache hook (kv_limit_gb)
        if new in (S.AWAKE, S.ASLEEP, S.STOPPED):
            self.persisted.save(slot.inst.name, state_file.Record(slot.state.value, slot.sleep_cause, slot.asleep_since))
        self.sleeping.policy_changed.set()
        self.notify()

    def _emit(self, slot: Slot, old: InstanceState, new: InstanceState, cause: str, duration: float | None = None) -> None:
        inst = slot.inst
        took = f" [engine call {duration:.2f}s]" if duration is not None else ""
        level = logging.WARNING if new in (S.DOWN, S.FAILED) else logging.INFO
        fields = logs.fields(instance=inst.name, model=inst.model, **{"from": old.value, "to": new.value}, cause=cause, duration_seconds=duration)
        log.log(level, "%s %s: %s -> %s (%s)%s", inst.name, inst.model, old.value, new.value, cause, took, extra=fields)
        self.events.publish(Event(inst.name, inst.model, old.value, new.value, cause, duration))

    def notify(self) -> None:
        if self._watchers:  # else nobody to wake, and no new Event per request (release)
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> bool:
        """Wait until something changes; False when `timeout` passed first."""
        if timeout <= 0:
            return False
        event = self._changed
        self._watchers += 1
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        finally:
            self._watchers -= 1
        return True

    def became_ready(self, slot: Slot, *, launched_for_requests: bool) -> None:
        """A (re)started engine is awake: put it to sleep if its policy starts it asleep or it
        does not fit the memory budget (unless requests started it), then serve the queue."""
        first_start, slot.started_once = not slot.started_once, True
        budget = self.sm.memory_budget_gb
        if first_start and not launched_for_requests and slot.inst.sleep.start == "asleep" and slot.inst.sleep.enabled:
            self.sleeping.in_background(slot, "policy", "policy: start asleep")
        elif slot.state is S.AWAKE and budget is not None and slot.inst.sleep.enabled and not launched_for_requests:
            held = self.budget.held()
            if policy.shortfall(held, 0.0, budget) > 0:
                self.sleeping.in_background(slot, "budget", f"budget: does not fit ({held:g} of {budget:g} GB awake)")
        self.dispatch(slot.inst.model)

    # ------------------------------------------------------------------ queue and dispatch

    def _pick(self, model: str, exclude: frozenset[str]) -> Slot | None:
        best: Slot | None = None
        for slot in self.by_model[model]:
            if slot.state is S.AWAKE and slot.inst.name not in exclude and (best is None or slot.in_flight < best.in_flight):
                best = slot
        return best

    def _take(self, slot: Slot) -> None:
        slot.in_flight += 1
        slot.used_since_awake = True
        slot.last_used = time.monotonic()

    def dispatch(self, model: str) -> None:
        """Serve queued requests in arrival order; if some remain, make the model come up."""
        queue = self.queues.get(model)
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
        slots = self.by_model[model]
        if any(slot.state is S.AWAKE for slot in slots):
            return False  # the waiters left excluded it (a retry); they wait for health or their deadline
        for slot in slots:
            if slot.state is S.DRAINING and slot.cancellable and not slot.cancel_requested:
                slot.cancel_requested = True
                if not slot.engine_call:
                    self.set_state(slot, S.AWAKE, "automatic sleep cancelled by a request")
                    return True
        if model in self._wakes or any(slot.state in (S.WAKING, S.STARTING) or slot.cancel_requested for slot in slots):
            return False
        wakeable = self._wakeable(slots)
        if wakeable and self.sm.wakeup_on_request:
            self._start_wake(wakeable[0])
        elif wakeable:
            message = f"model {model} is {wakeable[0].state.value} and wakeup_on_request is false; wake it with `kvctl wake`"
            self.fail_waiters(model, Unavailable("model_asleep", message, _ASLEEP_RETRY_AFTER))
        elif not any(slot.state is S.DRAINING for slot in slots):  # draining: a manual sleep; once asleep, the waiters wake it
            self.fail_waiters(model, self._unavailable(model))
        return False

    def _unavailable(self, model: str) -> Unavailable:
        """Why no instance of `model` can serve: a failed start names its reason."""
        failed = [slot for slot in self.by_model[model] if slot.state is S.FAILED]
        if failed and all(slot.state in (S.FAILED, S.DOWN) for slot in self.by_model[model]):
            reasons = "; ".join(f"instance {slot.inst.name} failed to start: {slot.failure}" for slot in failed)
            return Unavailable("model_failed", f"model {model}: {reasons} (fix it, then `kvctl restart NAME` or `kvctl up`)", _WAKE_FAILED_RETRY_AFTER)
        retry = max(1, math.ceil(self.config.router.health_check_interval_seconds))
        return Unavailable("model_unavailable", f"model {model}: no healthy instance (all down)", retry)

    @staticmethod
    def _wakeable(slots: list[Slot]) -> list[Slot]:
        """Replicas a wake can bring up, in the order policy tries them."""
        candidates = {slot.inst.name: slot for slot in slots if slot.state in (S.ASLEEP, S.STOPPED)}
        order = policy.wake_order([policy.Sleeper(name, slot.state is S.STOPPED, slot.wake_failures) for name, slot in candidates.items()])
        return [candidates[sleeper.name] for sleeper in order]

    def fail_waiters(self, model: str, error: Unavailable) -> None:
        queue = self.queues.get(model, deque())
        while queue:
            waiter = queue.popleft()
            if not waiter.fut.done():
                waiter.fut.set_exception(error.copy())

    def _abandon(self, model: str, waiter: Waiter) -> None:
        """A waiter gave up (cancelled or timed out): leave the queue, return what it got."""
        try:
            self.queues.get(model, deque()).remove(waiter)
        except ValueError:
            pass
        if not waiter.fut.done():
            waiter.fut.cancel()
        elif not waiter.fut.cancelled() and waiter.fut.exception() is None:
            self.release(waiter.fut.result().inst)

    # ------------------------------------------------------------------ wake

    def _start_wake(self, slot: Slot, cause: str = "request") -> asyncio.Task[ActionResult]:
        model = slot.inst.model
        self.budget.begin(model)
        task = self.spawn(self._wake(slot, cause))
        self._wakes[model] = task
        task.add_done_callback(lambda t: self._wakes.pop(model) if self._wakes.get(model) is t else None)
        return task

    async def _wake(self, slot: Slot, cause: str) -> ActionResult:
        """Bring an asleep or stopped instance up for its model's waiters: make room in the
        budget, then wake the engine (or start its process)."""
        model = slot.inst.model
        deadline = time.monotonic() + max(self.sm.wake_timeout_seconds, slot.inst.startup_timeout_seconds if slot.state is S.STOPPED else 0)
        if not await self.budget.wait_for_room(slot, deadline):
            message = (
                f"model {model} could not be woken within wake_timeout_seconds={self.sm.wake_timeout_seconds:g}: "
                f"the memory budget ({self.sm.memory_budget_gb:g} GB) is held by {self.budget.holders_text(slot)}"
            )
            log.warning(message, extra=logs.fields(instance=slot.inst.name, model=model))
            self.fail_waiters(model, Unavailable("wake_timeout", message, _WAKE_FAILED_RETRY_AFTER))
            return self.result(model, Outcome.TIMED_OUT, message, self.budget.evicted(model))
        if slot.state is S.STOPPED:
            result = await self._cold_start(slot, deadline, cause)
        elif slot.state is not S.ASLEEP:  # it went down (or came back otherwise) meanwhile
            self.dispatch(model)
            outcome = Outcome.DONE if slot.state is S.AWAKE else Outcome.NOT_READY
            return self.result(model, outcome, f"instance {slot.inst.name} is {slot.state.value}", self.budget.evicted(model))
        else:
            self.set_state(slot, S.WAKING, cause)
            result = await self.finish_wake(slot, deadline, cause)
        result.evicted = self.budget.evicted(model)
        return result

    async def _cold_start(self, slot: Slot, deadline: float, cause: str) -> ActionResult:
        """Start a stopped instance's process through supervisord and wait until it is ready."""
        inst, model = slot.inst, slot.inst.model
        slot.launching = True
        self.set_state(slot, S.STARTING, f"{cause}: starting the engine")
        self.metrics.starts_total.labels(model, cause).inc()
        try:
            await asyncio.to_thread(self.processes().start, inst.name)
        except KvctlError as exc:
            slot.launching = False
            self.set_state(slot, S.STOPPED, f"start failed: {first_line(exc)}", sleep_cause=slot.sleep_cause)
            error = Unavailable("start_failed", f"model {model}: starting instance {inst.name} failed: {exc}", _WAKE_FAILED_RETRY_AFTER)
            self.fail_waiters(model, error)
            return self.result(model, Outcome.ENGINE_FAILED, error.message)
        while slot.state is S.STARTING and await self.wait_change(deadline - time.monotonic()):
            pass
        if slot.state is S.AWAKE:
            return self.result(model, Outcome.DONE, f"model {model} is awake (started)")
        if slot.state is S.STARTING:
            message = f"model {model}: instance {inst.name} did not become ready within startup_timeout_seconds={inst.startup_timeout_seconds:g}"
            self.fail_waiters(model, Unavailable("start_timeout", message, _WAKE_FAILED_RETRY_AFTER))
            return self.result(model, Outcome.TIMED_OUT, message)
        self.dispatch(model)  # failed or down: the waiters get why
        return self.result(model, Outcome.NOT_READY, f"instance {inst.name} is {slot.state.value}")

    async def finish_wake(self, slot: Slot, deadline: float, cause: str) -> ActionResult:
        """The engine part of a wake; the slot is already `waking`."""
        inst, model = slot.inst, slot.inst.model
        adapter = self.adapter(inst)
        started = time.monotonic()
        error: EngineError | None = None
        try:
            await adapter.wake(self.http, inst, timeout=max(deadline - started, 0.1))
        except EngineError as exc:
            error = exc
        sleeping = await adapter.is_sleeping(self.http, inst) if error is not None else False
        if error is None and inst.sleep.verify and slot.state is S.WAKING and not await self.health.verify(slot):
            return self.result(model, Outcome.NOT_READY, f"instance {inst.name} answered wrongly after waking; restarting it")
        took = time.monotonic() - started
        if slot.state is not S.WAKING:
            self.dispatch(model)
            return self.result(model, Outcome.NOT_READY, f"instance {inst.name} went {slot.state.value} while waking")
        if error is None or sleeping is False:
            slot.wake_failures = 0
            self.set_state(slot, S.AWAKE, cause, took)
            self._count_wake(model, "ok", took, cause)
            self.dispatch(model)
            return self.result(model, Outcome.DONE, f"model {model} is awake")
        timed_out = isinstance(error, EngineTimeout)
        slot.wake_failures += 1
        self.set_state(slot, S.ASLEEP, f"wake failed: {first_line(error)}", took, sleep_cause=slot.sleep_cause, asleep_since=slot.asleep_since)
        self._count_wake(model, "timeout" if timed_out else "failed", took, cause)
        message = f"model {model}: waking instance {inst.name} {'timed out' if timed_out else 'failed'}: {error}"
        self.fail_waiters(model, Unavailable("wake_timeout" if timed_out else "wake_failed", message, _WAKE_FAILED_RETRY_AFTER))
        return self.result(model, Outcome.TIMED_OUT if timed_out else Outcome.ENGINE_FAILED, message)

    def _count_wake(self, model: str, result: str, seconds: float, cause: str) -> None:
        self.metrics.wakes_total.labels(model, result, cause.split(":")[0]).inc()
        self.metrics.wake_duration_seconds.labels(model).observe(seconds)

    # ------------------------------------------------------------------ helpers

    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("Lifecycle.start() was not called")
        return self._client

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lifecycle task failed", exc_info=task.exception())


def _engines(config: Config) -> dict[str, object]:
    """What runs each instance's engine: its supervisord program section as `kvctl up` renders
    it (supervisord restarts exactly the programs whose section changed), or, for an engine
    kvctl does not run, its address. The router's reload compares these, so it calls an engine
    changed exactly when `up` restarts it. Raises ConfigError when the config cannot be rendered."""
    from kvctl import render  # its template engine only when a reload needs it, not at router start

    sections = configparser.RawConfigParser(interpolation=None)
    sections.read_string(render.render_text(config))
    return {inst.name: (inst.engine, inst.url) if inst.external else dict(sections[f"program:{inst.name}"]) for inst in config.instances}
