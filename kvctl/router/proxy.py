"""The data plane's hot path: parse, route by `model`, forward, relay the answer.

Every µs here is paid per request, and per streamed chunk. What each trick buys (CPU,
measured in-process or with benchmarks/router_overhead.py on the 2-core dev machine):

* a raw ASGI handler dispatched before Starlette (no Request/Response objects, no
  middleware): a Starlette + httpx proxy cost ~3000 µs a request, this path 90–150;
* the upstream client of `upstream.py` (asyncio Protocol + httptools, keep-alive pool):
  httpx ~3000 µs a request, aiohttp ~500, it a few tens;
* the engine's body is pushed to the client from the upstream protocol's callback
  (`_Writer`): no task wake-up, future, timer or ASGI message per chunk (~6.5 µs of
  those per chunk in-process; per paced chunk at 64 streams 21–22 → 14–18 µs, at 8,000
  streams 48 → 20 µs: benchmarks/many_streams.py);
* answers are written to the client's transport directly with a pre-built head (not
  through uvicorn's send(), which re-checks every header), a whole non-streamed answer in
  one write: one send syscall instead of two when the engine's answer came in one read;
* a client disconnect is seen by a hook on the connection (`Cycle.on_client_lost`), not
  a watcher task per request awaiting receive() (~15 µs: a task, two steps, a callback);
* one lazily re-armed timer per engine connection, not one per wait (upstream.py: 2.5 µs
  per call_later + cancel); labelled histograms looked up once per model (0.9 µs a call).

Not used: uvloop (see server.py). What is left per request is mostly Python's cost of
parsing and dispatch (uvicorn's protocol and cycle, this module, httptools callbacks) and
the kernel's for the four socket operations; README "Performance" has the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from kvctl.config import Config, Instance
from kvctl.http1 import ConnectFailed, Connection, Pool, UpstreamClosed, UpstreamError, UpstreamTimeout
from kvctl.http1 import OutOfDescriptors as RouterOverloaded
from kvctl.router import logs, overload
from kvctl.router.asgi import Receive, Scope, Send
from kvctl.router.auth import DUPLICATE_CODE, DUPLICATE_MESSAGE, bearer, matches
from kvctl.router.errors import send_error, shorten, sse_error_event
from kvctl.router.lifecycle import Unavailable
from kvctl.router.protocol import Cycle

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from kvctl.router.lifecycle import Lifecycle
    from kvctl.router.metrics import Metrics
    from kvctl.router.traffic import TrafficMonitor

Headers = tuple[tuple[bytes, bytes], ...]
PROXIED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The router's credentials are not the engine's; length and id are set by the router.
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-request-id", b"expect"}
_NOT_RETURNED = _HOP_BY_HOP | {b"x-request-id"}
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_SHUTDOWN_CODE = "router_shutdown"
# Connection options that name no header (RFC 9110 §7.6.1): nothing to drop for them.
_PLAIN_OPTIONS = _HOP_BY_HOP | {b"close"}
_SHUTDOWN_MESSAGE = "The router is shutting down and cut this request; retry once it is back."


def _without_connection_options(forwarded: list[bytes], connection: bytes) -> list[bytes]:
    """Drop the headers the client's `Connection:` names: they were meant for this hop only."""
    named = {option.strip().lower() for option in connection.split(b",")} - _PLAIN_OPTIONS
    if not named:
        return forwarded  # the usual `keep-alive` or `close`
    return [part for i in range(0, len(forwarded), 4) if forwarded[i] not in named for part in forwarded[i : i + 4]]


class _ClientGone(Exception):
    """The client disconnected while sending its request."""


class _Exchange:
    """Per-request state shared with the client-disconnect hook."""

    __slots__ = ("finished", "gone", "task")

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self.task = task
        self.finished = False
        self.gone = False

    def client_left(self) -> None:
        if not self.finished and self.task is not None:
            self.gone = True
            self.task.cancel()


