"""The router's side of kvcached (SPEC §13): each kvcached instance's KV used / limit /
prealloc read from its segment, limits set with their cause (logged and published, §11),
`kv_limit_gb` applied whenever an engine becomes ready, and each engine's capacity.

An instance is a kvcached one when its environment has ENABLE_KVCACHED=true; a segment that
is missing (engine not started, died, no kvcached) is unknown: None, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from kvctl import gpu, kvcached, reaper
from kvctl.config import Config, Instance
from kvctl.kvcached import KvInfo
from kvctl.router import logs
from kvctl.router.events import Event, EventBus

log = logging.getLogger("kvctl.router")
GiB = 2**30


def read(inst: Instance) -> KvInfo | None:
    return kvcached.for_env(inst.env)


def held_gb(inst: Instance) -> float:
    """The KV cache a kvcached engine really holds (used + prealloc), in GB; 0 when unknown."""
    info = read(inst)
    return info.held_bytes / GiB if info is not None else 0.0


# `memory_gb: auto`: each engine's processes, looked up again at most this often (a /proc scan).
_PIDS_TTL_SECONDS = 2.0
_pids: dict[str, tuple[float, list[int]]] = {}
_awake_gb: dict[str, float] = {}  # the figure last measured while awake: what a wake takes again


def _engine_pids(inst: Instance) -> list[int]:
    """The processes of the instance's engine in this tree (launcher, engine, its workers): they
    carry its KVCTL_INSTANCE marker, `NAME@RUN` (kvctl.reaper). The router is a program of the
    same supervisord, so its own marker's RUN part is this tree's. None outside a tree."""
    own = os.environ.get(reaper.MARKER_VAR, "")
    if "@" not in own:
        return []
    now = time.monotonic()
    cached = _pids.get(inst.name)
    if cached is None or now - cached[0] > _PIDS_TTL_SECONDS:
        cached = _pids[inst.name] = (now, reaper.marked(f"{inst.name}@{own.rpartition('@')[2]}"))
    return cached[1]


def gpu_gb(inst: Instance, awake: bool) -> float:
    """`memory_gb: auto`: the GPU memory the engine's processes hold now (NVML, kvctl.gpu), its
    KV cache included. Awake, that is the figure; otherwise (waking, draining, asleep) the larger
    of it and the last figure measured awake, which a wake takes again. 0 until first measured."""
    pids = _engine_pids(inst)
    measured = gpu.process_memory_bytes(pids) if pids else None
    if measured is None:
        return _awake_gb.get(inst.name, 0.0)
    if awake:
        _awake_gb[inst.name] = measured / GiB
        return measured / GiB
    return max(measured / GiB, _awake_gb.get(inst.name, 0.0))


class KvControl:
    def __init__(self, config: Config, events: EventBus) -> None:
        self.config = config
        self._events = events
        # The limit each engine's segment had when the router first saw that engine ready:
        # the engine creates it with its capacity. `30%` in `kvctl kv limit` is of this.
        self._capacity: dict[str, int] = {}
        self._segment: dict[str, int | None] = {}  # the inode of each instance's segment, as last handled

    def _identity(self, inst: Instance) -> int | None:
        try:
            return os.stat(kvcached.path(kvcached.segment_name(inst.env))).st_ino
        except OSError:
            return None

    async def watch(self, states: Callable[[], Mapping[str, str]]) -> None:
        """A restarted engine makes a new segment (its capacity as the limit), often between
        two health probes, so the router never sees it down: a new segment of an awake
        instance counts as a fresh engine (also one that appeared after the instance became
        ready). Until cancelled."""
        while True:
            await asyncio.sleep(self.config.router.health_check_interval_seconds)
            current = states()
            for inst in self.instances():
                now = self._identity(inst)
                if now is not None and now != self._segment.get(inst.name) and current.get(inst.name) == "awake":
                    self.became_awake(inst, True, "awake")  # records `now`

    def configure(self, config: Config) -> None:
        self.config = config

    def instances(self, model: str | None = None) -> list[Instance]:
        return [i for i in self.config.instances if kvcached.enabled(i.env) and (model is None or i.model == model)]

    def view(self, inst: Instance) -> dict[str, int] | None:
        """`{"used_bytes", "limit_bytes", "prealloc_bytes"}` as /models reports it, or None."""
        info = read(inst)
        return info.as_json() if info is not None else None

    def model_view(self, model: str) -> dict[str, int] | None:
        """The model's instances together (those whose segment is known), or None."""
        known = [info for info in (read(i) for i in self.instances(model)) if info is not None]
        if not known:
            return None
        return {
            "used_bytes": sum(i.used_bytes for i in known),
            "limit_bytes": sum(i.limit_bytes for i in known),
            "prealloc_bytes": sum(i.prealloc_bytes for i in known),
        }

    def capacity(self, inst: Instance) -> int | None:
        if inst.name not in self._capacity:
            info = read(inst)
            if info is None:
                return None
            self._capacity[inst.name] = info.limit_bytes
        return self._capacity[inst.name]

    def became_awake(self, inst: Instance, fresh: bool, state: str) -> None:
        """The lifecycle's hook: a (re)started engine's segment shows its capacity; then
        `kv_limit_gb` is applied (after every start, restart and wake)."""
        if not kvcached.enabled(inst.env):
            return
        info = read(inst)
        if info is None:
            if inst.kv_limit_gb is not None:
                log.warning(
                    "%s %s: kv_limit_gb not applied: no kvcached segment %s",
                    inst.name,
                    inst.model,
                    kvcached.segment_name(inst.env),
                    extra=logs.fields(instance=inst.name, model=inst.model),
                )
            return
        if fresh or inst.name not in self._capacity:
            self._capacity[inst.name] = info.limit_bytes
            self._segment[inst.name] = self._identity(inst)
        if inst.kv_limit_gb is not None:
            self.set_limit(inst, int(inst.kv_limit_gb * GiB), "config: kv_limit_gb", state)

    def set_limit(self, inst: Instance, limit_bytes: int, cause: str, state: str) -> KvInfo | None:
        """Write the limit; the segment as it was before, or None when there is none. A change
        is logged (`INSTANCE MODEL: kv limit 2.0 GiB -> 1.0 GiB (cause)`) and published as an
        event whose state does not change."""
        before = kvcached.write_limit(kvcached.segment_name(inst.env), limit_bytes)
        if before is None or before.limit_bytes == limit_bytes:
            return before
        change = f"kv limit {kvcached.size(before.limit_bytes)} -> {kvcached.size(limit_bytes)}"
        below = f"; {kvcached.size(before.used_bytes)} in use, freed as requests finish" if before.used_bytes > limit_bytes else ""
        log.info(
            "%s %s: %s (%s)%s",
            inst.name,
            inst.model,
            change,
            cause,
            below,
            extra=logs.fields(instance=inst.name, model=inst.model, kv_limit_from=before.limit_bytes, kv_limit_to=limit_bytes, cause=cause),
        )
        self._events.publish(Event(inst.name, inst.model, state, state, f"{change} ({cause})"))
        return before

    def readings(self) -> list[tuple[Instance, KvInfo | None]]:
        return [(inst, read(inst)) for inst in self.instances()]


def limit_request(body: Any) -> tuple[str, float, str | None] | str:
    """`{"bytes": N}` or `{"percent": P}` (of each instance's capacity), optional `"instance"`:
    ("bytes"|"percent", value, instance), or what is wrong with it."""
    if not isinstance(body, dict):
        return 'the body must be a JSON object: {"bytes": N} or {"percent": P}'
    unknown = set(body) - {"bytes", "percent", "instance"}
    if unknown:
        return f'unknown field \'{sorted(unknown)[0][:40]}\': give "bytes" or "percent", and optionally "instance"'
    instance = body.get("instance")
    if instance is not None and not isinstance(instance, str):
        return "'instance' must be an instance name"
    if ("bytes" in body) == ("percent" in body):
        return 'give exactly one of "bytes" (an integer >= 0) or "percent" (0-100]'
    if "bytes" in body:
        value = body["bytes"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**63:
            return "'bytes' must be an integer >= 0"
        return "bytes", float(value), instance
    value = body["percent"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        return "'percent' must be a number in (0, 100]"
    return "percent", float(value), instance
