"""uvicorn's httptools protocol with the client limits of SPEC §16.

uvicorn bounds neither the size of a request head nor the time a client takes to send it
or its body: a header that never ends grew the router by 100 MB, and slowloris clients
held connections forever. This subclass adds, per connection:

* `max_header_bytes` for the request line and headers (431), and at most `MAX_HEADERS`
  header lines (431); bytes of a head that has not ended count too, so an unterminated
  header is cut after about `max_header_bytes` (plus one read);
* `header_timeout_seconds` from the connection's start, or a request's first byte, to the
  end of its headers (408, or a plain close if nothing arrived);
* `body_timeout_seconds` without a byte of a request body still expected (408);
* `keepalive_timeout_seconds` for an idle connection between requests (uvicorn's timer);
* `max_connections`: a connection beyond it gets 503 `router_overloaded` with Retry-After.

None of them runs while a response is being sent: a long stream and a slow engine's first
token keep only the proxy's own timeouts. The hot path stays cheap: a request whose head
and body arrive in one read arms no timer at all, and the keep-alive timer is armed once
per idle period and re-armed lazily, not per request (~2.5 µs). Refusals are OpenAI-shaped
JSON; the connection then closes after a short linger that discards what the client still
sends, so that the client reads the answer rather than a reset.

The data plane (POST to the three proxied routes) does not go through ASGI: the parsed
request goes to the proxy as an `Exchange` (see proxy.py). Every other route is uvicorn's
ASGI cycle and Starlette.

HTTP/1.0 clients get responses without a length as a body that ends when the connection
closes (uvicorn would send chunked encoding, which HTTP/1.0 does not have).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from kvctl.config import RouterConfig
from kvctl.router import overload
from kvctl.router.errors import error_bytes
from kvctl.router.proxy import PROXIED_PATHS, Exchange, Proxy

MAX_HEADERS = 100
# After a refusal, what the client still sends is read and dropped for this long (or until
# it closes): closing with unread data would reset the connection and lose the answer.
_LINGER_SECONDS = 2.0


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that was refused."""


