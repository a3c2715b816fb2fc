"""The router under faults: engines killed mid-stream, clients that leave, replicas that die and return."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest

from helpers import (
    BROKEN_ENGINE,
    Procs,
    cut,
    free_port,
    open_stream,
    router_process,
    sim_instance,
    sim_state,
    start_engine,
    start_router,
    wait_awake,
    wait_for,
    write_config,
)


def test_engine_killed_mid_stream_ends_the_stream_with_an_error_event(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m", name="m", tokens_per_second=20)])
    engine = start_engine(procs, config.instances[0])
    base = start_router(procs, config)
    lines: list[str] = []
    body = {"model": "org/m", "prompt": "hello", "max_tokens": 1000, "stream": True}
    # The read timeout bounds the wait: a hang fails the test instead of passing slowly.
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=10) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                os.killpg(engine.pid, signal.SIGKILL)
    assert lines[0].startswith("data: {") and "[DONE]" not in "".join(lines)
    last = json.loads(lines[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "code"} and last["error"]["code"] == "engine_disconnected"
    assert httpx.get(base + "/health").status_code == 200
    stats = httpx.get(base + "/traffic/stats/org/m").json()["model_stats"]
    assert stats["failed_requests"] == 1


def test_client_disconnect_aborts_the_upstream_request(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("m", name="m", tokens_per_second=50), sim_instance("slow", name="slow", ttft_ms=30000)])
    fast, slow = config.instances
    start_engine(procs, fast)
    start_engine(procs, slow)
    base = start_router(procs, config)
    # A stream: the client reads a little, then leaves.
    sock = open_stream(config.router.port, "m")
    wait_for(lambda: sim_state(fast)["in_flight"] == 1, what="the stream reached the engine")
    cut(sock, rst=False)
    wait_for(lambda: sim_state(fast)["aborted"] == 1 and sim_state(fast)["in_flight"] == 0, what="the engine saw the abort")
    # A non-streamed request the client gives up on before the answer.
    try:
        httpx.post(base + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 5}, timeout=httpx.Timeout(10, read=0.5))
        raise AssertionError("the slow engine answered early")
    except httpx.ReadTimeout:
        pass
    wait_for(lambda: sim_state(slow)["aborted"] == 1 and sim_state(slow)["in_flight"] == 0, what="the engine saw the abort")
    wait_for(lambda: httpx.get(base + "/traffic/stats").json()["traffic_stats"]["slow"]["in_flight"] == 0, what="router in-flight back to 0")


# The router runs on uvloop when its descriptor limit covers max_connections, else on asyncio.
@pytest.mark.parametrize(("loop", "max_connections"), [("uvloop", 64), ("asyncio", 1 << 30)])
def test_streams_cut_mid_flight_do_not_hurt_the_router(tmp_path: Path, procs: Procs, loop: str, max_connections: int) -> None:
    config = write_config(tmp_path, [sim_instance("m", name="m", tokens_per_second=200)], router={"max_connections": max_connections})
    inst = config.instances[0]
    start_engine(procs, inst)
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        router_process(procs, config, stderr=out)
    assert f"event loop: {loop}" in log.read_text()
    base = config.router.url
    wait_awake(config)
    for _ in range(3):
        socks = [open_stream(config.router.port, "m") for _ in range(10)]
        for i, sock in enumerate(socks):
            cut(sock, rst=bool(i % 2))
    wait_for(lambda: sim_state(inst)["aborted"] == 30 and sim_state(inst)["in_flight"] == 0, what="30 aborts at the engine")
    assert httpx.get(base + "/health").status_code == 200
    wait_for(lambda: httpx.get(base + "/traffic/stats").json()["traffic_stats"]["m"]["in_flight"] == 0, what="router in-flight back to 0")
    ok = httpx.post(base + "/v1/completions", json={"model": "m", "prompt": "after", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def _streams(base: str, model: str, count: int, max_tokens: int) -> list[int]:
    statuses: list[int] = []

    def one() -> None:
        with httpx.stream("POST", base + "/v1/completions", json={"model": model, "prompt": "p", "max_tokens": max_tokens, "stream": True}, timeout=30) as s:
            s.read()
            statuses.append(s.status_code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_replicas_share_load_and_a_dead_one_is_skipped_then_used_again(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("rep", name="r1", tokens_per_second=25), sim_instance("rep", name="r2", tokens_per_second=25)])
    r1, r2 = config.instances
    start_engine(procs, r1)
    p2 = start_engine(procs, r2)
    base = start_router(procs, config)

    # Six concurrent streams split 3/3 by fewest in-flight.
    assert _streams(base, "rep", 6, 25) == [200] * 6
    assert sim_state(r1)["max_in_flight"] == 3 and sim_state(r2)["max_in_flight"] == 3

    # r2 dies: every request still succeeds (a refused connection is retried on r1).
    os.killpg(p2.pid, signal.SIGKILL)
    p2.wait()
    served = sim_state(r1)["requests_served"]
    for _ in range(6):
        response = httpx.post(base + "/v1/completions", json={"model": "rep", "prompt": "x", "max_tokens": 1}, timeout=30)
        assert response.status_code == 200
    assert sim_state(r1)["requests_served"] == served + 6
    wait_for(lambda: not next(i for i in httpx.get(base + "/health/all").json()["instances"] if i["name"] == "r2")["healthy"], what="r2 unhealthy")

    # r2 returns: the health probe brings it back and it gets traffic again.
    start_engine(procs, r2)
    wait_for(lambda: next(i for i in httpx.get(base + "/health/all").json()["instances"] if i["name"] == "r2")["state"] == "awake", what="r2 awake again")
    assert _streams(base, "rep", 4, 25) == [200] * 4
    assert sim_state(r2)["requests_served"] >= 1


def test_a_long_fast_stream_reaches_a_small_window_whole_and_well_framed(tmp_path: Path, procs: Procs) -> None:
    """The router frames each read from the engine as one chunk of its own answer; through a
    client's small TCP window (writes taken in pieces) every event arrives, in order, in
    valid chunked framing, and the stream ends with [DONE] and the last chunk."""
    config = write_config(tmp_path, [sim_instance("m", name="m")])  # unpaced: as fast as the engine can
    inst = config.instances[0]
    start_engine(procs, inst)
    start_router(procs, config)
    tokens = 8000  # the sim's context is 8192
    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": tokens, "stream": True}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.settimeout(30)
        sock.connect(("127.0.0.1", config.router.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(1024)
            assert chunk, "the router closed the stream early"
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    events = [line for line in _dechunk(payload).split(b"\n\n") if line]
    assert len(events) == tokens + 1 and events[-1] == b"data: [DONE]"
    assert all(json.loads(event.removeprefix(b"data: "))["choices"][0]["index"] == 0 for event in events[:-1])
    assert sim_state(inst)["aborted"] == 0


def _dechunk(payload: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        payload = rest[size + 2 :]


async def test_relay_pauses_reading_from_the_engine_until_resumed() -> None:
    """upstream.Connection's backpressure, against a real socket: a sink that cannot keep up
    pauses reading from the engine (relayed() returns False), resume() reads on, and every
    byte arrives once, in order."""
    import asyncio

    from kvctl.http1 import Pool

    pieces = [b"%d" % i * 1000 for i in range(5)]
    relaying = asyncio.Event()
    taken = asyncio.Event()

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await relaying.wait()
        for piece in pieces:  # one read each: the next is written once the sink took this one
            taken.clear()
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await taken.wait()
        writer.write(b"0\r\n\r\n")
        await reader.read()  # until the router closes

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    pool = Pool("127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout=5)
    try:
        conn = await pool.connect()
        conn.send(b"POST /v1/completions HTTP/1.1\r\n" + pool.host_header)
        await conn.read_head(10)
        got: list[bytes] = []

        def sink(data: bytes) -> None:
            got.append(data)
            conn.pause()  # as the proxy does when the client's transport is full
            taken.set()

        got.append(conn.relay(sink))
        relaying.set()
        pauses = 0
        while not await conn.relayed(10):
            pauses += 1
            assert not conn._transport.is_reading()  # type: ignore[union-attr]
            conn.resume()
        assert pauses == len(pieces) and b"".join(got) == b"".join(pieces)
        conn.abort()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


def test_a_non_streamed_answer_cut_mid_body_closes_and_counts_as_failed(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    config = write_config(tmp_path, [{"model": "cut", "name": "cut", "engine": "sim", "port": port, "external": True}])
    procs.start([sys.executable, "-c", BROKEN_ENGINE, str(port), "cut"])  # "cut": a head, part of the body, then close
    base = start_router(procs, config)
    with pytest.raises(httpx.RemoteProtocolError):  # never a short body that looks complete
        httpx.post(base + "/v1/completions", json={"model": "cut", "prompt": "x"}, timeout=10)
    wait_for(lambda: httpx.get(base + "/traffic/stats/cut").json()["model_stats"]["lifetime_failed_requests"] == 1, what="the cut answer counted as failed")
    assert 'kvctl_errors_total{model="cut",reason="engine_closed"} 1.0' in httpx.get(base + "/metrics").text
