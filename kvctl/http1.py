"""A lean HTTP/1.1 client for the proxy's hot path: asyncio Protocols + httptools.

Why not httpx or aiohttp: measured per request on the router's hot path, httpx costs
~3 ms of CPU and aiohttp ~0.5 ms; this client is a few tens of µs (see benchmarks/).
It does exactly what the proxy needs and nothing else: one request at a time per
connection, a keep-alive pool per engine instance, the response head parsed by
httptools; then the body is pushed to a sink as each read arrives (`relay`), from the
protocol callback itself: no task wakes up per chunk. Backpressure: the sink pauses
reading from the engine while the client is not taking what was written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

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
        self._sink: Callable[[bytes], None] | None = None  # where body bytes go once relayed
        self._held = False  # reading paused until the client takes what was relayed
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
            self._fail(UpstreamClosed(f"malformed response from the engine: {exc}"))
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

    def relay(self, sink: Callable[[bytes], None]) -> bytes:
        """Body bytes from now on go to `sink`, one call per read from the engine.
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
        UpstreamTimeout when no byte came for `timeout` (the client's slowness does not count)."""
        while not self.done:
            if self._error is not None:
                raise self._error
            if self._held:
                return False
            await self._wait(timeout)
        return True

    def pause(self) -> None:
        """Stop reading from the engine until resume(): the client is not keeping up."""
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
        self.has_length = False
        self._sink = None
        self.resume()  # the response ended during a pause for the client

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
            _, conn = await asyncio.wait_for(self.loop.create_connection(lambda: Connection(self), self.host, self.port), self.connect_timeout)
        except TimeoutError:
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