def proxied_target(url: bytes) -> bytes | None:
    """The path and query to forward when `url` names a proxied route, else None."""
    if url in _PROXIED_URLS:
        return url  # the usual case: no query, nothing escaped
    try:
        parsed = httptools.parse_url(url)
        path = urllib.parse.unquote(parsed.path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None  # uvicorn's parsing of the same URL answers it
    if path not in PROXIED_PATHS:
        return None
    return path.encode() + (b"?" + parsed.query if parsed.query else b"")


_PROXIED_URLS = frozenset(path.encode() for path in PROXIED_PATHS)


class LimitedProtocol(HttpToolsProtocol):
    router_config: Callable[[], RouterConfig]  # set on the subclass protocol_for() makes
    proxy: Proxy  # likewise: serves the data plane

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = self.router_config()  # its limits, fixed for the connection's life
        self.timeout_keep_alive = self.limits.keepalive_timeout_seconds  # type: ignore[assignment]  # uvicorn says int; a float works
        self._in_head = True  # between a request's first byte (or the connection's start) and its headers' end
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._head_size = 0  # request target and header lines parsed so far
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # headers done, body not complete
        self._body_seen = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._overloaded = False
        self._refused = False
        self._idle_since: float | None = None  # an idle keep-alive connection: since when

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._overloaded = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, Exchange) and not cycle.response_complete:
            cycle.client_left()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered; dropping what still arrives until the connection closes
        if self._in_head:
            self._head_bytes += len(data)
        self._idle_since = None  # in use (see _keepalive_check)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the router speaks plain HTTP/1.1: an Upgrade request is answered as one
        except httptools.HttpParserError:
            if not self._refused:  # else a limit stopped the parser and has answered
                self._refuse(400, "invalid_http", "The request is not valid HTTP/1.1.")
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._too_large()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_expired)
        elif self._body_pending and self._body_timer is None:
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds, self._body_expired)

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        # uvicorn's, without the ASGI scope (a dict of ten items and a copy of the app state
        # per request, ~1 µs): _asgi_scope() makes it for the requests that go to ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._in_head = True
        self._head_size = 0

    def _asgi_scope(self) -> None:
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # uvicorn's scope, with what the parser gave since
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    # on_url and on_header are uvicorn's, inlined (a super() call per header is measurable),
    # plus the size count; the limits are checked once the head is complete, and while it is
    # not, on the bytes received (data_received).
    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_size > self.limits.max_header_bytes or len(self.headers) > MAX_HEADERS:
            self._too_large()
            raise _Refused
        if self._overloaded:
            self._refuse(
                503,
                "router_overloaded",
                overload.message(f"max_connections {self.limits.max_connections}"),
                (overload.RETRY_AFTER,),
            )
            raise _Refused
        self._body_pending = True
        parser = self.parser
        target = proxied_target(self.url) if parser.get_method() == b"POST" else None
        if target is not None:
            self._exchange(target)
            return
        self._asgi_scope()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and self.scope["http_version"] == "1.0":  # created just now: its task has not run yet
            cycle.__class__ = _UntilCloseCycle

    def _exchange(self, target: bytes) -> None:
        """A data-plane request: to the proxy, with none of uvicorn's ASGI machinery."""
        parser = self.parser
        ex = Exchange(
            self.transport,
            self.flow,
            self.headers,
            target,
            parser.get_http_version() != "1.0" and parser.should_keep_alive(),
            self.expect_100_continue,
            self.proxy.max_body,
            self.on_response_complete,
        )
        current = self.cycle
        self.cycle = ex  # type: ignore[assignment]  # an Exchange has the attributes uvicorn's protocol uses of a cycle
        if current is None or current.response_complete:
            self._serve(ex)
        else:  # pipelined: it waits for the answer before it, as uvicorn's cycles do
            self.flow.pause_reading()
            self.pipeline.appendleft((ex, self.app))  # type: ignore[arg-type]

    def _serve(self, ex: Exchange) -> None:
        task = ex.task = self.loop.create_task(self.proxy.serve(ex))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # the server's shutdown waits for (or cuts) the task

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:  # the next pipelined request
        if isinstance(cycle, Exchange):
            self._serve(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if self._body_timer is not None:  # only a body spread over reads is timed
            self._body_seen = self.loop.time()
        cycle = self.cycle
        if isinstance(cycle, Exchange):
            cycle.add_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_pending = False
        cycle = self.cycle
        if isinstance(cycle, Exchange):
            cycle.end_body()
        else:
            super().on_message_complete()

    # ---------------------------------------------------------------- keep-alive
    # uvicorn arms a timer after each response and cancels it on the next request (~2.5 µs a
    # request). Here one timer stays armed while the connection is in use, and when it fires
    # it closes an idle connection or re-arms itself for the rest of the idle period.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(self._idle_since + self.timeout_keep_alive, self._keepalive_check)

    def _keepalive_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None or self.transport.is_closing():
            return  # in use (or closing): no timer until it is idle again
        remaining = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self._keepalive_check)
        else:
            self.transport.close()

    # ---------------------------------------------------------------- limits
    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head during a response: it is judged once the response is done.
            self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_expired)
            return
        if self._head_bytes == 0:
            self.transport.close()  # a connection that never sent a byte gets no answer
            return
        self._refuse(408, "request_timeout", f"The request line and headers did not arrive within {self.limits.header_timeout_seconds:g}s.")

    def _body_expired(self) -> None:
        self._body_timer = None
        if not self._body_pending or self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # answered already (say 401) without reading the body: no second answer
            return
        idle = self.loop.time() - self._body_seen
        if idle < self.limits.body_timeout_seconds:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds - idle, self._body_expired)
            return
        self._refuse(408, "request_timeout", f"The request body stalled: no byte for {self.limits.body_timeout_seconds:g}s.")

    def _too_large(self) -> None:
        self._refuse(
            431,
            "request_headers_too_large",
            f"The request line and headers exceed the router's limit of {self.limits.max_header_bytes} bytes or {MAX_HEADERS} header lines.",
        )

    def _refuse(self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer `status` with an OpenAI-shaped error and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._in_head = self._body_pending = False
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            started = cycle.response_started
            cycle.disconnected = True  # the app's receive() now returns http.disconnect; its send() does nothing
            cycle.message_event.set()
            if started:
                self.transport.close()  # mid-response there is nothing left to say
                return
        self.transport.write(error_bytes(status, message, code, headers=headers, close=True))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)

    def _cancel_timers(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


class _UntilCloseCycle(RequestResponseCycle):
    """A response to an HTTP/1.0 request: without a declared length its body simply ends
    when the connection closes (HTTP/1.0 has no chunked encoding)."""

    _until_close = False

    async def send(self, message: Any) -> None:
        if not self.response_started and message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", ())}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                self._until_close = True
                self.chunked_encoding = False
        elif self._until_close and message["type"] == "http.response.body":
            self.expected_content_length = len(message.get("body", b""))  # no declared length to count down
        await super().send(message)


def protocol_for(router_config: Callable[[], RouterConfig], proxy: Proxy) -> type[LimitedProtocol]:
    """The protocol class uvicorn instantiates per connection, its data plane served by
    `proxy`. Its limits are those of the router config `router_config()` returns when the
    connection starts: a reload applies to new connections."""
    return type("LimitedProtocol", (LimitedProtocol,), {"router_config": staticmethod(router_config), "proxy": proxy})
