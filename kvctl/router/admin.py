"""The router's admin and introspection API (SPEC §7, §11): one method per route.

Every refusal is an `AdminError`, raised wherever it is found (auth, an unknown model, a bad
query or body) and rendered OpenAI-shaped in one place (`EXCEPTION_HANDLERS`, which the app gives
Starlette). The HTTP status of a lifecycle action's `Outcome` is chosen here, in `_STATUS`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvctl.router import auth
from kvctl.router.errors import error_response, shorten
from kvctl.router.kv import GiB, limit_request
from kvctl.router.states import ActionResult, Outcome
from kvctl.router.traffic import MAX_WINDOW_SECONDS
from kvctl.router.ui import routes as ui_routes

if TYPE_CHECKING:
    from kvctl.config import Instance
    from kvctl.router.app import RouterApp

Handler = Callable[[Request], Awaitable[Response]]
_EVENTS_KEEPALIVE_SECONDS = 15.0
# The HTTP status of each outcome of POST /models/{model}/sleep|wake|stop.
_STATUS = {
    Outcome.DONE: 200,
    Outcome.UNKNOWN_MODEL: 404,
    Outcome.REFUSED: 409,
    Outcome.NOT_READY: 503,
    Outcome.ENGINE_FAILED: 502,
    Outcome.TIMED_OUT: 504,
}
_UNAUTHORIZED = "Invalid or missing API key: send 'Authorization: Bearer KEY'."


class AdminError(Exception):
    """A refused admin request: its OpenAI error code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.param, self.headers = code, message, status, param, headers


async def _render_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminError)
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method), OpenAI-shaped like every other error."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No route {request.method} {shorten(request.url.path, 100)}: the router serves /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models."
        return error_response(404, message, "not_found")
    return error_response(exc.status_code, str(exc.detail), "method_not_allowed" if exc.status_code == 405 else "http_error")


# Where every admin error becomes its OpenAI-shaped response.
EXCEPTION_HANDLERS = {AdminError: _render_error, HTTPException: _http_error}


