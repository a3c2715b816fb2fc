"""The router's ASGI app: its parts wired together, their start and stop, reload on SIGHUP.

`POST /v1/{completions,chat/completions,embeddings}` never reach this app: kvctl's HTTP
protocol (kvctl.router.protocol) hands them to the proxy directly; every other route is
a small Starlette app (kvctl.router.admin). Model names in paths may contain `/`, raw or
`%2F`-encoded (uvicorn decodes the path), so those routes use `{model:path}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from kvctl import config as config_mod
from kvctl import converge
from kvctl.config import Config
from kvctl.errors import ConfigError
from kvctl.router import kv_rebalance, logs
from kvctl.router.admin import EXCEPTION_HANDLERS, AdminAPI
from kvctl.router.events import EventBus
from kvctl.router.history import History
from kvctl.router.kv import KvControl
from kvctl.router.lifecycle import Lifecycle
from kvctl.router.metrics import Metrics
from kvctl.router.proxy import Proxy
from kvctl.router.traffic import TrafficMonitor

log = logging.getLogger("kvctl.router")


class RouterApp:
    """The ASGI callable uvicorn runs. Its parts are attributes so tests can inspect them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.events = EventBus()
        self.lifecycle = Lifecycle(config, self.metrics, self.events)
        self.kv = KvControl(config, self.events)  # kvcached segments (SPEC §13)
        self.lifecycle.on_awake = self.kv.became_awake
        self.models = list(config.models())
        self.digest = _digest(config)  # of the config file the router runs, reported by /health
        self.refused_digest: str | None = None  # of the last file a reload refused
        self.shutting_down = asyncio.Event()
        self.traffic = TrafficMonitor(self.models, config.sleep_manager.idle_threshold_seconds, self.lifecycle.in_flight, self.lifecycle.queued)
        self.proxy = Proxy(config, self.lifecycle, self.traffic, self.metrics)
        self.history = History(self.traffic, self.lifecycle)  # for the dashboard's charts
        self.started = time.time()
        self.admin = Starlette(routes=AdminAPI(self).routes(), lifespan=self._lifespan, exception_handlers=EXCEPTION_HANDLERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.admin(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.lifecycle.start()
        # The lifecycle's tasks: a failure is logged, and close() cancels and awaits them.
        for loop_task in (self.history.run(), kv_rebalance.run(self.kv, self.lifecycle), self.kv.watch(self.lifecycle.states)):
            self.lifecycle.spawn(loop_task)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        router = self.config.router
        log.info(
            "router listening on %s (config %s, %d instances)",
            router.url,
            self.config.path,
            len(self.config.instances),
            extra=logs.fields(url=router.url, config=str(self.config.path)),
        )
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signal.SIGHUP)
            await self.lifecycle.close()
            self.proxy.close()

    def begin_shutdown(self) -> None:
        """The server stops: end the event streams (they would hold the graceful shutdown)."""
        self.shutting_down.set()

    # ------------------------------------------------------------------ reload
    def reload(self) -> bool:
        """Re-read and re-validate the config file and apply it in place (SIGHUP; SPEC §14).

        A file that fails validation changes nothing: the running config stays. Host and
        port are the listening socket's and need a restart (`kvctl up` does that)."""
        try:
            digest = converge.file_digest(self.config.path)
            config = config_mod.load(self.config.path)
            self.lifecycle.reload(config)  # first: an engine program that cannot be rendered refuses the file, changing nothing
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            self.refused_digest = _digest(self.config)  # the file on disk now, which was refused
            log.error("reload refused, the running configuration is kept: %s", "; ".join(problems), extra=logs.fields(problems=problems))
            return False
        lines = converge.changes(self.config, config)
        if converge.needs_router_restart(self.config, config):
            log.warning("reload: router host/port changed; that needs a router restart, which `kvctl up` does")
        self.kv.configure(config)
        self.proxy.configure(config)
        self.models = list(config.models())
        self.traffic.set_models(self.models, config.sleep_manager.idle_threshold_seconds)
        router = config.router
        logs.configure(router.log_level, router.log_format, router.access_log)
        self.config, self.digest = config, digest
        for line in lines:
            log.info("reload: %s", line, extra=logs.fields(change=line))
        log.info("reload: configuration applied (%s)", f"{len(lines)} change(s)" if lines else "nothing changed", extra=logs.fields(digest=digest))
        return True


def create_app(config: Config) -> RouterApp:
    return RouterApp(config)


def _digest(config: Config) -> str | None:
    try:
        return converge.file_digest(config.path)
    except OSError:
        return None
