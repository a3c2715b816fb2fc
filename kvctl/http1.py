"""kvctl's one HTTP/1.1 client: asyncio Protocols + httptools' parser, keep-alive pools.

Used by the router for its engines (`Pool`, `Connection`: the hot path) and by `kvctl
bench` and the benchmarks (`Client`: a base URL, http or https). Why not httpx or aiohttp:
measured per request, httpx costs ~2 ms of CPU and aiohttp ~0.5 ms; this client costs a few
tens of µs (benchmarks/router_overhead.py, benchmarks/bench_client_ceiling.py).

It does what those two need and nothing else: one request at a time per connection, a
keep-alive pool per origin, the response head parsed by httptools; then the body is pushed
to a sink as each read arrives (`relay`), from the protocol callback itself: no task wakes
up per chunk. Backpressure: the sink may pause reading until its consumer catches up.
Imports only the standard library and httptools (bench must not pull in the router).
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

# What connect() and accept() raise when the process or the system has no descriptor (or
# socket buffer) left: this process's overload, not the server's fault.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Servers such as uvicorn drop idle keep-alive connections after 5 s; ours are retired
# earlier so that a request is never written to a connection the server is closing.
_IDLE_SECONDS = 4.0
MAX_IDLE = 256  # per pool, by default (the router sizes its descriptor needs with it)
# Stop reading from the server once this much is buffered and not yet relayed.
_HIGH_WATER = 256 * 1024
_MAX_ERROR_BODY = 64 * 1024  # Client keeps a non-2xx body only for its message


class UpstreamError(Exception):
    """The server could not be used; `reason` is a short machine-readable cause (the
    router's error metric label)."""

    reason = "upstream_error"


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, TLS, timed out): nothing was sent."""

    reason = "connect_failed"


class OutOfDescriptors(UpstreamError):
    """This process is out of file descriptors: its own overload, not the server's fault."""

    reason = "router_overloaded"


class UpstreamClosed(UpstreamError):
    """The server closed the connection or sent a malformed response."""

    reason = "engine_closed"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"


class Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._until_close = False  # body delimited by connection close (no length, not chunked)
        self._sink: Callable[[bytes], None] | None = None  # where body bytes go once relayed
        self._held = False  # reading paused until the sink's consumer catches up
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._since = 0.0  # start of the current wait, or the last read during it
        self.reused = False
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.has_length = False  # the response declares its Content-Length
        self.done = False
        self.keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._waiter is not None:
            self._since = self._loop.time()  # activity: the idle timer re-arms from here
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"malformed response: {exc}"))
            self.abort()
            return
        # Relaying: what this read carried goes on at once, as one piece (one client write).
        chunks = self._chunks
        if self._sink is not None and chunks:
            self._chunks = []
            self._sink(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.head_done and not self.done and self._until_close:
            self.on_message_complete()
        elif not self.done:
            self._fail(UpstreamClosed("the server closed the connection" + (f" ({exc})" if exc else "")))
        self._transport = None

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Read here: once the message is complete the parser has reset and says "no keep-alive".
        self.keep_alive = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in self.headers}
        self.has_length = b"content-length" in names
        self._until_close = not self.has_length and b"transfer-encoding" not in names and self.status not in (204, 304)
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        if self._sink is not None:
            return  # data_received hands it on
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # -- used by the router and by Client
    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def read_head(self, timeout: float) -> None:
        """Wait for the status line and headers (UpstreamTimeout if `timeout` passes first)."""
        while not self.head_done:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    def relay(self, sink: Callable[[bytes], None]) -> bytes:
        """Body bytes from now on go to `sink`, one call per read from the server.
        Returns the bytes that arrived before (with the head, typically)."""
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        self._sink = sink
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def relayed(self, timeout: float) -> bool:
        """Wait until the relayed response is complete (True) or the sink paused it (False).
        UpstreamTimeout when no byte came for `timeout` (a paused sink does not count)."""
        while not self.done:
            if self._error is not None:
                raise self._error
            if self._held:
                return False
            await self._wait(timeout)
        return True

    def pause(self) -> None:
        """Stop reading from the server until resume(): the sink's consumer is not keeping up."""
        if not self._held and self._transport is not None:
            self._held = True
            self._transport.pause_reading()
            self._wake()

    def resume(self) -> None:
        if self._held:
            self._held = False
            if self._transport is not None:
                self._transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection at once (the server sees the disconnect and aborts)."""
        if self._transport is not None:
            self._transport.abort()

    def finish(self) -> None:
        """The response was fully read: back to the pool if reusable, else closed."""
        if self.done and self.keep_alive and self._error is None and self._transport is not None and not self._transport.is_closing():
            self._pool.put(self)
        else:
            self.abort()

    def reset(self) -> None:
        self.headers = []
        self.head_done = self.done = self.received = False
        self.status = 0
        self.has_length = False
        self._sink = None
        self.resume()  # the response ended during a pause for the sink

    # -- internals
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    async def _wait(self, timeout: float) -> None:
        """Until _wake(), or UpstreamTimeout after `timeout` without a read.

        The connection's one timer is not set per wait (nor per read): it stays armed and,
        when it fires, re-arms itself for the current wait's deadline, or lapses if nothing
        waits. With timeouts of minutes, a request or a chunk costs no timer (~2.5 µs each
        for call_later + cancel, and a heap of cancelled timers)."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self._timeout = timeout
        self._since = loop.time()
        deadline = self._since + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:  # none, or set for a later deadline
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._check_idle)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_idle(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        remaining = self._since + self._timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check_idle)
        else:
            waiter.set_exception(UpstreamTimeout("timed out"))


