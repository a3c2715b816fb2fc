"""A lean HTTP/1.1 client for the proxy's hot path: asyncio Protocols + httptools.

Why not httpx or aiohttp: measured per request on the router's hot path, httpx costs
~3 ms of CPU and aiohttp ~0.5 ms; this client is a few tens of µs (see benchmarks/).
It does exactly what the proxy needs and nothing else: one request at a time per
connection, a keep-alive pool per engine instance, the response head parsed by
httptools and the body handed over chunk by chunk as it arrives, with backpressure
(reading from the engine pauses while the client has not taken what was read).
"""

from __future__ import annotations

import asyncio
import time

import httptools

from kvctl.router.overload import EXHAUSTED, fd_exhausted

# Engines are uvicorn servers that drop idle keep-alive connections after 5 s; we retire ours
# earlier so that a request is never written to a connection the engine is closing.
_IDLE_SECONDS = 4.0
_MAX_IDLE_PER_POOL = 256
# Stop reading from the engine once this much is buffered and not yet relayed to the client.
_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The engine could not be used; `reason` is a short machine-readable cause."""

    reason = "upstream_error"


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, timed out): nothing was sent."""

    reason = "connect_failed"


class RouterOverloaded(UpstreamError):
    """The router itself is out of file descriptors: not the engine's fault."""

    reason = "router_overloaded"


class UpstreamClosed(UpstreamError):
    """The engine closed the connection or sent a malformed response."""

    reason = "engine_closed"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"


class Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._until_close = False  # body delimited by connection close (no length, not chunked)
        self.reused = False
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"malformed response from the engine: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        if self.head_done and not self.done and self._until_close:
            self.on_message_complete()
        elif not self.done:
            self._fail(UpstreamClosed("the engine closed the connection" + (f" ({exc})" if exc else "")))
        self._transport = None

    def pause_writing(self) -> None:  # requests are small; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in self.headers}
        self._until_close = b"content-length" not in names and b"transfer-encoding" not in names and self.status not in (204, 304)
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # -- used by the proxy
    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def read_head(self, timeout: float) -> None:
        """Wait for the status line and headers (504-worthy if `timeout` passes first)."""
        while not self.head_done:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    async def read(self, timeout: float) -> bytes:
        """Body bytes received so far (waiting up to `timeout` for some); b"" at the end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                if self._paused and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return data
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    @property
    def complete(self) -> bool:
        """The whole response was received and handed over."""
        return self.done and not self._chunks

    def abort(self) -> None:
        """Drop the connection at once (the engine sees the disconnect and aborts)."""
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
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("timed out"))


class Pool:
    """Keep-alive connections to one engine instance (most recently used first)."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        # The Host header and the blank line that end every request head sent to this engine.
        self.host_header = f"host: {f'[{host}]' if ':' in host else host}:{port}\r\n\r\n".encode()
        self.loop = asyncio.get_running_loop()
        self._idle: list[Connection] = []

    async def get(self) -> Connection:
        """An idle connection if one is fresh, else a new one (ConnectFailed if impossible)."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < _IDLE_SECONDS:
                conn.reused = True
                return conn
            conn.abort()
        return await self.connect()

    async def connect(self) -> Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self), self.host, self.port), self.connect_timeout
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                fd_exhausted.note("connecting to an engine")
                raise RouterOverloaded("out of file descriptors") from None
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return conn

    def put(self, conn: Connection) -> None:
        if len(self._idle) >= _MAX_IDLE_PER_POOL:
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
