"""The simulated engine's Starlette app: vLLM's or SGLang's HTTP API.

Dialect behaviour while asleep, as the real engines do: vLLM parks generation
requests (accepted, no byte sent) until woken; SGLang answers 503 while its memory is
released. A client that disconnects while its request is parked or streaming stops
the generation and counts as `aborted`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvctl import __version__
from kvctl.sim import protocol
from kvctl.sim.dialects import DIALECTS
from kvctl.sim.protocol import BadRequest, Generation, Shapes
from kvctl.sim.state import EngineState, KvPool, Settings

T = TypeVar("T")
MAX_BODY_BYTES = 16 * 2**20
KV_CAPACITY_TOKENS = 65536  # for the simulated KV-cache usage gauge
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_JSON = "application/json"


class _Disconnected(Exception):
    pass


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(aw: Awaitable[T], receive: Receive) -> T:
    """Await `aw`, cancelling it if the client goes away (then raise _Disconnected).

    uvicorn's send() is silent on a closed connection, so the only way to notice a
    departed client is to keep reading: receive() returns http.disconnect.
    """
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise _Disconnected
    return task.result()


class _Engine:
    def __init__(self, settings: Settings, kv: KvPool | None = None) -> None:
        self.settings = settings
        self.model = settings.model
        self.dialect = settings.sim.dialect
        self.state = EngineState(settings, kv)
        tps = settings.sim.tokens_per_second
        self.interval = 1.0 / tps if tps > 0 else 0.0
        self.ttft = settings.sim.ttft_ms / 1000.0
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.registry.register(_Metrics(self))

    def error(self, status: int, message: str, param: str | None = None) -> Response:
        return Response(protocol.error_body(self.dialect, status, message, param), status, media_type=_JSON)

    async def read_json(self, request: Request, allow_empty: bool = False) -> dict[str, Any]:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"request body larger than {MAX_BODY_BYTES} bytes", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(f"request body larger than {MAX_BODY_BYTES} bytes", status=413)
        if allow_empty and not body.strip():
            return {}
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    def check_model(self, body: dict[str, Any]) -> None:
        # vLLM rejects a model it does not serve; SGLang ignores the field.
        model = body.get("model")
        if self.dialect == "vllm" and model is not None and model != self.model:
            raise BadRequest(f"The model `{model}` does not exist.", status=404, param="model")

    # -- generation ----------------------------------------------------------------

    async def completions(self, request: Request) -> Response | _Stream:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response | _Stream:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response | _Stream:
        try:
            body = await self.read_json(request)
            self.check_model(body)
            gen = protocol.parse_generation(body, chat)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        state = self.state
        if state.sleeping and self.dialect == "sglang":
            return self.error(503, "The engine's memory is released (release_memory_occupation); resume it first.")
        state.maybe_crash()
        tokens = gen.prompt_tokens + gen.max_tokens
        state.arrive()
        phase = "waiting"  # who must account for the request when it leaves
        try:
            if not state.awake.is_set():
                await _unless_disconnected(state.awake.wait(), request.receive)
            if state.should_fail():
                return self.error(500, "simulated engine failure (--fail-rate)")
            if state.kv is not None:  # waits (counted as waiting) until its KV fits under the limit
                await _unless_disconnected(state.kv.admit(tokens), request.receive)
            state.start(tokens)
            phase = "running"
            shapes = Shapes(gen, self.model)
            if gen.stream:
                phase = "stream"  # the stream accounts for itself
                return _Stream(self, shapes, tokens)
            if self.ttft or self.interval or state.frozen:
                text, count, finish = await _unless_disconnected(self._collect(gen), request.receive)
            else:
                text, count, finish = await self._collect(gen)
            state.served(gen.prompt_tokens, count)
            return Response(shapes.full(text, count, finish), media_type=_JSON)
        except _Disconnected:
            state.aborted += 1
            return Response(status_code=499)  # nobody is listening any more
        finally:
            if phase != "stream":
                state.leave(phase == "running", tokens)

    async def tokens(self, gen: Generation) -> AsyncIterator[tuple[str, str | None]]:
        """Yield (text, finish_reason) per token, paced like the engine."""
        state = self.state
        epoch = state.abort_epoch
        garbage = not state.weights_loaded
        kv, held = state.kv, 0  # KV-cache tokens this request holds (prompt, then each generated one)
        try:
            if kv is not None:
                kv.grow(gen.prompt_tokens)
                held = gen.prompt_tokens
            if self.ttft:
                await asyncio.sleep(self.ttft)
            last = gen.max_tokens - 1
            for i in range(gen.max_tokens):
                if i and self.interval:
                    await asyncio.sleep(self.interval)
                if state.frozen:
                    await state.awake.wait()
                if state.abort_epoch != epoch:
                    state.sleep_aborted += 1
                    yield "", "abort"
                    return
                if kv is not None:
                    kv.grow(1)
                    held += 1
                yield gen.token(i, garbage), ("length" if i == last else None)
        finally:
            if kv is not None:
                kv.leave(0, held)

    async def _collect(self, gen: Generation) -> tuple[str, int, str]:
        parts: list[str] = []
        finish = "length"
        async for text, fin in self.tokens(gen):
            if text:
                parts.append(text)
            finish = fin or finish
        return "".join(parts), len(parts), finish

    # -- embeddings, models, health --------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        try:
            body = await self.read_json(request)
            self.check_model(body)
            payload = protocol.embeddings(body, self.model)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        state = self.state
        if state.sleeping and self.dialect == "sglang":
            return self.error(503, "The engine's memory is released (release_memory_occupation); resume it first.")
        state.arrive()
        try:
            if not state.awake.is_set():
                await _unless_disconnected(state.awake.wait(), request.receive)
        except _Disconnected:
            state.aborted += 1
            return Response(status_code=499)
        finally:
            state.leave(False, 0)
        state.embeddings_served += 1
        return Response(payload, media_type=_JSON)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": self.dialect,
            "root": self.model,
            "parent": None,
            "max_model_len": protocol.MAX_MODEL_LEN,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def health_generate(self, request: Request) -> Response:
        # SGLang runs a one-token generation: impossible while memory is released.
        return Response(status_code=503 if self.state.sleeping else 200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": f"{__version__}+kvctl.sim"})

    async def model_info(self, request: Request) -> Response:
        return JSONResponse({"model_path": self.model, "tokenizer_path": self.model, "is_generation": True})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def sim_state(self, request: Request) -> Response:
        return JSONResponse(self.state.snapshot())

    # -- vLLM sleep API (dev mode) -----------------------------------------------------

    async def vllm_sleep(self, request: Request) -> Response:
        # Like vLLM, only the query string counts; a JSON body is ignored.
        query = request.query_params
        mode = query.get("mode")
        self.state.last_sleep_params = {"level": query.get("level"), "mode": mode}
        try:
            level = int(query.get("level", "1"))
        except ValueError:
            return self.error(400, "Sleep level must be an integer", "level")
        if level not in (1, 2):
            return self.error(400, "Sleep level must be 1 or 2", "level")
        if mode not in (None, "abort", "wait", "keep"):
            return self.error(400, "Sleep mode must be abort, wait, or keep", "mode")
        await self.state.vllm_sleep(level, mode or "abort")
        return Response(status_code=200)

    async def vllm_wake(self, request: Request) -> Response:
        tags = request.query_params.getlist("tags")
        self.state.last_wake_params = {"tags": tags}
        unknown = [t for t in tags if t not in self.state.tags]
        if unknown:
            return self.error(400, f"unknown wake_up tags {unknown}: use {list(self.state.tags)}", "tags")
        await self.state.vllm_wake(tags)
        return Response(status_code=200)

    async def is_sleeping(self, request: Request) -> Response:
        return JSONResponse({"is_sleeping": self.state.sleeping})

    async def collective_rpc(self, request: Request) -> Response:
        # Only `reload_weights` is simulated: what a level-2 wake needs before serving.
        try:
            body = await self.read_json(request)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        if body.get("method") != "reload_weights":
            return self.error(400, "the simulator supports only collective_rpc method 'reload_weights'", "method")
        if not self.state.reload_weights():
            return self.error(400, "cannot reload weights while they are asleep: wake_up first")
        return JSONResponse({"results": [None]})

    # -- SGLang memory API -----------------------------------------------------------

    async def _tags_body(self, request: Request) -> tuple[dict[str, Any], list[str]]:
        body = await self.read_json(request, allow_empty=True)
        tags = body.get("tags") or []
        if not isinstance(tags, list) or any(t not in self.state.tags for t in tags):
            raise BadRequest(f"'tags' must be a list of {list(self.state.tags)}", param="tags")
        return body, tags

    async def release(self, request: Request) -> Response:
        try:
            body, tags = await self._tags_body(request)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        self.state.last_sleep_params = body
        await self.state.release(tags)
        return JSONResponse(None)

    async def resume(self, request: Request) -> Response:
        try:
            body, tags = await self._tags_body(request)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        self.state.last_wake_params = body
        await self.state.resume(tags)
        return JSONResponse(None)

    async def update_weights(self, request: Request) -> Response:
        try:
            body = await self.read_json(request)
        except BadRequest as exc:
            return self.error(exc.status, exc.message, exc.param)
        if not isinstance(body.get("model_path"), str):
            return JSONResponse({"success": False, "message": "'model_path' is required", "num_paused_requests": 0}, 400)
        if not self.state.reload_weights():
            return JSONResponse({"success": False, "message": "weights memory is released: resume_memory_occupation first", "num_paused_requests": 0}, 400)
        return JSONResponse({"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0})


class _Stream:
    """An SSE response; owns the request's accounting once returned by the endpoint."""

    def __init__(self, engine: _Engine, shapes: Shapes, tokens: int) -> None:
        self.engine = engine
        self.shapes = shapes
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine, state = self.engine, self.engine.state
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            if engine.ttft or engine.interval or state.frozen:
                count = await _unless_disconnected(self._body(send), receive)
            else:
                count = await self._body(send)
            state.served(self.shapes.gen.prompt_tokens, count)
        except _Disconnected:
            state.aborted += 1
        finally:
            state.leave(True, self.tokens)

    async def _body(self, send: Send) -> int:
        shapes, gen = self.shapes, self.shapes.gen
        count = 0
        async for text, finish in self.engine.tokens(gen):
            if count == 0 and gen.chat:
                await send({"type": "http.response.body", "body": shapes.role_chunk(), "more_body": True})
            if text:
                count += 1
            await send({"type": "http.response.body", "body": shapes.token_chunk(text, finish), "more_body": True})
        if gen.include_usage:
            await send({"type": "http.response.body", "body": shapes.usage_chunk(count), "more_body": True})
        await send({"type": "http.response.body", "body": protocol.DONE, "more_body": False})
        return count


