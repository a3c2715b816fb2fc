"""kvctl.bench_http.Pool against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio

from kvctl.bench_http import Pool

_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_pool_reuses_a_keep_alive_connection() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.readuntil(b"\r\n\r\n"):
            await reader.readexactly(2)  # the body: b"{}"
            writer.write(_RESPONSE)
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(f"http://127.0.0.1:{port}", 1, timeout=10)
    request = pool.build("/v1/completions", b"{}", {"Content-Type": "application/json"})
    try:
        received: list[bytes] = []
        for _ in range(5):
            status, _ = await pool.send(request, received.append)
            assert status == 200
        assert received == [b"{}"] * 5
        assert connections == 1  # one connection carried all five requests
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
