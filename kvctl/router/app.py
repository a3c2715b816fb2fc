"""The router's ASGI app: the data plane, admin and introspection endpoints, auth.

`POST /v1/{completions,chat/completions,embeddings}` go straight to the raw-ASGI proxy
(no Starlette objects, no middleware on the hot path); every other route is a small
Starlette app. Model names in paths may contain `/`, raw or `%2F`-encoded (uvicorn
decodes the path), so those routes use `{model:path}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvctl import config as config_mod
from kvctl import converge
from kvctl.config import Config
from kvctl.errors import ConfigError
from kvctl.router import auth, kv_rebalance, logs
from kvctl.router.errors import error_response, shorten
from kvctl.router.events import EventBus
from kvctl.router.history import History
from kvctl.router.kv import GiB, KvControl, limit_request
from kvctl.router.lifecycle import ActionResult, Lifecycle
from kvctl.router.metrics import Metrics
from kvctl.router.proxy import PROXIED_PATHS, Proxy
from kvctl.router.traffic import MAX_WINDOW_SECONDS, TrafficMonitor
from kvctl.router.ui import routes as ui_routes

Handler = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("kvctl.router")
_EVENTS_KEEPALIVE_SECONDS = 15.0


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
        self.history = History(self.traffic, self.lifecycle, self.kv)  # for the dashboard's charts
        self.started = time.time()
        self.admin = Starlette(routes=_routes(self), lifespan=self._lifespan, exception_handlers={HTTPException: _http_error})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PROXIED_PATHS:
            await self.proxy.handle(scope, receive, send)
        else:
            await self.admin(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.lifecycle.start()
        sampler = asyncio.create_task(self.history.run())
        rebalancer = asyncio.create_task(kv_rebalance.run(self.kv, self.lifecycle))
        kv_watch = asyncio.create_task(self.kv.watch(lambda: {i["name"]: i["state"] for i in self.lifecycle.instances()}))
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
            sampler.cancel()
            rebalancer.cancel()
            kv_watch.cancel()
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
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            self.refused_digest = _digest(self.config)  # the file on disk now, which was refused
            log.error("reload refused, the running configuration is kept: %s", "; ".join(problems), extra=logs.fields(problems=problems))
            return False
        lines = converge.changes(self.config, config)
        if converge.needs_router_restart(self.config, config):
            log.warning("reload: router host/port changed; that needs a router restart, which `kvctl up` does")
        self.lifecycle.reload(config)
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

    # ------------------------------------------------------------------ auth
    def _credential(self, request: Request) -> bytes | None:
        return auth.token(request.headers.raw)  # DuplicateAuthorization: the guards answer 400

    def can_read(self, request: Request) -> bool:
        """Data plane and read-only introspection: any api key or the admin token, when keys are set."""
        token = self._credential(request)  # first: several Authorization headers are refused even without keys
        if not self.config.router.api_keys:
            return True
        return token is not None and (self.proxy.authorized(b"Bearer " + token) or self._is_admin(token))

    def can_act(self, request: Request) -> bool:
        """Mutating admin routes: the admin token when set, else as for reading."""
        if self.config.router.admin_token is None:
            return self.can_read(request)
        token = self._credential(request)
        return token is not None and self._is_admin(token)

    def _is_admin(self, token: bytes) -> bool:
        admin = self.config.router.admin_token
        return admin is not None and hmac.compare_digest(token, admin.encode())

    # ------------------------------------------------------------------ helpers
    def canonical(self, name: str) -> str | None:
        return self.proxy.routes.get(name)

    def model_object(self, name: str, model: str) -> dict[str, Any]:
        """An entry of GET /v1/models (a model or an alias of one) with its state."""
        return {
            "id": name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "kvctl",
            "root": model,
            "parent": None if name == model else model,
            "state": self.lifecycle.model_state(model),
        }

    def instances(self, model: str | None = None) -> list[dict[str, Any]]:
        """The lifecycle's view of each instance, with its KV cache (`kv`: null when unknown)."""
        instances = self.lifecycle.instances(model)
        by_name = {inst.name: inst for inst in self.config.instances}
        for info in instances:
            inst = by_name.get(info["name"])
            info["kv"] = self.kv.view(inst) if inst is not None else None
        return instances

    def model_info(self, model: str) -> dict[str, Any]:
        instances = self.instances(model)
        first = instances[0] if instances else {}
        return {
            "endpoint": first.get("url"),
            "engine": first.get("engine"),
            "state": self.lifecycle.model_state(model),
            "aliases": [a for a, m in self.config.aliases().items() if m == model],
            "instances": instances,
        }