class _Writer:
    """The sink of a relayed body: called from the engine connection's data_received with
    each read, it writes to the client at once (chunk-framed when the client's answer is
    chunked) — no task wakes up, no timer, no ASGI message per chunk."""

    __slots__ = ("chunked", "conn", "first", "flow", "sent", "transport")

    def __init__(self, cycle: Cycle, conn: Connection, chunked: bool) -> None:
        self.transport = cycle.transport
        self.flow = cycle.flow
        self.conn = conn
        self.chunked = chunked
        self.sent = 0
        self.first: float | None = None  # when the first body byte went out (TTFT)

    def __call__(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.sent += len(data)
        if self.transport.is_closing():
            return  # the client is gone; the disconnect hook aborts the engine's request
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if self.flow.write_paused:
            self.conn.pause()  # the relay task waits for the client, then resumes the engine


class Proxy:
    def __init__(self, config: Config, lifecycle: Lifecycle | None, traffic: TrafficMonitor, metrics: Metrics) -> None:
        self.lifecycle = lifecycle
        self.traffic = traffic
        self.metrics = metrics
        self._pools: dict[str, Pool] = {}
        self._counters: dict[tuple[str, int], object] = {}
        self._histograms: dict[str, tuple[Histogram, Histogram]] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take the settings of a (re)loaded config; requests under way keep what they started with."""
        router = config.router
        self.config = config
        routes: dict[str, str] = {model: model for model in config.models()}
        for alias, model in config.aliases().items():
            routes.setdefault(alias, model)
        self.routes = routes
        self.replicas = {model: len(insts) for model, insts in config.models().items()}
        self._keys = [key.encode() for key in router.api_keys]
        self._max_body = router.max_body_bytes
        self._first_byte_timeout = router.request_timeout_seconds
        self._idle_timeout = router.stream_idle_timeout_seconds
        self._connect_timeout = router.connect_timeout_seconds
        # A pool to an address that no longer exists (instance removed or moved) is dropped.
        urls = {inst.name: (inst.host, inst.port) for inst in config.instances}
        for name in [name for name, pool in self._pools.items() if urls.get(name) != (pool.host, pool.port)]:
            self._pools.pop(name).close()

    # ------------------------------------------------------------------ entry point
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        auth = length = rid = connection = None
        duplicate = False
        forwarded: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                duplicate = auth is not None
                auth = value
            elif name == b"content-length":
                length = value
            elif name == b"x-request-id":
                rid = value
            elif name == b"connection":
                connection = value
            elif name not in _NOT_FORWARDED:
                forwarded += (name, b": ", value, b"\r\n")
        if connection is not None:
            forwarded = _without_connection_options(forwarded, connection)
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = os.urandom(12).hex().encode()
        rid_header = ((b"x-request-id", rid),)

        if duplicate:
            await self._reject(send, t0, rid, None, 400, DUPLICATE_MESSAGE, DUPLICATE_CODE, headers=rid_header)
            return
        if self._keys and not self.authorized(auth):
            await self._reject(
                send,
                t0,
                rid,
                None,
                401,
                "Invalid or missing API key: send 'Authorization: Bearer KEY'.",
                "invalid_api_key",
                headers=(*rid_header, (b"www-authenticate", b"Bearer")),
            )
            return
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self._max_body:
                await self._too_large(send, rid_header, t0)
                return
        try:
            body = await self._read_body(receive)
        except _ClientGone:
            return
        if body is None:
            await self._too_large(send, rid_header, t0)
            return

        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            await self._reject(send, t0, rid, None, 400, "The request body is not valid JSON.", "invalid_json", headers=rid_header)
            return
        if not isinstance(data, dict):
            await self._reject(send, t0, rid, None, 400, "The request body must be a JSON object.", "invalid_body", headers=rid_header)
            return
        model = data.get("model")
        if not isinstance(model, str) or not model:
            what = "missing" if model is None else ("empty" if model == "" else f"a {type(model).__name__}, not a string")
            await self._reject(send, t0, rid, None, 400, f"'model' must be a non-empty string (it is {what}).", "invalid_model", "model", rid_header)
            return
        canonical = self.routes.get(model)
        if canonical is None:
            await self._reject(
                send,
                t0,
                rid,
                None,
                404,
                f"The model '{shorten(model)}' does not exist. GET /v1/models lists the models.",
                "model_not_found",
                "model",
                rid_header,
            )
            return
        if canonical != model:
            data["model"] = canonical
            body = json.dumps(data).encode()

        path = scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        head = b"".join((b"POST ", path, b" HTTP/1.1\r\ncontent-length: ", str(len(body)).encode(), b"\r\nx-request-id: ", rid, b"\r\n", *forwarded))
        await self._forward(canonical, head, body, rid_header, scope, send, t0)

    def authorized(self, header: bytes | None) -> bool:
        """Constant-time check of `Authorization: Bearer KEY` against every configured key."""
        return matches(bearer(header), self._keys)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None past max_body_bytes (a chunked body has no declared size)."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body if len(body) <= self._max_body else None
        parts = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _too_large(self, send: Send, rid_header: Headers, t0: float) -> None:
        await self._reject(
            send,
            t0,
            rid_header[0][1],
            None,
            413,
            f"The request body is larger than the router's limit of {self._max_body} bytes.",
            "request_too_large",
            headers=(*rid_header, (b"connection", b"close")),
        )

    async def _reject(
        self, send: Send, t0: float, rid: bytes, model: str | None, status: int, message: str, code: str, param: str | None = None, headers: Headers = ()
    ) -> None:
        """An error of the router's own making, answered and access-logged (not counted as model traffic)."""
        await send_error(send, status, message, code, param, headers)
        _access(model, status, time.monotonic() - t0, None, None, rid, code)

    # ------------------------------------------------------------------ forwarding
    async def _forward(self, model: str, head: bytes, body: bytes, rid_header: Headers, scope: Scope, send: Send, t0: float) -> None:
        lifecycle = self.lifecycle
        assert lifecycle is not None, "the data plane needs the lifecycle"
        cycle: Cycle | None = scope.get("kvctl.cycle")
        if cycle is None:
            raise RuntimeError("the data plane runs under kvctl's HTTP protocol (kvctl.router.protocol)")
        ex = _Exchange(asyncio.current_task())
        status = 0
        reason: str | None = None
        ttft: float | None = None
        sent: int | None = None
        exclude: tuple[str, ...] = ()
        try:
            if cycle.disconnected:  # gone after its body arrived, before the hook was set
                ex.gone = True
                raise asyncio.CancelledError
            cycle.on_client_lost = ex.client_left
            for attempt in (0, 1):
                try:
                    inst = await lifecycle.acquire(model, exclude)
                except Unavailable as exc:
                    status, reason = exc.status, exc.code
                    headers = rid_header + (((b"retry-after", str(exc.retry_after).encode()),) if exc.retry_after is not None else ())
                    await send_error(send, exc.status, exc.message, exc.code, headers=headers)
                    return
                try:
                    status, ttft, reason, sent = await self._exchange(inst, head, body, rid_header, cycle, send, ex, t0)
                    return
                except ConnectFailed as exc:
                    lifecycle.report_connect_failure(inst)
                    if attempt == 0 and self.replicas[model] > 1:
                        exclude = (inst.name,)
                        continue
                    status, reason = 502, exc.reason
                    await send_error(send, 502, f"Model '{model}': engine {inst.name} is unreachable: {exc}", "engine_unreachable", headers=rid_header)
                    return
                except RouterOverloaded as exc:  # the router's own exhaustion: the engine is not to blame
                    overload.fd_exhausted.note("connecting to an engine")
                    status, reason = 503, exc.reason
                    await send_error(
                        send,
                        503,
                        overload.message(str(exc)),
                        "router_overloaded",
                        headers=(*rid_header, (b"retry-after", b"%d" % overload.RETRY_AFTER_SECONDS)),
                    )
                    return
                finally:
                    lifecycle.release(inst)
        except asyncio.CancelledError:
            if ex.gone:
                status, reason = 499, "client_disconnected"  # nginx's code for "client closed request"
            else:  # the server stops and cut the request before its answer began (see _relay)
                ex.finished = True
                status, reason = 503, _SHUTDOWN_CODE
                await send_error(send, 503, _SHUTDOWN_MESSAGE, _SHUTDOWN_CODE, headers=(*rid_header, (b"retry-after", b"%d" % overload.RETRY_AFTER_SECONDS)))
        finally:
            ex.finished = True
            cycle.on_client_lost = None
            latency = time.monotonic() - t0
            self._account(model, status, reason, latency, ttft)
            _access(model, status, latency, ttft, sent, rid_header[0][1], reason)

    async def _exchange(
        self, inst: Instance, head: bytes, body: bytes, rid_header: Headers, cycle: Cycle, send: Send, ex: _Exchange, t0: float
    ) -> tuple[int, float | None, str | None, int | None]:
        """One request to one instance. Returns (status sent, ttft, failure reason or None, body bytes sent)."""
        pool = self._pools.get(inst.name)
        if pool is None:
            pool = self._pools[inst.name] = Pool(inst.host, inst.port, self._connect_timeout)
        request = b"".join((head, pool.host_header, body))
        conn = await pool.get()
        try:
            conn.send(request)
            try:
                await conn.read_head(self._first_byte_timeout)
            except UpstreamClosed:
                if not (conn.reused and not conn.received):
                    raise
                # The engine closed an idle keep-alive connection as we wrote to it: nothing was
                # processed, so the request goes again on a fresh connection.
                conn.abort()
                conn = await pool.connect()
                conn.send(request)
                await conn.read_head(self._first_byte_timeout)
        except UpstreamTimeout:
            conn.abort()
            await send_error(
                send,
                504,
                f"Model '{inst.model}': engine {inst.name} sent no response within {self._first_byte_timeout:g}s.",
                "upstream_timeout",
                headers=rid_header,
            )
            return 504, None, "first_byte_timeout", None
        except (ConnectFailed, RouterOverloaded):
            conn.abort()
            raise  # the reconnect after a stale keep-alive failed: as any failed connect
        except UpstreamError as exc:
            conn.abort()
            await send_error(send, 502, f"Model '{inst.model}': engine {inst.name} failed before answering: {exc}", "engine_failed", headers=rid_header)
            return 502, None, exc.reason, None
        except BaseException:
            conn.abort()
            raise
        return await self._relay(conn, inst, rid_header, cycle, ex, t0)

    async def _relay(
        self, conn: Connection, inst: Instance, rid_header: Headers, cycle: Cycle, ex: _Exchange, t0: float
    ) -> tuple[int, float | None, str | None, int]:
        """Answer the client with the engine's response, written to its transport directly
        (not through ASGI send(), which checks every header of every message again)."""
        status = conn.status
        head = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status, b"x-request-id: ", rid_header[0][1], b"\r\n"]
        sse = False
        for name, value in conn.headers:
            name = name.lower()
            if name in _NOT_RETURNED:
                continue
            if name == b"content-type" and value.startswith(b"text/event-stream"):
                sse = True
            head += (name, b": ", value, b"\r\n")
        if sse:
            head.append(b"x-accel-buffering: no\r\n")
        # The engine's chunked framing is parsed and framed again: the same bytes either way
        # (one formatted write per read), and the error event can always follow a whole chunk.
        # An HTTP/1.0 client gets an unframed body that ends when the connection closes.
        chunked = not conn.has_length and cycle.keep_alive and status not in (204, 304)
        if chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        transport = cycle.transport
        writer = _Writer(cycle, conn, chunked)
        cycle.response_started = True
        try:
            data = conn.relay(writer)
            if data:
                writer.sent = len(data)
                writer.first = time.monotonic()
                head.append(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            if conn.done and chunked:
                head.append(b"0\r\n\r\n")
            if not transport.is_closing():  # (uvloop raises on a write to a closed transport)
                transport.write(b"".join(head))  # a whole non-streamed answer is one write (one syscall)
            if not conn.done:
                while not await conn.relayed(self._idle_timeout):
                    await cycle.flow.drain()  # the client is slow: wait for it, then read on
                    conn.resume()
                if chunked and not transport.is_closing():
                    transport.write(b"0\r\n\r\n")
        except (UpstreamClosed, UpstreamTimeout) as exc:
            conn.abort()
            ttft = _ttft(writer, sse, t0)
            if not sse:  # a truncated body must not look complete: close the connection
                _close(cycle)
                return status, ttft, exc.reason, writer.sent
            timed_out = isinstance(exc, UpstreamTimeout)
            message = (
                f"Model '{inst.model}': engine {inst.name} sent nothing for {self._idle_timeout:g}s"
                if timed_out
                else f"Model '{inst.model}': engine {inst.name} broke the stream: {exc}"
            )
            code = "stream_timeout" if timed_out else "engine_disconnected"
            ex.finished = True
            _end_with(cycle, sse_error_event(message, code), chunked)
            return status, ttft, code, writer.sent
        except asyncio.CancelledError:
            conn.abort()
            if ex.gone:
                raise
            # The server stops and its grace ran out (uvicorn's graceful-shutdown timeout, or a
            # second SIGTERM from `kvctl down --timeout`): a stream says so before it ends.
            ex.finished = True
            if sse:
                _end_with(cycle, sse_error_event(_SHUTDOWN_MESSAGE, _SHUTDOWN_CODE), chunked)
            else:
                _close(cycle)
            return status, _ttft(writer, sse, t0), _SHUTDOWN_CODE, writer.sent
        except BaseException:
            conn.abort()
            _close(cycle)
            raise
        ex.finished = True
        conn.finish()
        _complete(cycle)
        return status, _ttft(writer, sse, t0), (f"engine_{status}" if status >= 400 else None), writer.sent

    # ------------------------------------------------------------------ accounting
    def _account(self, model: str, status: int, reason: str | None, latency: float, ttft: float | None) -> None:
        ok = reason is None
        self.traffic.record(model, ok, latency, ttft)
        metrics = self.metrics
        key = (model, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = metrics.requests_total.labels(model, str(status))
        counter.inc()  # type: ignore[attr-defined]
        # The labelled histograms are looked up once per model (labels() costs ~0.9 µs a call).
        histograms = self._histograms.get(model)
        if histograms is None:
            histograms = self._histograms[model] = (metrics.request_latency_seconds.labels(model), metrics.ttft_seconds.labels(model))
        histograms[0].observe(latency)
        if ttft is not None:
            histograms[1].observe(ttft)
        if not ok:
            metrics.errors_total.labels(model, reason).inc()

    def close(self) -> None:
        for pool in list(self._pools.values()):
            pool.close()
        self._pools.clear()


def _access(model: str | None, status: int, latency: float, ttft: float | None, sent: int | None, rid: bytes, reason: str | None) -> None:
    """One access-log line per finished request (SPEC §11): 5xx at warning, the rest at info."""
    log = logs.access_log
    level = logging.WARNING if status >= 500 else logging.INFO
    if not log.isEnabledFor(level):
        return
    request_id = rid.decode("ascii", "replace")
    ttft_text = f"{ttft * 1000:.0f}ms" if ttft is not None else "-"
    log.log(
        level,
        "%s %d %.0fms ttft=%s bytes=%s id=%s%s",
        model or "-",
        status,
        latency * 1000,
        ttft_text,
        "-" if sent is None else sent,
        request_id,
        f" ({reason})" if reason else "",
        extra=logs.fields(
            model=model,
            status=status,
            latency_seconds=round(latency, 6),
            ttft_seconds=None if ttft is None else round(ttft, 6),
            bytes=sent,
            request_id=request_id,
            reason=reason,
        ),
    )


def _ttft(writer: _Writer, sse: bool, t0: float) -> float | None:
    return writer.first - t0 if sse and writer.first is not None else None


def _complete(cycle: Cycle) -> None:
    """The answer is whole: what uvicorn's send() does after the last body message."""
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()  # keep-alive timer, next pipelined request


def _end_with(cycle: Cycle, data: bytes, chunked: bool) -> None:
    """End a streamed answer with a last piece (the SSE error event)."""
    if not cycle.transport.is_closing():
        cycle.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if chunked else data)
    _complete(cycle)


def _close(cycle: Cycle) -> None:
    """End an answer that cannot be completed: closing tells the client it is truncated."""
    cycle.keep_alive = False
    cycle.response_complete = True
    cycle.transport.close()