class Pool:
    """Keep-alive connections to one origin (most recently used first), TLS if `tls` is set."""

    def __init__(self, host: str, port: int, connect_timeout: float, *, tls: ssl.SSLContext | None = None, max_idle: int = MAX_IDLE) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.tls = tls
        self.max_idle = max_idle
        # The Host header and the blank line that end every request head sent here.
        self.host_header = f"host: {f'[{host}]' if ':' in host else host}:{port}\r\n\r\n".encode()
        self._idle: list[Connection] = []

    def _fresh(self) -> Connection | None:
        """An idle connection that is still fresh, if any (the stale ones are closed)."""
        idle = self._idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < _IDLE_SECONDS:
                    conn.reused = True
                    return conn
                conn.abort()
        return None

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: Connection(self), self.host, self.port, ssl=self.tls), self.connect_timeout)
        except TimeoutError:
            raise ConnectFailed(f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                raise OutOfDescriptors("out of file descriptors") from None
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return conn

    async def open(self, request: bytes, timeout: float) -> Connection:
        """Send `request` and wait for the response head (`timeout`); the connection is
        aborted if that fails. A kept-alive connection the server had closed before reading
        anything is retried once on a fresh one: nothing was processed."""
        conn = self._fresh() or await self.connect()
        try:
            conn.send(request)
            try:
                await conn.read_head(timeout)
            except UpstreamClosed:
                if not (conn.reused and not conn.received):
                    raise
                conn.abort()
                conn = await self.connect()
                conn.send(request)
                await conn.read_head(timeout)
        except BaseException:
            conn.abort()
            raise
        return conn

    def put(self, conn: Connection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.reset()
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: Connection) -> None:
        """A connection closed; if it was idle, it must not be handed out again."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


class Client:
    """Requests to one base URL (http or https, its path a prefix of every request path)
    over at most `limit` keep-alive connections; `timeout` bounds the connect and each wait
    for a read (never a whole response)."""

    def __init__(self, base_url: str, limit: int, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.pool = Pool(parts.hostname, parts.port or (443 if tls else 80), timeout, tls=tls, max_idle=limit)
        self.host = parts.netloc.rpartition("@")[2]  # as the URL gave it, without credentials
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._slots = asyncio.Semaphore(limit)

    def build(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """Encode a POST once, so sending it costs nothing per request."""
        lines = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, request: bytes, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        """Send a built request; 2xx body bytes go to `sink` as they arrive.
        Returns (status, the first 64 KiB of a non-2xx body); UpstreamError if the exchange failed."""
        async with self._slots:
            conn = await self.pool.open(request, self.timeout)
            try:
                status = conn.status
                error = bytearray()
                if not 200 <= status < 300:

                    def sink(data: bytes) -> None:
                        error.extend(data[: _MAX_ERROR_BODY - len(error)])

                if data := conn.relay(sink):
                    sink(data)
                await conn.relayed(self.timeout)  # never paused: sinks here do not pause
            except BaseException:
                conn.abort()
                raise
            conn.finish()
            return status, bytes(error)

    async def close(self) -> None:
        self.pool.close()