def create_app(config: Config) -> RouterApp:
    return RouterApp(config)


# ---------------------------------------------------------------------- routes


def _routes(app: RouterApp) -> list[Route]:
    def read(handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                if not app.can_read(request):
                    return _unauthorized()
            except auth.DuplicateAuthorization:
                return error_response(400, auth.DUPLICATE_MESSAGE, auth.DUPLICATE_CODE)
            return await handler(request)

        return guarded

    def act(handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                if not app.can_act(request):
                    return _unauthorized("This action needs the router's admin token: send 'Authorization: Bearer TOKEN'.")
            except auth.DuplicateAuthorization:
                return error_response(400, auth.DUPLICATE_MESSAGE, auth.DUPLICATE_CODE)
            return await handler(request)

        return guarded

    def known(request: Request) -> str | Response:
        name = request.path_params["model"]
        model = app.canonical(name)
        if model is None:
            return error_response(404, f"The model '{shorten(name)}' does not exist.", "model_not_found", "model")
        return model

    async def health(request: Request) -> Response:
        # Unauthenticated: nothing here but liveness and which config file content runs (a digest).
        return JSONResponse({"status": "ok", "config": app.digest, "refused_config": app.refused_digest})

    async def health_all(request: Request) -> Response:
        instances = app.instances()
        healthy = all(i["healthy"] for i in instances)
        return JSONResponse({"status": "ok" if healthy else "degraded", "instances": instances})

    async def health_model(request: Request) -> Response:
        model = known(request)
        if isinstance(model, Response):
            return model
        instances = app.instances(model)
        healthy = any(i["healthy"] for i in instances)
        body = {"model": model, "status": "ok" if healthy else "unhealthy", "state": app.lifecycle.model_state(model), "instances": instances}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def models(request: Request) -> Response:
        return JSONResponse({"models": {model: app.model_info(model) for model in app.models}})

    async def v1_models(request: Request) -> Response:
        data = []
        for model in app.models:
            data.append(app.model_object(model, model))
            data += [app.model_object(alias, model) for alias, target in app.config.aliases().items() if target == model]
        return JSONResponse({"object": "list", "data": data})

    async def v1_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = known(request)
        if isinstance(model, Response):
            return model
        return JSONResponse(app.model_object(name, model))

    async def events(request: Request) -> Response:
        follow = request.query_params.get("follow", "true").lower()
        if follow not in ("true", "false", "1", "0"):
            return error_response(400, f"Query parameter 'follow' must be true or false, got '{shorten(follow, 20)}'.", "invalid_query", "follow")
        queue = app.events.subscribe() if follow in ("true", "1") else None
        history = list(app.events.history)  # after subscribing, with no await between: nothing is missed

        async def stream() -> AsyncIterator[bytes]:
            try:
                for event in history:
                    yield _sse(event.as_json())
                if queue is None:
                    return
                stop = asyncio.ensure_future(app.shutting_down.wait())
                try:
                    while not app.shutting_down.is_set():
                        get = asyncio.ensure_future(queue.get())
                        done, _ = await asyncio.wait({get, stop}, timeout=_EVENTS_KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                        if get in done:
                            yield _sse(get.result().as_json())
                        else:
                            get.cancel()
                            if not done:
                                yield b": keepalive\n\n"
                finally:
                    stop.cancel()
            finally:
                if queue is not None:
                    app.events.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def traffic_stats(request: Request) -> Response:
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        if isinstance(window, Response):
            return window
        return JSONResponse({"traffic_stats": {m: {**app.traffic.stats(m, window), "kv": app.kv.model_view(m)} for m in app.models}, "window_seconds": window})

    async def traffic_model(request: Request) -> Response:
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        if isinstance(window, Response):
            return window
        model = known(request)
        if isinstance(model, Response):
            return model
        return JSONResponse({"model_stats": app.traffic.stats(model, window), "window_seconds": window})

    async def idle(request: Request) -> Response:
        threshold = _seconds(request, "threshold", app.config.sleep_manager.idle_threshold_seconds, allow_zero=True)
        if isinstance(threshold, Response):
            return threshold
        names = app.traffic.idle_models(threshold)
        details = {m: app.traffic.stats(m, 60.0, threshold) for m in names}
        return JSONResponse({"idle_models": names, "idle_threshold_seconds": threshold, "idle_model_details": details, "idle_models_count": len(names)})

    async def active(request: Request) -> Response:
        threshold = _seconds(request, "threshold", app.config.sleep_manager.idle_threshold_seconds, allow_zero=True)
        if isinstance(threshold, Response):
            return threshold
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        if isinstance(window, Response):
            return window
        names = app.traffic.active_models(threshold)
        details = {m: app.traffic.stats(m, window, threshold) for m in names}
        return JSONResponse(
            {
                "active_models": names,
                "idle_threshold_seconds": threshold,
                "window_seconds": window,
                "active_model_details": details,
                "active_models_count": len(names),
            }
        )

    async def traffic_history(request: Request) -> Response:
        since = _seconds(request, "since", 0.0, allow_zero=True)
        if isinstance(since, Response):
            return since
        return JSONResponse({**app.history.as_json(since), "memory_budget_gb": app.config.sleep_manager.memory_budget_gb})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(app.metrics.render(app.lifecycle, app.models, app.kv.readings()), media_type=CONTENT_TYPE_LATEST)

    async def sleep_status(request: Request) -> Response:
        return JSONResponse(app.lifecycle.sleep_status())

    async def sleep_candidates(request: Request) -> Response:
        candidates = app.lifecycle.sleep_candidates()
        return JSONResponse(
            {
                "sleep_candidates": candidates,
                "idle_threshold_seconds": app.config.sleep_manager.idle_threshold_seconds,
                "auto_sleep_enabled": app.config.sleep_manager.auto_sleep_enabled,
            }
        )

    def model_action(perform: Callable[[str], Awaitable[ActionResult]]) -> Handler:
        """POST /models/{model}/sleep|wake|stop: the lifecycle's answer, with its HTTP status."""

        async def handler(request: Request) -> Response:
            model = known(request)
            if isinstance(model, Response):
                return model
            result = await perform(model)
            return JSONResponse(result.to_dict(), status_code=result.status)

        return handler

    sleep, wake, stop = (model_action(perform) for perform in (app.lifecycle.sleep_model, app.lifecycle.wake_model, app.lifecycle.stop_model))

    async def kv_limit(request: Request) -> Response:
        model = known(request)
        if isinstance(model, Response):
            return model
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        parsed = limit_request(body)
        if isinstance(parsed, str):
            return error_response(400, f"kv_limit: {parsed}.", "invalid_body")
        kind, value, only = parsed
        targets = app.kv.instances(model)
        if only is not None:
            if only not in {i.name for i in app.config.models().get(model, ())}:
                return error_response(404, f"Model '{shorten(model)}' has no instance '{shorten(only)}'.", "instance_not_found", "instance")
            targets = [i for i in targets if i.name == only]
        if not targets:
            return error_response(
                400,
                f"Model '{shorten(model)}' has no kvcached instance{' ' + shorten(only) if only else ''} (ENABLE_KVCACHED=true in its environment).",
                "kv_unavailable",
            )
        states = {i["name"]: i["state"] for i in app.lifecycle.instances(model)}
        results: list[dict[str, Any]] = []
        for inst in targets:
            capacity = app.kv.capacity(inst)
            limit = int(value) if kind == "bytes" else None if capacity is None else int(capacity * value / 100)
            before = None if limit is None else app.kv.set_limit(inst, limit, "manual", states.get(inst.name, "unknown"))
            if before is None or limit is None:
                results.append({"name": inst.name, "limit_bytes": None, "before": None, "message": f"{inst.name}: no kvcached segment (engine not running?)"})
                continue
            over = f"; {before.used_bytes / GiB:.2f} GiB in use: the engine frees it as requests finish" if before.used_bytes > limit else ""
            results.append(
                {"name": inst.name, "limit_bytes": limit, "before": before.as_json(), "message": f"{inst.name}: kv limit {limit / GiB:.2f} GiB{over}"}
            )
        ok = any(r["limit_bytes"] is not None for r in results)
        if not ok:
            return error_response(409, f"Model '{shorten(model)}': " + "; ".join(r["message"] for r in results), "kv_unavailable")
        return JSONResponse({"model_name": model, "success": True, "message": "; ".join(r["message"] for r in results), "instances": results})

    return [
        Route("/health", health),
        Route("/health/all", read(health_all)),
        Route("/health/{model:path}", read(health_model)),
        Route("/models", read(models)),
        Route("/v1/models", read(v1_models)),
        Route("/v1/models/{model:path}", read(v1_model)),
        Route("/events", read(events)),
        Route("/metrics", read(metrics)),
        Route("/traffic/stats", read(traffic_stats)),
        Route("/traffic/history", read(traffic_history)),
        Route("/traffic/stats/model/{model:path}", read(traffic_model)),
        Route("/traffic/stats/{model:path}", read(traffic_model)),
        Route("/traffic/idle", read(idle)),
        Route("/models/idle", read(idle)),
        Route("/traffic/active", read(active)),
        Route("/models/active", read(active)),
        Route("/sleep/status", read(sleep_status)),
        Route("/sleep/candidates", read(sleep_candidates)),
        Route("/models/{model:path}/sleep", act(sleep), methods=["POST"]),
        Route("/models/{model:path}/wake", act(wake), methods=["POST"]),
        Route("/models/{model:path}/stop", act(stop), methods=["POST"]),
        Route("/models/{model:path}/kv_limit", act(kv_limit), methods=["POST"]),
        Route("/sleep/model/{model:path}", act(sleep), methods=["POST"]),
        Route("/wake/model/{model:path}", act(wake), methods=["POST"]),
        Route("/action/sleep/{model:path}", act(sleep), methods=["POST"]),
        Route("/action/wakeup/{model:path}", act(wake), methods=["POST"]),
        *ui_routes(),
    ]


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _digest(config: Config) -> str | None:
    try:
        return converge.file_digest(config.path)
    except OSError:
        return None


def _seconds(request: Request, name: str, default: float, *, maximum: float | None = None, allow_zero: bool = False) -> float | Response:
    """A positive number of seconds from the query string, or a 400 saying what is wrong."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    too_small = value < 0 if allow_zero else value <= 0
    if not math.isfinite(value) or too_small or (maximum is not None and value > maximum):
        bound = "at least 0" if allow_zero else "greater than 0"
        if maximum is not None:
            bound += f" and at most {maximum:g}"
        return error_response(400, f"Query parameter '{name}' must be a number of seconds {bound}, got '{shorten(raw, 50)}'.", "invalid_query", name)
    return value


def _unauthorized(message: str = "Invalid or missing API key: send 'Authorization: Bearer KEY'.") -> Response:
    return error_response(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method), OpenAI-shaped like every other error."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No route {request.method} {shorten(request.url.path, 100)}: the router serves /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models."
        return error_response(404, message, "not_found")
    return error_response(exc.status_code, str(exc.detail), "method_not_allowed" if exc.status_code == 405 else "http_error")
