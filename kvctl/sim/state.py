"""The simulated engine's state: settings, counters and the sleep/wake transitions.

Memory is modelled as tagged regions, as both engines do: "weights" and "kv_cache"
(SGLang also "cuda_graph"). The engine sleeps while any region is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvctl.kvcached import Segment
from kvctl.sim.settings import SimSettings

MEMORY_SHARE = {"weights": 0.6, "kv_cache": 0.4, "cuda_graph": 0.0}  # of memory_gb, per tagged region
TAGS = {"vllm": ("weights", "kv_cache"), "sglang": ("weights", "kv_cache", "cuda_graph")}
# Without --memory-gb (and no memory_gb in kvctl.yaml), the memory it reports while awake.
DEFAULT_MEMORY_GB = 1.0


@dataclass(frozen=True)
class Settings:
    model: str
    port: int
    host: str = "127.0.0.1"
    memory_gb: float = DEFAULT_MEMORY_GB
    sim: SimSettings = field(default_factory=SimSettings)
    engine_args: tuple[str, ...] = field(default=())  # the real engine's flags: accepted, mostly ignored


async def _forever() -> None:
    await asyncio.Event().wait()


# How often a request waiting for KV room reads the limit again: another process (kvctl,
# kvcached's own tool) changes it in shared memory, which sends no notification.
_LIMIT_POLL_SECONDS = 0.05


class KvPool:
    """kvcached's side of the protocol (SPEC §13): each running request holds (prompt +
    generated tokens) x bytes_per_token of KV cache, published as `used` in the segment. A
    request is admitted only when its whole reservation (prompt + max_tokens) fits under the
    segment's limit, in arrival order; until then it waits inside the engine, as vLLM's
    scheduler keeps it waiting. While the engine sleeps it holds no KV (used 0)."""

    def __init__(self, segment: Segment, bytes_per_token: int) -> None:
        self.segment = segment
        self.bytes_per_token = bytes_per_token
        self.reserved = 0  # what admitted requests may grow to
        self.tokens = 0  # held by running requests now
        self.sleeping = False
        self._queue: deque[object] = deque()
        self._changed = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        return 0 if self.sleeping else self.tokens * self.bytes_per_token

    def limit(self) -> int:
        return self.segment.limit()

    async def admit(self, tokens: int) -> None:
        need = tokens * self.bytes_per_token
        ticket = object()
        self._queue.append(ticket)
        try:
            while self._queue[0] is not ticket or self.reserved + need > self.segment.limit():
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_LIMIT_POLL_SECONDS):
                        await changed.wait()
            self.reserved += need
        finally:
            self._queue.remove(ticket)
            self._notify()

    def grow(self, tokens: int) -> None:
        self.tokens += tokens
        self.publish()

    def leave(self, reserved_tokens: int, held_tokens: int) -> None:
        self.reserved -= reserved_tokens * self.bytes_per_token
        self.tokens -= held_tokens
        self.publish()
        self._notify()

    def set_sleeping(self, sleeping: bool) -> None:
        self.sleeping = sleeping
        self.publish()

    def publish(self) -> None:
        self.segment.set_usage(self.used_bytes)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class EngineState:
    def __init__(self, settings: Settings, kv: KvPool | None = None) -> None:
        self.settings = settings
        self.kv = kv
        self.sim = settings.sim
        self.dialect = settings.sim.dialect
        self.tags = TAGS[self.dialect]
        self._rng = random.Random(settings.sim.seed)
        # Weights released without a CPU backup are lost until reloaded (SGLang's flag).
        self._cpu_backup = self.dialect == "vllm" or "--enable-weights-cpu-backup" in settings.engine_args
        self._transition = asyncio.Lock()
        self.released: set[str] = set()
        self.awake = asyncio.Event()  # cleared while new generations must park (vLLM)
        self.awake.set()
        self.frozen = False  # vLLM mode=keep: running generations pause until woken
        self.abort_epoch = 0  # vLLM mode=abort: bumped to end running generations
        self.weights_loaded = True
        self.running = 0
        self.waiting = 0
        self.running_tokens = 0
        self.max_in_flight = 0
        self.requests_served = 0
        self.embeddings_served = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.failed = 0
        self.aborted = 0
        self.sleep_aborted = 0
        self.sleep_calls = 0
        self.wake_calls = 0
        self.update_weights_calls = 0
        self.last_sleep_params: dict[str, Any] | None = None
        self.last_wake_params: dict[str, Any] | None = None

    @property
    def sleeping(self) -> bool:
        return bool(self.released)

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    @property
    def memory_bytes(self) -> int:
        held = 1.0 - sum(MEMORY_SHARE[t] for t in self.released)
        return int(self.settings.memory_gb * held * 2**30)

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "dialect": self.dialect,
            "pid": os.getpid(),
            "sleeping": self.sleeping,
            "released_tags": sorted(self.released),
            "memory_bytes": self.memory_bytes,
            "weights_loaded": self.weights_loaded,
            "requests_served": self.requests_served,
            "embeddings_served": self.embeddings_served,
            "in_flight": self.in_flight,
            "running": self.running,
            "waiting": self.waiting,
            "max_in_flight": self.max_in_flight,
            "aborted": self.aborted,
            "sleep_aborted": self.sleep_aborted,
            "failed": self.failed,
            "sleep_calls": self.sleep_calls,
            "wake_calls": self.wake_calls,
            "update_weights_calls": self.update_weights_calls,
            "last_sleep_params": self.last_sleep_params,
            "last_wake_params": self.last_wake_params,
        }

    # -- requests ------------------------------------------------------------------

    def maybe_crash(self) -> None:
        """--crash-after N: a generation arriving after N were served finds the engine dead."""
        crash_after = self.sim.crash_after
        if crash_after is not None and self.requests_served >= crash_after:
            _crash(crash_after)

    def arrive(self) -> None:
        """A request arrived: it waits (parked while asleep) until `start`."""
        self.waiting += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def start(self, tokens: int) -> None:
        self.waiting -= 1
        self.running += 1
        self.running_tokens += tokens

    def leave(self, started: bool, tokens: int) -> None:
        if started:
            self.running -= 1
            self.running_tokens -= tokens
            if self.kv is not None:
                self.kv.leave(tokens, 0)
        else:
            self.waiting -= 1

    def should_fail(self) -> bool:
        if self.sim.fail_rate and self._rng.random() < self.sim.fail_rate:
            self.failed += 1
            return True
        return False

    def served(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests_served += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        crash_after = self.sim.crash_after
        if crash_after is not None and self.requests_served >= crash_after:
            # Let the last bytes reach the client, then die like a crashed engine.
            asyncio.get_running_loop().call_later(0.05, _crash, crash_after)

    # -- vLLM sleep API ------------------------------------------------------------

    async def vllm_sleep(self, level: int, mode: str) -> None:
        self.sleep_calls += 1
        if self.sim.hang_on_sleep:
            await _forever()
        async with self._transition:
            if self.sleeping:
                return
            self.awake.clear()  # from now on new requests park
            if mode == "abort":
                self.abort_epoch += 1
            elif mode == "wait":
                while self.running:  # noqa: ASYNC110 - polls its running count as vLLM's wait mode does
                    await asyncio.sleep(0.01)
            else:  # keep
                self.frozen = True
            await asyncio.sleep(self.sim.sleep_seconds)
            self.released = set(self.tags)
            self._kv_sync()
            if level >= 2:
                self.weights_loaded = False  # level 2 discards the weights

    async def vllm_wake(self, tags: list[str]) -> None:
        self.wake_calls += 1
        if self.sim.hang_on_wake:
            await _forever()
        async with self._transition:
            if not self.sleeping:
                return
            await asyncio.sleep(self.sim.wake_seconds)
            self.released -= set(tags or self.tags)
            self._kv_sync()
            if not self.released:
                self.frozen = False
                self.awake.set()
                if self.sim.wake_corrupts_weights:
                    self.weights_loaded = False

    # -- SGLang memory API ---------------------------------------------------------

    async def release(self, tags: list[str]) -> None:
        self.sleep_calls += 1
        if self.sim.hang_on_sleep:
            await _forever()
        async with self._transition:
            await asyncio.sleep(self.sim.sleep_seconds)
            tags = tags or list(self.tags)
            self.released |= set(tags)
            self._kv_sync()
            if "weights" in tags and not self._cpu_backup:
                self.weights_loaded = False

    async def resume(self, tags: list[str]) -> None:
        self.wake_calls += 1
        if self.sim.hang_on_wake:
            await _forever()
        async with self._transition:
            await asyncio.sleep(self.sim.wake_seconds)
            self.released -= set(tags or self.tags)
            self._kv_sync()
            if self.sim.wake_corrupts_weights and not self.released:
                self.weights_loaded = False

    def _kv_sync(self) -> None:
        """Released KV-cache memory holds no KV: the segment shows used 0 until it is back."""
        if self.kv is not None:
            self.kv.set_sleeping("kv_cache" in self.released)

    def reload_weights(self) -> bool:
        """Weights read again from disk; impossible while their memory is released."""
        self.update_weights_calls += 1
        if "weights" in self.released:
            return False
        if not self.sim.reload_no_effect:
            self.weights_loaded = True
        return True


def _crash(crash_after: int) -> None:
    sys.stderr.write(f"kvctl.sim: crash_after={crash_after} reached, exiting\n")
    sys.stderr.flush()
    os._exit(1)