class _Metrics:
    """Prometheus collector reading the engine's state at scrape time (no hot-path cost)."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.names = DIALECTS[engine.dialect]

    def collect(self) -> Any:
        state, labels, values = self.engine.state, ["model_name"], [self.engine.model]
        if state.kv is not None:
            limit = state.kv.limit()
            kv = min(1.0, state.kv.used_bytes / limit) if limit > 0 else 1.0
        else:
            kv = 0.0 if state.sleeping else min(1.0, state.running_tokens / KV_CAPACITY_TOKENS)
        for name, doc, value in (
            (self.names.running, "Requests generating.", state.running),
            (self.names.waiting, "Requests waiting (parked while asleep).", state.waiting),
            (self.names.kv_usage, "KV-cache usage, 0 to 1.", kv),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
        if self.names.sleep_state is not None:
            # As vLLM: 1 for the current state; asleep at level 1 the weights are offloaded, at 2 discarded.
            level = str((state.last_sleep_params or {}).get("level", "1"))
            current = "awake" if not state.sleeping else "discard_all" if level == "2" else "weights_offloaded"
            gauge = GaugeMetricFamily(self.names.sleep_state, "Engine sleep state.", labels=[*labels, "sleep_state"])
            for sleep_state in ("awake", "weights_offloaded", "discard_all"):
                gauge.add_metric([*values, sleep_state], int(sleep_state == current))
            yield gauge
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens processed.", state.prompt_tokens),
            ("generation_tokens", "Tokens generated.", state.generation_tokens),
        ):
            counter = CounterMetricFamily(f"{self.engine.dialect}:{name}", doc, labels=labels)
            counter.add_metric(values, value)
            yield counter


def create_app(settings: Settings, kv: KvPool | None = None) -> Starlette:
    engine = _Engine(settings, kv)
    routes = [
        Route("/health", engine.health),
        Route("/v1/models", engine.models),
        Route("/v1/completions", engine.completions, methods=["POST"]),
        Route("/v1/chat/completions", engine.chat, methods=["POST"]),
        Route("/v1/embeddings", engine.embeddings, methods=["POST"]),
        Route("/metrics", engine.metrics),
        Route("/sim/state", engine.sim_state),
    ]
    if engine.dialect == "vllm":
        routes += [
            Route("/version", engine.version),
            Route("/sleep", engine.vllm_sleep, methods=["POST"]),
            Route("/wake_up", engine.vllm_wake, methods=["POST"]),
            Route("/is_sleeping", engine.is_sleeping),
            Route("/collective_rpc", engine.collective_rpc, methods=["POST"]),
        ]
    else:
        routes += [
            Route("/health_generate", engine.health_generate),
            Route("/get_model_info", engine.model_info),
            Route("/release_memory_occupation", engine.release, methods=["GET", "POST"]),
            Route("/resume_memory_occupation", engine.resume, methods=["GET", "POST"]),
            Route("/update_weights_from_disk", engine.update_weights, methods=["POST"]),
        ]
    app = Starlette(routes=routes)
    app.state.engine = engine
    return app
