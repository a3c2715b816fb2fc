"""Running the router app under uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from kvctl import http1
from kvctl.config import Config
from kvctl.errors import UsageError
from kvctl.router import overload
from kvctl.router.protocol import protocol_for

log = logging.getLogger("kvctl.router")


def check_bind(config: Config) -> None:
    router = config.router
    if not router.is_loopback and not router.api_keys and not router.allow_unauthenticated:
        raise UsageError(
            f"refusing to serve on non-loopback host {router.host!r} without router.api_keys "
            "(set api_keys, or allow_unauthenticated: true to accept this explicitly)"
        )


def serve(config: Config) -> None:
    """Run the router in the foreground until SIGINT/SIGTERM (httptools, and uvloop or asyncio: see _event_loop)."""
    check_bind(config)
    from kvctl.router import logs
    from kvctl.router.app import create_app

    logs.configure(config.router.log_level, config.router.log_format, config.router.access_log)
    # No log line here names its caller, thread or process: not collecting them saves ~2 µs
    # and a getpid() syscall per access-log record. See the logging HOWTO's "Optimization".
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    soft, streams = _raise_fd_limit(config)
    loop = _event_loop(config, soft, streams)
    app = create_app(config)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.router.host,
            port=config.router.port,
            http=protocol_for(lambda: app.config.router, app.proxy),  # uvicorn's httptools protocol with the client limits and the data plane
            ws="none",
            proxy_headers=False,  # X-Forwarded-* parsing per request for a client address nothing here uses
            loop=loop,
            lifespan="on",
            log_config=None,  # logs.configure() set up every logger; uvicorn's dictConfig would undo it
            access_log=False,  # kvctl.access logs each request with its model, TTFT and request id
            server_header=False,  # the engine's own headers (Date, Server) pass through
            date_header=False,
            timeout_graceful_shutdown=30,
        )
    )
    server.on_shutdown = app.begin_shutdown
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown begins: open-ended responses (event
    streams) end then instead of holding the graceful-shutdown timeout."""

    on_shutdown: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(overload.AcceptShedder())
        await super().startup(sockets)
        # What exists once the router is up (modules, config, app: ~70,000 objects) lives as
        # long as the process: out of the collector's sight, its full collections stay short.
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A second SIGTERM/SIGINT while draining (`kvctl down` when its --timeout ends): cut
        # what is still in flight now, so that streams end with the router_shutdown error
        # event rather than be killed mid-write.
        if self.should_exit and getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._cut)
        super().handle_exit(sig, frame)

    def _cut(self) -> None:
        tasks = list(self.server_state.tasks)
        log.warning("stopping now: cutting %d in-flight request(s)", len(tasks))
        for task in tasks:
            task.cancel()


def _event_loop(config: Config, fd_limit: int, streams: int) -> str:
    """uvloop (10–15 % less CPU per request and per streamed chunk in paired runs) when the descriptor
    limit leaves room for max_connections streams and the engines' idle keep-alive
    connections; else asyncio. Out of descriptors, libuv accepts and resets waiting clients
    itself, while under asyncio the router answers them 503 router_overloaded
    (overload.AcceptShedder): so uvloop only where max_connections, which answers that 503
    first, keeps the router clear of the limit."""
    needed = config.router.max_connections + len(config.instances) * http1.MAX_IDLE // 2  # in streams: 2 descriptors each
    if streams < needed:
        log.info("event loop: asyncio (the file descriptor limit %d is short of 2 x max_connections and a margin; uvloop needs it)", fd_limit)
        return "asyncio"
    log.info("event loop: uvloop")
    return "uvloop"


def _raise_fd_limit(config: Config) -> tuple[int, int]:
    """Raise the descriptor limit; returns it and the concurrent streams it leaves room for."""
    soft, _ = overload.raise_fd_limit()
    streams = overload.stream_capacity(soft)
    log.info("file descriptor limit %d: room for about %d concurrent streams", soft, streams)
    if streams < config.router.max_connections:
        log.warning(
            "the file descriptor limit (%d) allows about %d concurrent streams, fewer than router.max_connections (%d); "
            "beyond that clients get 503 router_overloaded",
            soft,
            streams,
            config.router.max_connections,
        )
    return soft, streams
