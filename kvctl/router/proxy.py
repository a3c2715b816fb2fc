"""The data plane's hot path: parse, route by `model`, forward, relay the answer.

Every µs here is paid per request, and per streamed chunk. What each trick buys (CPU,
measured in-process or with benchmarks/router_overhead.py on the 2-core dev machine):

* the three proxied routes skip uvicorn's ASGI machinery and Starlette: the protocol
  (protocol.py) hands each parsed request to `Proxy.serve` as an `Exchange` (no scope,
  RequestResponseCycle, Event, message dicts, receive()/send() coroutines; with the timer
  and request-id items below, 151 → 114 µs a request at 16 clients and 170 → 136 at 64 on
  asyncio over raw ASGI, medians of 6 reps on a loaded machine; raw ASGI was itself
  ~3000 → 90–150 µs over a Starlette + httpx proxy);
* the engine client of `kvctl/http1.py` (asyncio Protocol + httptools, keep-alive pool):
  httpx ~3000 µs a request, aiohttp ~500, it a few tens;
* the engine's body is pushed to the client from the upstream protocol's callback
  (`_Writer`): no task wake-up, future, timer or ASGI message per chunk (~6.5 µs of
  those per chunk in-process; per paced chunk at 64 streams 21–22 → 14–18 µs, at 8,000
  streams 48 → 20 µs: benchmarks/many_streams.py);
* answers are written to the client's transport directly with a pre-built head, a whole
  non-streamed answer in one write: one send syscall instead of two when the engine's
  answer came in one read;
* a client disconnect is seen by a hook on the connection (`Exchange.client_left`), not a
  watcher task per request awaiting receive() (~15 µs: a task, two steps, a callback);
* one lazily re-armed timer per engine connection (http1.py) and per client connection
  (the keep-alive timer, protocol.py), not one per wait or per request (~2.5 µs per
  call_later + cancel); labelled histograms looked up once per model (0.9 µs a call);
  request ids from a per-process random prefix and a counter (os.urandom is a syscall:
  ~0.5 µs); the access line formatted without a LogRecord (logs.py: ~13 → ~7 µs a text line);
* uvloop when the file-descriptor limit allows it (server.py): 10–15 % of the CPU of a
  request and of a chunk in paired runs (README: less clear on the loaded machine);
* no reference cycle per request (an `Exchange` must not refer to itself: see
  `message_event`), so a request's objects are freed when it ends, and gc.freeze() once
  the server is up (server.py): the garbage collector took ~15 µs a request at 64 clients
  (0.3 s per 20,000 requests, two thirds of it in collections of the older generations,
  which also walked the ~70,000 objects of start-up), now ~2 µs;
* the body's JSON through the decoder's raw_decode (~1.2 µs less than json.loads, which
  still parses any body that is not plain UTF-8 with nothing around the value); no ASGI
  scope built for a proxied request (protocol.py); no asyncio.Event made per request when
  nothing waits for the lifecycle to change.

What is left per request is mostly Python's cost of parsing and dispatch (httptools
callbacks, this module, the event loop) and the kernel's for the four socket operations;
README "Performance" has the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from kvctl.config import Config, Instance
from kvctl.http1 import ConnectFailed, Connection, OutOfDescriptors, Pool, UpstreamClosed, UpstreamError, UpstreamTimeout
from kvctl.router import logs, overload
from kvctl.router.auth import DUPLICATE_CODE, DUPLICATE_MESSAGE, bearer, matches
from kvctl.router.errors import error_bytes, shorten, sse_error_event, unavailable_status
from kvctl.router.states import Unavailable

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from kvctl.router.lifecycle import Lifecycle
    from kvctl.router.metrics import Metrics
    from kvctl.router.traffic import TrafficMonitor

log = logging.getLogger("kvctl.router")
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
# A request id the client did not send: unique per process start (random prefix) and per request (counter).
_ID_PREFIX = os.urandom(6).hex().encode()
_ID_COUNTER = itertools.count()


_DECODE = json.JSONDecoder().raw_decode


def _json(body: bytes) -> object:
    """json.loads(body), ~1.2 µs sooner for the usual body (UTF-8, nothing around the value):
    any other body (whitespace, a BOM, UTF-16, invalid) goes to json.loads itself."""
    try:
        text = body.decode()
        data, end = _DECODE(text)
        if end == len(text):
            return data
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        pass
    return json.loads(body)


def _request_id() -> bytes:
    return b"%s%012x" % (_ID_PREFIX, next(_ID_COUNTER))


def _without_connection_options(forwarded: list[bytes], connection: bytes) -> list[bytes]:
    """Drop the headers the client's `Connection:` names: they were meant for this hop only."""
    named = {option.strip().lower() for option in connection.split(b",")} - _PLAIN_OPTIONS
    if not named:
        return forwarded  # the usual `keep-alive` or `close`
    return [part for i in range(0, len(forwarded), 4) if forwarded[i] not in named for part in forwarded[i : i + 4]]


