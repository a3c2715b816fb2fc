"""Finding and ending process trees through /proc (SPEC §16).

Every program supervisord runs for kvctl carries ``KVCTL_INSTANCE=<marker>`` in its
environment (supervisord sets it; engines and their children inherit it), so the
processes of an instance from an earlier run can be found and ended even after their
launcher or supervisord itself was killed. Signals go through pidfds, so a PID reused
between listing and signalling is never hit. Standard library only: the launcher imports it.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER_VAR = "KVCTL_INSTANCE"
TERM_GRACE_SECONDS = 5.0


def _run_digest(run_dir: str | os.PathLike[str]) -> str:
    return hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:16]


def marker(run_dir: str | os.PathLike[str], name: str) -> str:
    """`name@digest-of-run-dir`: unique per run dir and program, and safe in supervisord.conf."""
    return f"{name}@{_run_digest(run_dir)}"


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live process, None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def descendants(root: int) -> list[int]:
    """Live descendants of `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds KVCTL_INSTANCE=`mark` (other users' are unreadable)."""
    entry = f"{MARKER_VAR}={mark}".encode()
    return _find(lambda value: value == entry)


def marked_in_run(run_dir: str | os.PathLike[str]) -> list[int]:
    """Live processes of any program of `run_dir`, including programs no longer configured."""
    prefix, suffix = f"{MARKER_VAR}=".encode(), f"@{_run_digest(run_dir)}".encode()
    return _find(lambda value: value.startswith(prefix) and value.endswith(suffix))


def _find(match: Callable[[bytes], bool]) -> list[int]:
    found = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if any(match(item) for item in environ.split(b"\0")):
            found.append(pid)
    return found


def terminate(pids: Iterable[int], grace: float = TERM_GRACE_SECONDS) -> list[int]:
    """SIGTERM each process, SIGKILL those still alive after `grace` seconds; wait until all
    are gone. Returns the PIDs that were alive and signalled."""
    fds: dict[int, int] = {}
    for pid in set(pids):
        before = _stat(pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        if before is None or _stat(pid) != before:  # exited, or the PID was reused meanwhile
            os.close(fd)
            continue
        fds[pid] = fd
    try:
        _signal_all(fds, signal.SIGTERM)
        left = _wait_exit(fds, grace)
        if left:
            _signal_all({pid: fds[pid] for pid in left}, signal.SIGKILL)
            _wait_exit({pid: fds[pid] for pid in left}, 10.0)
    finally:
        for fd in fds.values():
            os.close(fd)
    return sorted(fds)


def _signal_all(fds: dict[int, int], sig: int) -> None:
    for fd in fds.values():
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            pass


def _wait_exit(fds: dict[int, int], timeout: float) -> set[int]:
    """Wait until every pidfd reports its process exited; returns the PIDs still alive."""
    poller = select.poll()
    by_fd = {fd: pid for pid, fd in fds.items()}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    alive = set(fds)
    deadline = time.monotonic() + timeout
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _event in poller.poll(remaining * 1000):
            poller.unregister(fd)
            alive.discard(by_fd[fd])
    return alive


def end_leftovers(run_dir: str | os.PathLike[str], name: str, grace: float = TERM_GRACE_SECONDS) -> list[int]:
    """End every process of program `name` of `run_dir` (launcher, engine, its children) from
    an earlier run, except the calling process. Returns the PIDs ended."""
    mark = marker(run_dir, name)
    return _end(lambda: marked(mark), grace)


def end_run(run_dir: str | os.PathLike[str], grace: float = TERM_GRACE_SECONDS) -> list[int]:
    """End every process any program of `run_dir` left (for `kvctl down`)."""
    return _end(lambda: marked_in_run(run_dir), grace)


def _end(find: Callable[[], list[int]], grace: float) -> list[int]:
    ended: list[int] = []
    # A process that forks while being ended may leave a new child: look again until none is left.
    for _ in range(5):
        pids = [pid for pid in find() if pid != os.getpid()]
        if not pids:
            break
        ended += terminate(pids, grace)
    return sorted(set(ended))
