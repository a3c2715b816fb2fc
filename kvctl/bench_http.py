"""A minimal pooled HTTP/1.1 keep-alive client: the load generator's transport.

Why not httpx: on this machine httpx.AsyncClient spends ~1.1 ms of CPU per streamed
request, as much as the engine under test, so it would be the bottleneck. This client
(asyncio streams + httptools' C parser) spends ~0.1-0.2 ms; see
benchmarks/bench_client_ceiling.py. It does only what bench needs: POST a prebuilt
request, hand 2xx body bytes to a callback as they arrive, keep connections alive.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

_READ_SIZE = 65536
_MAX_ERROR_BODY = 64 * 1024  # an error body is only read for its message


class HttpError(Exception):
    """The exchange failed below HTTP: connect error, reset, bad response, timeout."""


class _Closed(HttpError):
    def __init__(self, received: bool) -> None:
        self.received = received
        super().__init__("connection closed by the server" + (" mid-response" if received else ""))


class _Exchange:
    """httptools callbacks for one response."""

    __slots__ = ("_sink", "complete", "error_body", "keep_alive", "parser", "received", "status")

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.received = False
        self.error_body = bytearray()
        self._sink = sink

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read here: once the message is complete the parser has reset and says "no keep-alive".
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        if 200 <= self.status < 300:
            self._sink(data)
        elif len(self.error_body) < _MAX_ERROR_BODY:
            self.error_body += data[: _MAX_ERROR_BODY - len(self.error_body)]

    def on_message_complete(self) -> None:
        self.complete = True


class Pool:
    """At most `limit` keep-alive connections to one origin, reused across requests."""

    def __init__(self, base_url: str, limit: int, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.host_header = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def build(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """Encode a POST once, so sending it costs nothing per request."""
        lines = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, request: bytes, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        """Send a built request; 2xx body bytes go to `sink` as they arrive. Returns (status, error body)."""
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                exchange = _Exchange(sink)
                try:
                    keep_alive = await self._exchange(conn, request, exchange)
                except _Closed as exc:
                    conn[1].close()
                    # A reused connection the server had already closed: nothing was processed, retry once.
                    if reused and not exc.received and attempt == 0:
                        continue
                    raise
                except BaseException:
                    conn[1].close()
                    raise
                if keep_alive:
                    self._idle.append(conn)
                else:
                    conn[1].close()
                return exchange.status, bytes(exchange.error_body)
        raise AssertionError("unreachable")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        except (OSError, TimeoutError) as exc:
            raise HttpError(f"cannot connect to {self._host}:{self._port}: {exc or type(exc).__name__}") from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes, exchange: _Exchange) -> bool:
        reader, writer = conn
        loop = asyncio.get_running_loop()
        try:
            # The timeout is between reads (first byte, then each chunk), never a total one.
            async with asyncio.timeout(self._timeout) as idle:
                writer.write(request)
                while not exchange.complete:
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        raise _Closed(exchange.received)
                    exchange.received = True
                    exchange.parser.feed_data(data)
                    idle.reschedule(loop.time() + self._timeout)
        except TimeoutError:
            raise HttpError(f"no data for {self._timeout:g}s") from None
        except httptools.HttpParserError as exc:
            raise HttpError(f"bad HTTP response: {exc}") from None
        except OSError as exc:
            raise HttpError(f"connection error: {exc or type(exc).__name__}") from None
        return exchange.keep_alive

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
