"""The router's own exhaustion: file descriptors (SPEC §16).

Running out of descriptors is the router's overload, never an engine failure: requests get
503 `router_overloaded` with Retry-After, the engine is not marked down, and the condition
is logged once per interval (asyncio logs a failed accept per retry: 36,000 lines in 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

from kvctl.http1 import EXHAUSTED
from kvctl.router.errors import error_bytes

log = logging.getLogger("kvctl.router")

RETRY_AFTER = (b"retry-after", b"1")  # seconds: the header of every router_overloaded answer
LOG_INTERVAL_SECONDS = 10.0
# A stream holds two descriptors (client and engine connections); beyond those open at start,
# this many stay for the listening socket, health probes and idle keep-alive connections.
_FD_MARGIN = 32


def message(what: str) -> str:
    return f"The router is overloaded ({what}); retry shortly."


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as supervisord's minfds does); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def stream_capacity(fd_limit: int) -> int:
    """Concurrent streams that fit in `fd_limit` descriptors, given those open now."""
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return max(0, (fd_limit - in_use - _FD_MARGIN) // 2)


class _Throttle:
    """Counts exhaustion events and logs each kind at most once per interval."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def note(self, where: str) -> None:
        count = self._count[where] = self._count.get(where, 0) + 1
        now = time.monotonic()
        if now - self._last.get(where, -LOG_INTERVAL_SECONDS) < LOG_INTERVAL_SECONDS:
            return
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.warning("out of file descriptors (%s; limit %d): answering 503 router_overloaded; %d time(s) since the last report", where, limit, count)
        self._last[where] = now
        self._count[where] = 0


fd_exhausted = _Throttle()


class AcceptShedder:
    """An asyncio exception handler for `socket.accept() out of system resource`.

    asyncio cannot accept a connection without a descriptor, so the client would wait in
    the backlog. A spare descriptor is kept open; on EMFILE it is released for as long as
    it takes to accept one waiting client, answer it 503 router_overloaded and close it
    (the nginx/libev technique). asyncio calls the handler once per waiting client."""

    def __init__(self) -> None:
        self._spare: int | None = None
        self._response = error_bytes(503, message("out of file descriptors"), "router_overloaded", headers=(RETRY_AFTER,), close=True)
        self._take_spare()

    def _take_spare(self) -> None:
        with contextlib.suppress(OSError):
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        listener = context.get("socket")
        if not (isinstance(exc, OSError) and exc.errno in EXHAUSTED and listener is not None and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        fd_exhausted.note("accepting a client")
        if self._spare is None:
            self._take_spare()
            return
        os.close(self._spare)
        self._spare = None
        sock = socket.socket(fileno=listener.fileno())
        try:
            conn, _ = sock.accept()
        except OSError:
            conn = None
        finally:
            sock.detach()  # the listening socket stays asyncio's
        if conn is not None:
            with conn:
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # what the client already sent, so that closing does not reset the answer
                with contextlib.suppress(OSError):
                    conn.send(self._response)
        self._take_spare()
