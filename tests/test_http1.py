"""kvctl.http1.Client (the one HTTP/1.1 client: bench's and the router's) against real servers on 127.0.0.1.

The router's own use of it (Pool, Connection, relay with backpressure) is covered end to end
by test_router_proxy.py and test_router_faults.py."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from kvctl.http1 import Client, ConnectFailed, UpstreamClosed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head (its body, Content-Length bytes, is read and dropped); b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on 127.0.0.1: (its port, one entry per connection accepted)."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await read_request(reader):
        writer.write(OK)
        await writer.drain()


async def post(client: Client) -> tuple[int, bytes]:
    """One request: (status, the body whatever the status)."""
    received: list[bytes] = []
    status, error_body = await client.send(client.build("/v1/completions", b"{}", {}), received.append)
    return status, b"".join(received) or error_body


async def test_a_keep_alive_connection_carries_every_request() -> None:
    async with serving(answer_ok) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 1, timeout=10)
        request = client.build("/v1/completions", b"{}", {"Content-Type": "application/json"})
        received: list[bytes] = []
        for _ in range(5):
            assert (await client.send(request, received.append))[0] == 200
        await client.close()
    assert received == [b"{}"] * 5
    assert len(accepted) == 1


async def test_a_reused_connection_closed_before_answering_is_retried_once_on_a_fresh_one() -> None:
    async def first_answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(accepted) == 1:  # the first connection: one answer, then the next request is dropped unanswered
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            await read_request(reader)
            return
        await answer_ok(reader, writer)

    async with serving(first_answers_once) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 1, timeout=10)
        request = client.build("/v1/completions", b"{}", {})
        assert await client.send(request, lambda data: None) == (200, b"")
        assert await client.send(request, lambda data: None) == (200, b"")
        await client.close()
    assert len(accepted) == 2


async def test_a_fresh_connection_closed_before_answering_fails_without_retry() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(drop) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 1, timeout=10)
        with pytest.raises(UpstreamClosed, match="closed the connection"):
            await post(client)
        await client.close()
    assert len(accepted) == 1


async def test_a_body_that_ends_at_connection_close_is_complete() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst ")
        await writer.drain()
        writer.write(b"second")

    async with serving(until_close) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 1, timeout=10)
        assert await post(client) == (200, b"first second")
        assert await post(client) == (200, b"first second")
        await client.close()
    assert len(accepted) == 2  # such a connection is not reused


async def test_a_chunked_body_arrives_whole_and_the_connection_is_reused() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    async with serving(chunked) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 1, timeout=10)
        for _ in range(2):
            received: list[bytes] = []
            assert await client.send(client.build("/v1/completions", b"{}", {}), received.append) == (200, b"")
            assert b"".join(received) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        await client.close()
    assert len(accepted) == 1


async def test_at_most_limit_connections_are_opened() -> None:
    async with serving(answer_ok) as (port, accepted):
        client = Client(f"http://127.0.0.1:{port}", 2, timeout=10)
        request = client.build("/v1/completions", b"{}", {})
        results = await asyncio.gather(*(client.send(request, lambda data: None) for _ in range(12)))
        await client.close()
    assert results == [(200, b"")] * 12
    assert len(accepted) == 2  # the first two requests each opened one; the rest reused them


async def test_the_base_url_path_prefixes_every_request_and_error_bodies_are_returned() -> None:
    heads: list[bytes] = []

    async def route(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await read_request(reader):
            heads.append(head)
            if head.startswith(b"POST /api/v1/completions "):
                writer.write(OK)
            else:
                writer.write(b'HTTP/1.1 404 Not Found\r\ncontent-length: 13\r\n\r\n{"error": {}}')
            await writer.drain()

    async with serving(route) as (port, _):
        for base, answer in ((f"http://127.0.0.1:{port}/api/", (200, b"{}")), (f"http://127.0.0.1:{port}", (404, b'{"error": {}}'))):
            client = Client(base, 1, timeout=10)
            assert await post(client) == answer
            await client.close()
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in heads[0]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    key_type = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", "-x509", *key_type, *subject, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def _server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


async def test_https_urls_use_tls_and_verify_the_certificate(self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed
    async with serving(answer_ok, tls=_server_tls(cert, key)) as (port, accepted):
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):  # not in the system's trust store
            await post(Client(f"https://127.0.0.1:{port}", 1, timeout=10))  # no connection to close: it failed
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what a user does to trust a private CA
        client = Client(f"https://127.0.0.1:{port}", 1, timeout=10)
        request = client.build("/v1/completions", b"{}", {})
        received: list[bytes] = []
        for _ in range(3):
            assert await client.send(request, received.append) == (200, b"")
        await client.close()
    assert received == [b"{}"] * 3
    assert len(accepted) == 1  # one kept-alive connection (the refused handshake never reached the handler)
