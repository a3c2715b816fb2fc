"""kvcached's KV-cache segment protocol (SPEC §13), protocol only: no engine import.

Each kvcached engine keeps a POSIX shared-memory segment ``/dev/shm/NAME`` (NAME = its
``KVCACHED_IPC_NAME``) of 24 bytes: three native-endian int64 ``limit, used, prealloc``
(bytes). Readers hold a shared ``flock`` on it, writers an exclusive one; the engine creates
it with its full capacity as the limit, keeps ``used``/``prealloc`` current and resizes its
pool when ``limit`` changes. kvcached's own ``kvctl list/limit/watch`` speaks the same.

A missing or malformed segment is "unknown" (``None``), never an error: an engine that has
not started, has no kvcached, or died is an ordinary sight.

Also here, because they are the protocol seen from the command line: writing a limit with no
router (`limit_directly`), finding who else uses a segment (`shared_with_others`, since
/dev/shm names are per machine while kvctl trees are per run dir) and removing the segments
of engines that died (`remove_unused`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl import reaper
from kvctl.errors import KvctlError, UsageError

if TYPE_CHECKING:
    from kvctl.config import Config

SHM_DIR = Path("/dev/shm")
SEGMENT_BYTES = 24
_LAYOUT = struct.Struct("=qqq")  # native byte order, no padding: limit, used, prealloc
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_NAME = 64
DEFAULT_NAME = "kvcached_mem_info"  # kvcached's name when KVCACHED_IPC_NAME is not set
OWNED_PREFIX = "kvctl_"  # every name kvctl gives an instance (config.kvcached_ipc_name)
SIM_KV_BYTES_PER_TOKEN = 128 * 1024  # the simulated engine's default KV cache per token


@dataclass(frozen=True)
class KvInfo:
    limit_bytes: int
    used_bytes: int
    prealloc_bytes: int

    @property
    def held_bytes(self) -> int:
        """What the engine really holds on the GPU for its KV cache."""
        return self.used_bytes + self.prealloc_bytes

    def as_json(self) -> dict[str, int]:
        return {"used_bytes": self.used_bytes, "limit_bytes": self.limit_bytes, "prealloc_bytes": self.prealloc_bytes}


def size(n: int) -> str:
    """Bytes for a message: `2.0 GiB`, `512 MiB`."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def sanitize(name: str) -> str:
    """The segment name kvcached makes of KVCACHED_IPC_NAME: letters, digits, '_' and '-'
    kept, every other character '-', at most 64 characters."""
    return _UNSAFE.sub("-", name)[:_MAX_NAME]


def enabled(env: Mapping[str, str]) -> bool:
    """Whether an engine with this environment runs kvcached (ENABLE_KVCACHED=true)."""
    return env.get("ENABLE_KVCACHED", "").strip().lower() in ("true", "1")


def segment_name(env: Mapping[str, str]) -> str:
    return sanitize(env.get("KVCACHED_IPC_NAME") or DEFAULT_NAME)


def for_env(env: Mapping[str, str]) -> KvInfo | None:
    """The segment of the engine with this environment; None when it runs no kvcached or has none."""
    return read(segment_name(env)) if enabled(env) else None


def path(name: str) -> Path:
    return SHM_DIR / name


