"""The lifecycle's vocabulary: instance states and the transitions allowed between them, the
router's view of one instance (`Slot`), and the outcomes lifecycle operations report.

Nothing here speaks HTTP: the admin API (kvctl.router.admin) and the data plane
(kvctl.router.errors) map outcomes and reasons to status codes, each in one table.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvctl.config import Instance
from kvctl.router import kv


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
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
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
HOLDS_MEMORY = frozenset({S.AWAKE, S.DRAINING, S.WAKING})
# States in which the engine is not (known to be) serving: the health loop probes them fast
# and an answer reconciles them with what the engine really is.
NOT_RUNNING = frozenset({S.STARTING, S.DOWN, S.FAILED, S.STOPPED})
# Aggregate model state: the first of these that any replica is in.
_MODEL_STATE_ORDER = (S.AWAKE, S.WAKING, S.DRAINING, S.ASLEEP, S.STARTING, S.STOPPED, S.DOWN, S.FAILED)


def model_state(states: Iterable[InstanceState]) -> str:
    """The state of a model from its replicas' states ("unknown" with none)."""
    present = set(states)
    return next((state.value for state in _MODEL_STATE_ORDER if state in present), "unknown")


@dataclass(eq=False)
class Slot:
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
        return self.state in HOLDS_MEMORY or (self.state is S.STARTING and self.launching)


@dataclass(eq=False)
class Waiter:
    """A request queued for its model: resolved with the slot that serves it."""

    fut: asyncio.Future[Slot]
    exclude: frozenset[str]
    since: float = field(default_factory=time.monotonic)


class Outcome(enum.StrEnum):
    """How a manual sleep, wake or stop ended. The admin API maps each to its HTTP status."""

    DONE = "done"
    UNKNOWN_MODEL = "unknown_model"
    REFUSED = "refused"  # policy forbids it, or a drain or a request under way called it off
    NOT_READY = "not_ready"  # an instance is down, starting or failed (or went so meanwhile)
    ENGINE_FAILED = "engine_failed"  # the engine or supervisord refused the call
    TIMED_OUT = "timed_out"  # the engine, or a wake or drain under way, took too long


@dataclass
class ActionResult:
    """The outcome of a manual sleep, wake or stop, in words and as an `Outcome`."""

    model_name: str
    outcome: Outcome
    message: str
    state: str
    evicted: list[str] = field(default_factory=list)  # instances put to sleep to make room

    @property
    def success(self) -> bool:
        return self.outcome is Outcome.DONE

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "success": self.success, "message": self.message, "state": self.state, "evicted": self.evicted}


class Unavailable(Exception):
    """No instance can serve now; `code` says why (the OpenAI error code the client gets)."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def copy(self) -> Unavailable:
        return Unavailable(self.code, self.message, self.retry_after)