class ClientGone(Exception):
    """The client disconnected while sending its request."""


class Exchange:
    """One data-plane request and its answer. The protocol (protocol.py) fills in the request
    as it parses it and keeps it as uvicorn keeps a RequestResponseCycle (it uses the same
    attribute names); the proxy reads it and writes the answer to the transport itself. No
    ASGI scope, message dicts, Event or receive()/send() coroutines (see the module docstring)."""

    __slots__ = (
        "_waiter",
        "body",
        "complete",
        "disconnected",
        "expect_100",
        "flow",
        "forwarding",
        "gone",
        "headers",
        "keep_alive",
        "max_body",
        "on_response",
        "response_complete",
        "response_started",
        "size",
        "target",
        "task",
        "too_large",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        flow: FlowControl,
        headers: list[tuple[bytes, bytes]],
        target: bytes,
        keep_alive: bool,
        expect_100: bool,
        max_body: int,
        on_response: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.flow = flow
        self.headers = headers  # names lower-cased
        self.target = target  # the path and query to forward
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.max_body = max_body
        self.on_response = on_response  # the protocol's: keep-alive timer, next pipelined request
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False  # the whole body arrived
        self.too_large = False  # more than max_body arrived: what came is dropped
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None  # the protocol's task that serves it
        # From now on a disconnect cancels the task (and the engine's request). Once the answer
        # is decided the task writes it to the end without awaiting: no cancel can reach it.
        self.forwarding = False
        self.gone = False  # the client left and cancelled the request
        self._waiter: asyncio.Future[None] | None = None

    @property
    def message_event(self) -> Exchange:
        """uvicorn's protocol calls `cycle.message_event.set()` when the client sent more or
        left: here that wakes a read of the body. A property, not an attribute holding self:
        that reference cycle left every Exchange (with its task, coroutine, lists) to the
        garbage collector instead of freeing it when the request ends."""
        return self

    # -- called by the protocol
    def add_body(self, data: bytes) -> None:
        if self.response_complete or self.too_large:
            return
        self.size += len(data)
        if self.size > self.max_body:
            self.too_large = True
            self.body = []
            self.set()
        else:
            self.body.append(data)

    def end_body(self) -> None:
        self.complete = True
        if self._waiter is not None:
            self.set()

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def client_left(self) -> None:
        if self.forwarding and self.task is not None:
            self.gone = True
            self.task.cancel()

    # -- used by the proxy
    async def read_body(self) -> bytes | None:
        """The whole body, or None past max_body (a chunked body has no declared size).
        ClientGone if the client leaves first."""
        while not (self.complete or self.too_large or self.disconnected):
            if self.expect_100:
                self.expect_100 = False
                if not self.transport.is_closing():
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.disconnected:
            raise ClientGone
        if self.too_large:
            return None
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)