class AdminAPI:
    """The routes of everything but the data plane; they read the app's current config."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app

    def routes(self) -> list[Route]:
        read, act = self._reader, self._actor
        sleep, wake, stop = (
            self._action(perform) for perform in (self.app.lifecycle.sleep_model, self.app.lifecycle.wake_model, self.app.lifecycle.stop_model)
        )
        return [
            Route("/health", self.health),
            Route("/health/all", read(self.health_all)),
            Route("/health/{model:path}", read(self.health_model)),
            Route("/models", read(self.models)),
            Route("/v1/models", read(self.v1_models)),
            Route("/v1/models/{model:path}", read(self.v1_model)),
            Route("/events", read(self.events)),
            Route("/metrics", read(self.metrics)),
            Route("/traffic/stats", read(self.traffic_stats)),
            Route("/traffic/history", read(self.traffic_history)),
            Route("/traffic/stats/model/{model:path}", read(self.traffic_model)),
            Route("/traffic/stats/{model:path}", read(self.traffic_model)),
            Route("/traffic/idle", read(self.idle)),
            Route("/models/idle", read(self.idle)),
            Route("/traffic/active", read(self.active)),
            Route("/models/active", read(self.active)),
            Route("/sleep/status", read(self.sleep_status)),
            Route("/sleep/candidates", read(self.sleep_candidates)),
            Route("/models/{model:path}/sleep", act(sleep), methods=["POST"]),
            Route("/models/{model:path}/wake", act(wake), methods=["POST"]),
            Route("/models/{model:path}/stop", act(stop), methods=["POST"]),
            Route("/models/{model:path}/kv_limit", act(self.kv_limit), methods=["POST"]),
            Route("/sleep/model/{model:path}", act(sleep), methods=["POST"]),
            Route("/wake/model/{model:path}", act(wake), methods=["POST"]),
            Route("/action/sleep/{model:path}", act(sleep), methods=["POST"]),
            Route("/action/wakeup/{model:path}", act(wake), methods=["POST"]),
            *ui_routes(),
        ]

    # ------------------------------------------------------------------ guards and parameters

    def _reader(self, handler: Handler) -> Handler:
        return self._guarded(handler, act=False)

    def _actor(self, handler: Handler) -> Handler:
        return self._guarded(handler, act=True)

    def _guarded(self, handler: Handler, *, act: bool) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                allowed = auth.admin_allowed(request.headers.raw, self.app.config.router, act=act)
            except auth.DuplicateAuthorization:
                raise AdminError(auth.DUPLICATE_CODE, auth.DUPLICATE_MESSAGE, 400) from None
            if not allowed:
                message = "This action needs the router's admin token: send 'Authorization: Bearer TOKEN'." if act else _UNAUTHORIZED
                raise AdminError("invalid_api_key", message, 401, headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)

        return guarded

    def _model(self, request: Request) -> str:
        """The configured model the path names (a model or an alias of one)."""
        name: str = request.path_params["model"]
        model = self.app.proxy.routes.get(name)
        if model is None:
            raise AdminError("model_not_found", f"The model '{shorten(name)}' does not exist.", 404, param="model")
        return model

    # ------------------------------------------------------------------ health and models

    async def health(self, request: Request) -> Response:
        # Unauthenticated: nothing here but liveness and which config file content runs (a digest).
        return JSONResponse({"status": "ok", "config": self.app.digest, "refused_config": self.app.refused_digest})

    async def health_all(self, request: Request) -> Response:
        instances = self._instances()
        healthy = all(i["healthy"] for i in instances)
        return JSONResponse({"status": "ok" if healthy else "degraded", "instances": instances})

    async def health_model(self, request: Request) -> Response:
        model = self._model(request)
        instances = self._instances(model)
        healthy = any(i["healthy"] for i in instances)
        body = {"model": model, "status": "ok" if healthy else "unhealthy", "state": self.app.lifecycle.model_state(model), "instances": instances}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": {model: self._model_info(model) for model in self.app.models}})

    async def v1_models(self, request: Request) -> Response:
        data = []
        for model in self.app.models:
            data.append(self._model_object(model, model))
            data += [self._model_object(alias, model) for alias, target in self.app.config.aliases().items() if target == model]
        return JSONResponse({"object": "list", "data": data})

    async def v1_model(self, request: Request) -> Response:
        return JSONResponse(self._model_object(request.path_params["model"], self._model(request)))

    def _model_object(self, name: str, model: str) -> dict[str, Any]:
        """An entry of GET /v1/models (a model or an alias of one) with its state."""
        return {
            "id": name,
            "object": "model",
            "created": int(self.app.started),
            "owned_by": "kvctl",
            "root": model,
            "parent": None if name == model else model,
            "state": self.app.lifecycle.model_state(model),
        }

    def _instances(self, model: str | None = None) -> list[dict[str, Any]]:
        """The lifecycle's view of each instance, with its KV cache (`kv`: null when unknown)."""
        instances = self.app.lifecycle.instances(model)
        by_name = {inst.name: inst for inst in self.app.config.instances}
        for info in instances:
            inst = by_name.get(info["name"])
            info["kv"] = self.app.kv.view(inst) if inst is not None else None
        return instances

    def _model_info(self, model: str) -> dict[str, Any]:
        instances = self._instances(model)
        first = instances[0] if instances else {}
        return {
            "endpoint": first.get("url"),
            "engine": first.get("engine"),
            "state": self.app.lifecycle.model_state(model),
            "aliases": [a for a, m in self.app.config.aliases().items() if m == model],
            "instances": instances,
        }

    # ------------------------------------------------------------------ events and metrics

    async def events(self, request: Request) -> Response:
        follow = request.query_params.get("follow", "true").lower()
        if follow not in ("true", "false", "1", "0"):
            raise AdminError("invalid_query", f"Query parameter 'follow' must be true or false, got '{shorten(follow, 20)}'.", 400, param="follow")
        bus = self.app.events
        queue = bus.subscribe() if follow in ("true", "1") else None
        history = list(bus.history)  # after subscribing, with no await between: nothing is missed
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(self._event_stream(history, queue), media_type="text/event-stream", headers=headers)

    async def _event_stream(self, history: list[Any], queue: asyncio.Queue[Any] | None) -> AsyncIterator[bytes]:
        shutting_down = self.app.shutting_down
        try:
            for event in history:
                yield _sse(event.as_json())
            if queue is None:
                return
            stop = asyncio.ensure_future(shutting_down.wait())
            try:
                while not shutting_down.is_set():
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
                self.app.events.unsubscribe(queue)

    async def metrics(self, request: Request) -> Response:
        app = self.app
        return Response(app.metrics.render(app.lifecycle, app.models, app.kv.readings()), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ traffic

    async def traffic_stats(self, request: Request) -> Response:
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        app = self.app
        return JSONResponse({"traffic_stats": {m: {**app.traffic.stats(m, window), "kv": app.kv.model_view(m)} for m in app.models}, "window_seconds": window})

    async def traffic_model(self, request: Request) -> Response:
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        return JSONResponse({"model_stats": self.app.traffic.stats(self._model(request), window), "window_seconds": window})

    async def idle(self, request: Request) -> Response:
        threshold = _seconds(request, "threshold", self.app.config.sleep_manager.idle_threshold_seconds, allow_zero=True)
        names = self.app.traffic.idle_models(threshold)
        details = {m: self.app.traffic.stats(m, 60.0, threshold) for m in names}
        return JSONResponse({"idle_models": names, "idle_threshold_seconds": threshold, "idle_model_details": details, "idle_models_count": len(names)})

    async def active(self, request: Request) -> Response:
        threshold = _seconds(request, "threshold", self.app.config.sleep_manager.idle_threshold_seconds, allow_zero=True)
        window = _seconds(request, "window", 60.0, maximum=MAX_WINDOW_SECONDS)
        names = self.app.traffic.active_models(threshold)
        details = {m: self.app.traffic.stats(m, window, threshold) for m in names}
        body = {"active_models": names, "idle_threshold_seconds": threshold, "window_seconds": window, "active_model_details": details}
        return JSONResponse({**body, "active_models_count": len(names)})

    async def traffic_history(self, request: Request) -> Response:
        since = _seconds(request, "since", 0.0, allow_zero=True)
        return JSONResponse({**self.app.history.as_json(since), "memory_budget_gb": self.app.config.sleep_manager.memory_budget_gb})

    # ------------------------------------------------------------------ sleep, wake, stop

    async def sleep_status(self, request: Request) -> Response:
        return JSONResponse(self.app.lifecycle.sleep_status())

    async def sleep_candidates(self, request: Request) -> Response:
        sm = self.app.config.sleep_manager
        body = {"sleep_candidates": self.app.lifecycle.sleep_candidates(), "idle_threshold_seconds": sm.idle_threshold_seconds}
        return JSONResponse({**body, "auto_sleep_enabled": sm.auto_sleep_enabled})

    def _action(self, perform: Callable[[str], Awaitable[ActionResult]]) -> Handler:
        """POST /models/{model}/sleep|wake|stop: the lifecycle's answer, with its outcome's status."""

        async def handler(request: Request) -> Response:
            result = await perform(self._model(request))
            return JSONResponse(result.to_dict(), status_code=_STATUS[result.outcome])

        return handler

    async def kv_limit(self, request: Request) -> Response:
        """POST /models/{model}/kv_limit: set the kvcached limit of its instances (SPEC §13)."""
        model = self._model(request)
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        parsed = limit_request(body)
        if isinstance(parsed, str):
            raise AdminError("invalid_body", f"kv_limit: {parsed}.", 400)
        kind, value, only = parsed
        states = self.app.lifecycle.states()
        results = [self._set_kv_limit(inst, kind, value, states.get(inst.name, "unknown")) for inst in self._kv_targets(model, only)]
        message = "; ".join(r["message"] for r in results)
        if not any(r["limit_bytes"] is not None for r in results):
            raise AdminError("kv_unavailable", f"Model '{shorten(model)}': {message}", 409)
        return JSONResponse({"model_name": model, "success": True, "message": message, "instances": results})

    def _kv_targets(self, model: str, only: str | None) -> list[Instance]:
        """The kvcached instances of `model` (or the one named `only`)."""
        targets = self.app.kv.instances(model)
        if only is not None:
            if only not in {i.name for i in self.app.config.models().get(model, ())}:
                raise AdminError("instance_not_found", f"Model '{shorten(model)}' has no instance '{shorten(only)}'.", 404, param="instance")
            targets = [i for i in targets if i.name == only]
        if not targets:
            instance = f" {shorten(only)}" if only else ""
            raise AdminError("kv_unavailable", f"Model '{shorten(model)}' has no kvcached instance{instance} (ENABLE_KVCACHED=true in its environment).", 400)
        return targets

    def _set_kv_limit(self, inst: Instance, kind: str, value: float, state: str) -> dict[str, Any]:
        capacity = self.app.kv.capacity(inst)
        limit = int(value) if kind == "bytes" else None if capacity is None else int(capacity * value / 100)
        before = None if limit is None else self.app.kv.set_limit(inst, limit, "manual", state)
        if before is None or limit is None:
            return {"name": inst.name, "limit_bytes": None, "before": None, "message": f"{inst.name}: no kvcached segment (engine not running?)"}
        over = f"; {before.used_bytes / GiB:.2f} GiB in use: the engine frees it as requests finish" if before.used_bytes > limit else ""
        return {"name": inst.name, "limit_bytes": limit, "before": before.as_json(), "message": f"{inst.name}: kv limit {limit / GiB:.2f} GiB{over}"}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _seconds(request: Request, name: str, default: float, *, maximum: float | None = None, allow_zero: bool = False) -> float:
    """A positive number of seconds from the query string; AdminError (400) saying what is wrong."""
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
        raise AdminError("invalid_query", f"Query parameter '{name}' must be a number of seconds {bound}, got '{shorten(raw, 50)}'.", 400, param=name)
    return value