@contextlib.contextmanager
def _mapped(name: str, *, write: bool) -> Iterator[mmap.mmap | None]:
    """The segment mapped under a shared (read) or exclusive (write) lock; None when there is
    no segment of the protocol's size (nothing is created). Closing the fd releases the lock."""
    try:
        fd = os.open(path(name), (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        if os.fstat(fd).st_size < SEGMENT_BYTES:
            yield None
            return
        fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        with mmap.mmap(fd, SEGMENT_BYTES, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ) as mm:
            yield mm
    finally:
        os.close(fd)


def read(name: str) -> KvInfo | None:
    """The segment's three fields under a shared lock; None when it does not exist (or is not one)."""
    try:
        with _mapped(name, write=False) as mm:
            return None if mm is None else KvInfo(*_LAYOUT.unpack(mm[:SEGMENT_BYTES]))
    except OSError:
        return None


def write_limit(name: str, limit_bytes: int) -> KvInfo | None:
    """Set the segment's limit under an exclusive lock; returns the fields as they were before
    (None when there is no segment: nothing is created). A limit below `used` is written as
    asked: the engine frees as requests finish."""
    if limit_bytes < 0:
        raise ValueError(f"a KV limit must be >= 0 bytes, got {limit_bytes}")
    with _mapped(name, write=True) as mm:
        if mm is None:
            return None
        before = KvInfo(*_LAYOUT.unpack(mm[:SEGMENT_BYTES]))
        mm[0:8] = struct.pack("=q", limit_bytes)
        return before


def inventory(instances: Iterable[tuple[str, str, Mapping[str, str]]]) -> list[dict[str, Any]]:
    """`kvctl kv list`: a row per kvcached instance given as (name, model, env), its segment
    (`kv` None when there is none), then every other kvctl_* segment in /dev/shm."""
    segments = list_owned()
    rows: list[dict[str, Any]] = []
    for name, model, env in instances:
        if enabled(env):
            segment = segment_name(env)
            info = segments.pop(segment, None)
            rows.append({"instance": name, "model": model, "segment": segment, "kv": info.as_json() if info else None})
    rows += [{"instance": None, "model": None, "segment": segment, "kv": info.as_json()} for segment, info in segments.items()]
    return rows


def list_owned() -> dict[str, KvInfo]:
    """Every readable segment whose name kvctl gives (``kvctl_*``), by name."""
    found: dict[str, KvInfo] = {}
    try:
        entries = sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(OWNED_PREFIX))
    except OSError:
        return found
    for name in entries:
        info = read(name)
        if info is not None:
            found[name] = info
    return found


class Segment:
    """The engine's side (the simulated engine uses it): create the segment with a capacity,
    keep `used`/`prealloc` current, read the limit others set, remove it at exit."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        self.name = name
        self.path = path(name)
        # 0600: the same user (kvctl, kvcached's tool) reads and writes it; nobody else.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, SEGMENT_BYTES)
            self._mm = mmap.mmap(fd, SEGMENT_BYTES, access=mmap.ACCESS_WRITE)
            self._mm[:] = _LAYOUT.pack(capacity_bytes, 0, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def limit(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            return int(_LAYOUT.unpack(self._mm[:SEGMENT_BYTES])[0])
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def set_usage(self, used_bytes: int, prealloc_bytes: int = 0) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._mm[8:SEGMENT_BYTES] = struct.pack("=qq", used_bytes, prealloc_bytes)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._mm.close()
        os.close(self._fd)


def users(name: str) -> list[int]:
    """Live processes that have the segment mapped or open (an engine, kvcached's tool), from
    /proc, for the processes this user may read."""
    target = str(path(name))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if target in (proc / "maps").read_text() or any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def in_use(name: str) -> bool:
    """Whether a live process still uses the segment (an engine of another kvctl tree may have the same name)."""
    return bool(users(name))


def shared_with_others(config: Config) -> list[str]:
    """Segment names are per machine (/dev/shm): another kvctl tree (another run dir) with an
    instance of the same name, or any engine given the same KVCACHED_IPC_NAME, would share an
    engine's segment with this tree's, and each would read the other's figures and limit. A
    problem line per segment of this config in use by a process that is not of this tree."""
    ours: set[int] | None = None
    problems = []
    for inst in config.launched:
        name = segment_name(inst.env)
        if not enabled(inst.env) or not path(name).exists():
            continue
        if ours is None:
            ours = set(reaper.marked_in_run(config.run_dir))
        others = [pid for pid in users(name) if pid not in ours and pid != os.getpid()]
        if others:
            problems.append(
                f"instance '{inst.name}': its kvcached segment {path(name)} is in use by {_owner(others[0])}; "
                "segment names are per machine: rename the instance, or stop that engine"
            )
    return problems


def _owner(pid: int) -> str:
    """`the kvctl tree of run dir DIR (PID N)`, or `PID N (not started by kvctl)`: the tree is
    told by the engine's KVCTL_INSTANCE marker, shared with its launcher, whose command line
    names the tree's RUN_DIR/env/NAME.json."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        environ = []
    prefix = f"{reaper.MARKER_VAR}=".encode()
    mark = next((item[len(prefix) :].decode(errors="replace") for item in environ if item.startswith(prefix)), None)
    if mark is None:
        return f"PID {pid} (not started by kvctl)"
    for launcher in reaper.marked(mark):
        try:
            argv = Path(f"/proc/{launcher}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "kvctl.launch" in argv[:-1]:
            run_dir = Path(argv[argv.index("kvctl.launch") + 1]).parent.parent
            return f"the kvctl tree of run dir {run_dir} (PID {pid})"
    return f"another kvctl tree (PID {pid}, {reaper.MARKER_VAR}={mark})"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_limit(text: str) -> dict[str, float | int]:
    """`kvctl kv limit`'s SIZE as the body of POST /models/{model}/kv_limit (and of
    `limit_directly`): `512M`, `2G`, `1.5GiB`, `1073741824` (bytes) -> {"bytes": N};
    `30%` -> {"percent": 30}."""
    if text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise UsageError(f"SIZE '{text[:40]}': a percentage must be in (0, 100]")
        return {"percent": percent}
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"SIZE '{text[:40]}' is not a size: use e.g. 512M, 2G, 1.5GiB, a number of bytes, or 30% of the capacity")
    return {"bytes": int(float(match.group(1)) * _UNITS.get((match.group(2) or "").lower(), 1))}


def limit_directly(config: Config, model: str, request: Mapping[str, Any], why: str) -> dict[str, Any]:
    """`kvctl kv limit` when no router answers (`why`): the protocol lets any process write the
    limit, so kvctl writes each segment itself; the same answer as POST /models/{model}/kv_limit.
    `request` is that route's body (`bytes`, optional `instance`). No router, no router log: the
    caller prints each change."""
    canonical = config.aliases().get(model, model)
    instances = config.models().get(canonical)
    if instances is None:
        raise UsageError(f"model '{model[:80]}' is not in {config.path}")
    only = request.get("instance")
    if only is not None and only not in {i.name for i in instances}:
        raise UsageError(f"model '{canonical}' has no instance '{str(only)[:80]}'")
    targets = [i for i in instances if enabled(i.env) and only in (None, i.name)]
    if not targets:
        raise UsageError(f"model '{canonical}' has no kvcached instance (ENABLE_KVCACHED=true in its environment)")
    if "bytes" not in request:
        # A share is of the capacity each engine created its segment with, which the router
        # remembers; the segment itself only holds the current limit.
        raise UsageError(f"{why}, and a percentage needs it (it knows each engine's KV capacity): give a size such as 2G")
    limit = int(request["bytes"])
    results: list[dict[str, Any]] = []
    for inst in targets:
        segment = segment_name(inst.env)
        before = write_limit(segment, limit)
        if before is None:
            results.append(
                {"name": inst.name, "limit_bytes": None, "before": None, "message": f"{inst.name}: no kvcached segment {segment} (engine not running?)"}
            )
            continue
        over = f"; {size(before.used_bytes)} in use, freed as requests finish" if before.used_bytes > limit else ""
        message = f"{inst.name} {inst.model}: kv limit {size(before.limit_bytes)} -> {size(limit)} (manual, written to {path(segment)}: {why}){over}"
        results.append({"name": inst.name, "limit_bytes": limit, "before": before.as_json(), "message": message})
    if all(r["limit_bytes"] is None for r in results):
        raise KvctlError(f"model '{canonical}': " + "; ".join(r["message"] for r in results))
    return {"model_name": canonical, "success": True, "instances": results}


def remove_unused(config: Config) -> list[str]:
    """The segments of this config's kvcached instances that no live process uses, removed
    (`kvctl down`, once every engine has ended: such a segment is of one that died). Their
    names, sorted."""
    names = {segment_name(i.env) for i in config.launched if enabled(i.env)}
    return sorted(name for name in names if path(name).exists() and not in_use(name) and remove(name))


def remove(name: str) -> bool:
    """Delete a segment (an engine that died cannot); False when there was none."""
    try:
        path(name).unlink()
    except FileNotFoundError:
        return False
    return True