class _Writer:
    """The sink of a relayed body: called from the engine connection's data_received with
    each read, it writes to the client at once (chunk-framed when the client's answer is
    chunked) — no task wakes up, no timer, no message per chunk."""

    __slots__ = ("chunked", "conn", "first", "flow", "sent", "transport")

    def __init__(self, ex: Exchange, conn: Connection, chunked: bool) -> None:
        self.transport = ex.transport
        self.flow = ex.flow
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
        self.max_body = router.max_body_bytes
        self._first_byte_timeout = router.request_timeout_seconds
        self._idle_timeout = router.stream_idle_timeout_seconds
        self._connect_timeout = router.connect_timeout_seconds
        # A pool to an address that no longer exists (instance removed or moved) is dropped.
        urls = {inst.name: (inst.host, inst.port) for inst in config.instances}
        for name in [name for name, pool in self._pools.items() if urls.get(name) != (pool.host, pool.port)]:
            self._pools.pop(name).close()

    # ------------------------------------------------------------------ entry point
    async def serve(self, ex: Exchange) -> None:
        """Answer one data-plane request: the task the protocol starts for it."""
        try:
            await self._serve(ex)
        except Exception:  # a bug: logged, and answered 500 as uvicorn would have
            log.exception("the proxy failed on a request")
            if not ex.response_started:
                _error(ex, 500, "The router failed on this request; see its log.", "internal_error")
            elif not ex.response_complete:
                _close(ex)

    async def _serve(self, ex: Exchange) -> None:
        t0 = time.monotonic()
        auth = length = rid = connection = None
        duplicate = False
        forwarded: list[bytes] = []
        for name, value in ex.headers:
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
            rid = _request_id()
        rid_header = ((b"x-request-id", rid),)

        if duplicate:
            self._reject(ex, t0, rid, 400, DUPLICATE_MESSAGE, DUPLICATE_CODE)
            return
        if self._keys and not matches(bearer(auth), self._keys):  # constant time, every key compared
            message = "Invalid or missing API key: send 'Authorization: Bearer KEY'."
            self._reject(ex, t0, rid, 401, message, "invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
            return
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_body:
                self._too_large(ex, t0, rid)
                return
        try:
            body = await ex.read_body()
        except ClientGone:
            return
        if body is None:
            self._too_large(ex, t0, rid)
            return

        try:
            data = _json(body)
        except (ValueError, RecursionError):
            self._reject(ex, t0, rid, 400, "The request body is not valid JSON.", "invalid_json")
            return
        if not isinstance(data, dict):
            self._reject(ex, t0, rid, 400, "The request body must be a JSON object.", "invalid_body")
            return
        model = data.get("model")
        if not isinstance(model, str) or not model:
            what = "missing" if model is None else ("empty" if model == "" else f"a {type(model).__name__}, not a string")
            self._reject(ex, t0, rid, 400, f"'model' must be a non-empty string (it is {what}).", "invalid_model", "model")
            return
        canonical = self.routes.get(model)
        if canonical is None:
            message = f"The model '{shorten(model)}' does not exist. GET /v1/models lists the models."
            self._reject(ex, t0, rid, 404, message, "model_not_found", "model")
            return
        if canonical != model:
            data["model"] = canonical
            body = json.dumps(data).encode()

        head = b"".join((b"POST ", ex.target, b" HTTP/1.1\r\ncontent-length: %d\r\nx-request-id: " % len(body), rid, b"\r\n", *forwarded))
        await self._forward(ex, canonical, head, body, rid_header, t0)

    def _too_large(self, ex: Exchange, t0: float, rid: bytes) -> None:
        message = f"The request body is larger than the router's limit of {self.max_body} bytes."
        ex.keep_alive = False  # the rest of the body is not read
        self._reject(ex, t0, rid, 413, message, "request_too_large")

    def _reject(self, ex: Exchange, t0: float, rid: bytes, status: int, message: str, code: str, param: str | None = None, headers: Headers = ()) -> None:
        """An error of the router's own making, answered and access-logged (not counted as model traffic)."""
        _error(ex, status, message, code, param, ((b"x-request-id", rid), *headers))
        logs.access(None, status, time.monotonic() - t0, None, None, rid, code)

    # ------------------------------------------------------------------ forwarding
    async def _forward(self, ex: Exchange, model: str, head: bytes, body: bytes, rid_header: Headers, t0: float) -> None:
        lifecycle = self.lifecycle
        assert lifecycle is not None, "the data plane needs the lifecycle"
        status = 0
        reason: str | None = None
        ttft: float | None = None
        sent: int | None = None
        exclude: tuple[str, ...] = ()
        try:
            if ex.disconnected:  # gone after its body arrived, before it could be cancelled
                ex.gone = True
                raise asyncio.CancelledError
            ex.forwarding = True
            for attempt in (0, 1):
                try:
                    inst = await lifecycle.acquire(model, exclude)
                except Unavailable as exc:
                    status, reason = unavailable_status(exc.code), exc.code
                    headers = rid_header + (((b"retry-after", str(exc.retry_after).encode()),) if exc.retry_after is not None else ())
                    _error(ex, status, exc.message, exc.code, headers=headers)
                    return
                try:
                    status, ttft, reason, sent = await self._exchange(ex, inst, head, body, rid_header, t0)
                    return
                except ConnectFailed as exc:
                    lifecycle.report_connect_failure(inst)
                    if attempt == 0 and self.replicas[model] > 1:
                        exclude = (inst.name,)
                        continue
                    status, reason = 502, exc.reason
                    _error(ex, 502, f"Model '{model}': engine {inst.name} is unreachable: {exc}", "engine_unreachable", headers=rid_header)
                    return
                except OutOfDescriptors as exc:  # the router's own exhaustion: the engine is not to blame
                    overload.fd_exhausted.note("connecting to an engine")
                    status, reason = 503, exc.reason
                    _error(ex, 503, overload.message(str(exc)), "router_overloaded", headers=(*rid_header, overload.RETRY_AFTER))
                    return
                finally:
                    lifecycle.release(inst)
        except asyncio.CancelledError:
            if ex.gone:
                status, reason = 499, "client_disconnected"  # nginx's code for "client closed request"
            else:  # the server stops and cut the request before its answer began (see _relay)
                status, reason = 503, _SHUTDOWN_CODE
                _error(ex, 503, _SHUTDOWN_MESSAGE, _SHUTDOWN_CODE, headers=(*rid_header, overload.RETRY_AFTER))
        finally:
            latency = time.monotonic() - t0
            self._account(model, status, reason, latency, ttft)
            logs.access(model, status, latency, ttft, sent, rid_header[0][1], reason)

    async def _exchange(
        self, ex: Exchange, inst: Instance, head: bytes, body: bytes, rid_header: Headers, t0: float
    ) -> tuple[int, float | None, str | None, int | None]:
        """One request to one instance. Returns (status sent, ttft, failure reason or None, body bytes sent)."""
        pool = self._pools.get(inst.name)
        if pool is None:
            pool = self._pools[inst.name] = Pool(inst.host, inst.port, self._connect_timeout)
        try:
            conn = await pool.open(b"".join((head, pool.host_header, body)), self._first_byte_timeout)
        except UpstreamTimeout:
            message = f"Model '{inst.model}': engine {inst.name} sent no response within {self._first_byte_timeout:g}s."
            _error(ex, 504, message, "upstream_timeout", headers=rid_header)
            return 504, None, "first_byte_timeout", None
        except (ConnectFailed, OutOfDescriptors):
            raise  # as any failed connect (also the reconnect after a stale keep-alive)
        except UpstreamError as exc:
            _error(ex, 502, f"Model '{inst.model}': engine {inst.name} failed before answering: {exc}", "engine_failed", headers=rid_header)
            return 502, None, exc.reason, None
        return await self._relay(ex, conn, inst, rid_header[0][1], t0)

    async def _relay(self, ex: Exchange, conn: Connection, inst: Instance, rid: bytes, t0: float) -> tuple[int, float | None, str | None, int]:
        """Answer the client with the engine's response, written to its transport directly."""
        status = conn.status
        head = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status, b"x-request-id: ", rid, b"\r\n"]
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
        chunked = not conn.has_length and ex.keep_alive and status not in (204, 304)
        if chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        if not ex.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        transport = ex.transport
        writer = _Writer(ex, conn, chunked)
        ex.response_started = True
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
                    await ex.flow.drain()  # the client is slow: wait for it, then read on
                    conn.resume()
                if chunked and not transport.is_closing():
                    transport.write(b"0\r\n\r\n")
        except (UpstreamClosed, UpstreamTimeout) as exc:
            conn.abort()
            ttft = _ttft(writer, sse, t0)
            if not sse:  # a truncated body must not look complete: close the connection
                _close(ex)
                return status, ttft, exc.reason, writer.sent
            timed_out = isinstance(exc, UpstreamTimeout)
            message = (
                f"Model '{inst.model}': engine {inst.name} sent nothing for {self._idle_timeout:g}s"
                if timed_out
                else f"Model '{inst.model}': engine {inst.name} broke the stream: {exc}"
            )
            code = "stream_timeout" if timed_out else "engine_disconnected"
            _end_with(ex, sse_error_event(message, code), chunked)
            return status, ttft, code, writer.sent
        except asyncio.CancelledError:
            conn.abort()
            if ex.gone:
                raise
            # The server stops and its grace ran out (uvicorn's graceful-shutdown timeout, or a
            # second SIGTERM from `kvctl down --timeout`): a stream says so before it ends.
            if sse:
                _end_with(ex, sse_error_event(_SHUTDOWN_MESSAGE, _SHUTDOWN_CODE), chunked)
            else:
                _close(ex)
            return status, _ttft(writer, sse, t0), _SHUTDOWN_CODE, writer.sent
        except BaseException:
            conn.abort()
            _close(ex)
            raise
        conn.finish()
        _complete(ex)
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


def _ttft(writer: _Writer, sse: bool, t0: float) -> float | None:
    return writer.first - t0 if sse and writer.first is not None else None


def _error(ex: Exchange, status: int, message: str, code: str, param: str | None = None, headers: Headers = ()) -> None:
    """A complete OpenAI-shaped JSON error answer."""
    ex.response_started = True
    if not ex.transport.is_closing():
        ex.transport.write(error_bytes(status, message, code, param, headers, not ex.keep_alive))
    _complete(ex)


def _complete(ex: Exchange) -> None:
    """The answer is whole: close the connection, or let it take the next request."""
    ex.response_complete = True
    if not ex.keep_alive:
        ex.transport.close()
    ex.on_response()  # keep-alive timer, next pipelined request


def _end_with(ex: Exchange, data: bytes, chunked: bool) -> None:
    """End a streamed answer with a last piece (the SSE error event)."""
    if not ex.transport.is_closing():
        ex.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if chunked else data)
    _complete(ex)


def _close(ex: Exchange) -> None:
    """End an answer that cannot be completed: closing tells the client it is truncated."""
    ex.keep_alive = False
    ex.response_complete = True
    ex.transport.close()
