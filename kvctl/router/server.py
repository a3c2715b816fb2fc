"""Running the router app under uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn

from kvctl.config import Config
from kvctl.errors import UsageError


class _QuietCuts(logging.Filter):
    """A response the engine broke mid-body is ended by raising ResponseCut (the only way to
    make uvicorn close the connection); that is expected, not a traceback for the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kvctl.router.proxy import ResponseCut

        return not (record.exc_info and isinstance(record.exc_info[1], ResponseCut))


def check_bind(config: Config) -> None:
    router = config.router
    if not router.is_loopback and not router.api_keys and not router.allow_unauthenticated:
        raise UsageError(
            f"refusing to serve on non-loopback host {router.host!r} without router.api_keys "
            "(set api_keys, or allow_unauthenticated: true to accept this explicitly)"
        )


def serve(config: Config) -> None:
    """Run the router in the foreground until SIGINT/SIGTERM.

    httptools + the asyncio loop: measured fastest among uvicorn's options that stay up
    when clients cut streams (uvloop crashed there in an earlier design; see benchmarks/)."""
    check_bind(config)
    from kvctl.router import logs
    from kvctl.router.app import create_app

    logs.configure(config.router.log_level, config.router.log_format, config.router.access_log)
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
    app = create_app(config)
    server = _Server(uvicorn.Config(
        app,
        host=config.router.host,
        port=config.router.port,
        http="httptools",
        loop="asyncio",
        lifespan="on",
        log_config=None,  # logs.configure() set up every logger; uvicorn's dictConfig would undo it
        access_log=False,  # kvctl.access logs each request with its model, TTFT and request id
        server_header=False,  # the engine's own headers (Date, Server) pass through
        date_header=False,
        timeout_graceful_shutdown=30,
    ))
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
