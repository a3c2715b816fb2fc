"""Client limits (SPEC §16): abusive clients are cut with clear answers, bounded memory, and
without touching legitimate streams; the router's own exhaustion is its overload, not the engine's.

Abusive clients are raw sockets; legitimate ones use the openai client. The router runs as
`python -m kvctl router` on sim engines.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from kvctl.config import Config

from helpers import Procs, router_process, sim_instance, sim_state, start_engines, wait_awake, wait_for, write_config


@dataclass
class Router:
    config: Config
    proc: subprocess.Popen

    @property
    def port(self) -> int:
        return self.config.router.port

    @property
    def base(self) -> str:
        return self.config.router.url

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=30)


def run_router(procs: Procs, config: Config, **popen: object) -> Router:
    proc = router_process(procs, config, **popen)
    wait_awake(config)
    return Router(config, proc)


# A slow engine: its first token takes longer than every client limit below, and a stream
# of STREAM_TOKENS lasts several times longer still.
SLOW = {"ttft_ms": 1500, "tokens_per_second": 5}
STREAM_TOKENS = 8
LIMITS = {"header_timeout_seconds": 1, "body_timeout_seconds": 1, "keepalive_timeout_seconds": 0.5}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    with Procs() as procs:
        config = write_config(tmp_path_factory.mktemp("limits"), [sim_instance("org/slow", **SLOW)], router=LIMITS)
        start_engines(procs, config)
        yield run_router(procs, config)


def exchange(port: int, payload: bytes, chunk: int = 256 * 1024) -> bytes:
    """Send `payload` (as much as the router takes) and return what it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            for i in range(0, len(payload), chunk):
                sock.sendall(payload[i : i + chunk])
        except OSError:
            pass  # the router closed on us: its answer, if any, is still readable
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_head_and_body(sock: socket.socket) -> bytes:
    """One response: its head, and its body when it declares a length (a stream's is not read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    while length and len(body) < length[0] and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def stream_text(router: Router, tokens: int = STREAM_TOKENS) -> str:
    """A legitimate streamed completion through the openai client; the text it got."""
    stream = router.client().completions.create(model="org/slow", prompt="hello", max_tokens=tokens, stream=True)
    return "".join(chunk.choices[0].text for chunk in stream)


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"


# ---------------------------------------------------------------------- header size and count


def test_an_unterminated_header_is_cut_and_memory_stays_bounded(router: Router) -> None:
    before = router.rss_mb()
    socks = []
    try:
        for _ in range(4):  # held open together: without a limit each would keep its 8 MB
            sock = socket.create_connection(("127.0.0.1", router.port), timeout=15)
            socks.append(sock)
            try:
                sock.sendall(HEAD + b"X-Big: " + b"a" * 8_000_000)
            except OSError:
                pass
        grown = router.rss_mb() - before
        answers = [read_all(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert grown < 10, f"router RSS grew {grown:.1f} MB for 4 unterminated 8 MB headers"
    assert any(answers)
    for answer in filter(None, answers):  # an answer, when the client got it before the close, says why
        status, error = error_of(answer)
        assert status == 431 and error["code"] == "request_headers_too_large"
    assert httpx.get(router.base + "/health").status_code == 200


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(HEAD + b"X-Big: " + b"a" * 8_000_000 + b"\r\n\r\n", id="8MB-header"),
        pytest.param(HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n", id="10k-headers"),
        pytest.param(HEAD + b"Authorization: Bearer " + b"k" * 1_000_000 + b"\r\n\r\n", id="1MB-authorization"),
        pytest.param(b"POST /v1/completions?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="200kB-url"),
    ],
)
def test_an_oversized_head_gets_431(router: Router, head: bytes) -> None:
    status, error = error_of(exchange(router.port, head))
    assert status == 431
    assert error["code"] == "request_headers_too_large" and error["type"] == "invalid_request_error"
    assert httpx.get(router.base + "/health").status_code == 200


def test_a_head_within_the_limits_is_served(router: Router) -> None:
    headers = {f"x-extra-{i}": "v" * 500 for i in range(90)}  # 90 headers, ~46 kB: under both limits
    response = httpx.get(router.base + "/health", headers=headers, timeout=10)
    assert response.status_code == 200


def test_malformed_http_gets_an_openai_shaped_400(router: Router) -> None:
    status, error = error_of(exchange(router.port, b"NOT HTTP AT ALL\x00\r\n\r\n"))
    assert status == 400 and error["code"] == "invalid_http"


# ---------------------------------------------------------------------- timeouts


def _drip(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """A slowloris: one byte every 0.1 s (the head never ends), until told to stop or cut off."""
    for i in range(len(data)):
        if stop.wait(0.1):
            return
        try:
            sock.send(data[i : i + 1])
        except OSError:
            return


def test_slowloris_headers_are_cut_at_the_header_timeout(router: Router) -> None:
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", router.port), timeout=15) as sock:
        sock.sendall(HEAD)
        dripper = threading.Thread(target=_drip, args=(sock, b"X-Slow: " + b"s" * 100_000, stop))
        dripper.start()
        try:
            answer = read_all(sock)  # returns when the router closes, long before the drip could end
        finally:
            stop.set()
            dripper.join()
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "request_timeout" and "headers" in error["message"]


def test_a_connection_that_sends_nothing_is_closed(router: Router) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=15) as sock:
        assert read_all(sock) == b""  # closed by the router (the socket timeout would raise)


def test_an_idle_keepalive_connection_is_closed(router: Router) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=15) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}")  # one answer, then the router closed


def test_a_stalled_body_gets_408_while_a_long_stream_completes(router: Router) -> None:
    with ThreadPoolExecutor(1) as pool:
        # Longer than every client limit: the first token alone outlasts them.
        legit = pool.submit(stream_text, router)
        stalled = exchange(router.port, HEAD + b'content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"model": ')
        status, error = error_of(stalled)
        assert status == 408 and error["code"] == "request_timeout" and "body" in error["message"]
        assert len(legit.result(timeout=30).split()) == STREAM_TOKENS


def test_a_slow_engine_keeps_a_keepalive_connection_through_the_openai_client(router: Router) -> None:
    client = router.client()
    # Two requests on one pooled connection, each slower than the header, body and keep-alive limits.
    for _ in range(2):
        answer = client.completions.create(model="org/slow", prompt="hi", max_tokens=2)
        assert len(answer.choices[0].text.split()) == 2


# ---------------------------------------------------------------------- connection cap


def test_connections_beyond_max_connections_get_503_while_the_others_proceed(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/slow", **SLOW)], router={"max_connections": 3})
    start_engines(procs, config)
    router = run_router(procs, config)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_text, router) for _ in range(3)]
        # Asked of the engine: a request to the router would be the refused fourth connection.
        wait_for(lambda: sim_state(config.instances[0])["in_flight"] == 3, what="3 streams in flight")
        answer = exchange(router.port, HEAD + b"content-length: 2\r\n\r\n{}")
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        status, error = error_of(answer)
        assert status == 503 and error["code"] == "router_overloaded" and error["type"] == "server_error"
        assert all(len(s.result(timeout=30).split()) == STREAM_TOKENS for s in streams)


# ---------------------------------------------------------------------- file descriptors


def _fd_limit(soft: int, hard: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def test_the_router_raises_its_fd_soft_limit_to_the_hard_limit(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m")])
    start_engines(procs, config)
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        router = run_router(procs, config, preexec_fn=_fd_limit(256, 4096), stderr=out)
    limits = Path(f"/proc/{router.proc.pid}/limits").read_text()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert (soft, hard) == ("4096", "4096")
    assert "file descriptor limit 4096: room for about" in log.read_text()


def _open_stream(port: int) -> socket.socket:
    body = b'{"model": "org/m", "prompt": "hello", "max_tokens": 1000, "stream": true}'
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(HEAD + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_running_out_of_file_descriptors_is_the_routers_overload_not_the_engines(tmp_path: Path, procs: Procs) -> None:
    # Probes are not what is tested: no probe runs while descriptors are short.
    config = write_config(tmp_path, [sim_instance("org/m", tokens_per_second=2)], router={"health_check_interval_seconds": 60})
    start_engines(procs, config)
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        router = run_router(procs, config, preexec_fn=_fd_limit(64, 64), stderr=out)  # the router cannot raise it
    assert "event loop: asyncio" in log.read_text()  # uvloop's libuv would reset the clients it cannot accept
    socks: list[socket.socket] = []
    try:
        # One at a time until the router has no descriptor for the engine connection: that
        # client is accepted, and its request answered 503.
        for _ in range(60):  # two descriptors a stream: 64 cannot hold 60
            socks.append(_open_stream(router.port))
            answer = read_head_and_body(socks[-1])
            if not answer.startswith(b"HTTP/1.1 200 "):
                break
        assert len(socks) > 1
        refused = [answer]
        # Then at once: the router cannot even accept most of them, and still answers each.
        burst = [_open_stream(router.port) for _ in range(20)]
        socks += burst
        refused += [read_head_and_body(sock) for sock in burst]
        for answer in refused:
            assert b"\r\nretry-after: 1\r\n" in answer.lower(), answer
            status, error = error_of(answer)
            assert status == 503 and error["code"] == "router_overloaded", error
    finally:
        for sock in socks:
            sock.close()
    # Descriptors back (once the router has seen the clients leave): the engine was never blamed.
    answer = wait_for(lambda: router.client().completions.create(model="org/m", prompt="hi", max_tokens=2), what="a completion")
    assert len(answer.choices[0].text.split()) == 2
    assert httpx.get(router.base + "/models", timeout=5).json()["models"]["org/m"]["state"] == "awake"
    lines = log.read_text().splitlines()
    assert not [line for line in lines if "-> down" in line or "engine_unreachable" in line]
    for where in ("connecting to an engine", "accepting a client"):  # each once per interval
        assert len([line for line in lines if f"out of file descriptors ({where}" in line]) == 1, where
    assert not [line for line in lines if "Traceback" in line or "socket.accept() out of system resource" in line]


# ---------------------------------------------------------------------- shutdown


def test_a_second_sigterm_ends_streams_with_an_error_event_and_the_router_exits(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m", tokens_per_second=5), sim_instance("org/late", ttft_ms=60000)])
    start_engines(procs, config)
    router = run_router(procs, config)
    late_engine = config.instances[1]
    with ThreadPoolExecutor(1) as pool:
        # A request still waiting for its engine's first byte when the router is told to stop.
        late = pool.submit(httpx.post, router.base + "/v1/completions", json={"model": "org/late", "prompt": "x"}, timeout=30)
        body = {"model": "org/m", "prompt": "hello", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", router.base + "/v1/completions", json=body, timeout=10) as stream:
            lines = (line for line in stream.iter_lines() if line)
            assert next(lines).startswith("data: {")
            wait_for(lambda: sim_state(late_engine)["in_flight"] == 1, what="the late request reached its engine")
            router.proc.send_signal(signal.SIGTERM)  # `kvctl down`: in-flight requests may finish...
            assert next(lines).startswith("data: {") and next(lines).startswith("data: {")
            router.proc.send_signal(signal.SIGTERM)  # ...until its --timeout ends: cut them now
            rest = list(lines)
        answer = late.result(timeout=30)
    assert "data: [DONE]" not in rest
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["code"] == "router_shutdown" and error["type"] == "server_error"
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "router_shutdown"
    router.proc.wait(timeout=10)


# ---------------------------------------------------------------------- HTTP details


def test_an_http10_client_gets_a_stream_that_ends_with_the_connection(router: Router) -> None:
    body = b'{"model": "org/slow", "prompt": "hello", "max_tokens": 3, "stream": true}'
    answer = exchange(router.port, b"POST /v1/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    events = [line for line in payload.split(b"\n") if line]
    assert all(line.startswith(b"data: ") for line in events)  # plain SSE lines: no chunk sizes between them
    assert events[-1] == b"data: [DONE]" and len(events) == 4


def test_two_authorization_headers_are_refused_on_every_route(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m")], router={"api_keys": ["k1", "k2"], "admin_token": "adm"})
    start_engines(procs, config)
    proc = router_process(procs, config)
    base = config.router.url
    two = [("Authorization", "Bearer k1"), ("Authorization", "Bearer k2")]
    answers = [
        httpx.post(base + "/v1/completions", json={"model": "org/m", "prompt": "x", "max_tokens": 1}, headers=two),
        httpx.get(base + "/v1/models", headers=two),
        httpx.get(base + "/traffic/stats", headers=two),
        httpx.post(base + "/models/org/m/sleep", headers=[("Authorization", "Bearer adm"), ("Authorization", "Bearer adm")]),
    ]
    for answer in answers:
        assert answer.status_code == 400, (answer.request.url, answer.text)
        assert answer.json()["error"]["code"] == "duplicate_authorization"
    # One header works as ever, with either key.
    client = openai.OpenAI(base_url=base + "/v1", api_key="k2", max_retries=0, timeout=30)
    assert client.completions.create(model="org/m", prompt="x", max_tokens=1).choices[0].text
    assert proc.poll() is None


class FakeEngine:
    """A minimal engine that records each completion request's head. At the `vanish_at`-th
    completion it goes away: it stops listening, then drops the (kept-alive) connection
    that request came on without answering."""

    def __init__(self, vanish_at: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.vanish_at = vanish_at
        self.heads: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if head.startswith(b"POST"):
                    self.heads.append(head)
                    if len(self.heads) == self.vanish_at:
                        self.close()
                        return
                    body = b'{"object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}'
                else:
                    body = b'{"is_sleeping": false}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine(vanish_at=2)
    yield engine
    engine.close()


def _fake_config(tmp_path: Path, engine: FakeEngine) -> Config:
    entry = {"name": "fake", "model": "org/fake", "engine": "sim", "port": engine.port, "external": True}
    return write_config(tmp_path, [entry], router={"health_check_interval_seconds": 60})


def test_headers_named_in_connection_are_not_forwarded_and_a_refused_reconnect_marks_the_engine_down(
    tmp_path: Path, procs: Procs, fake_engine: FakeEngine
) -> None:
    router = run_router(procs, _fake_config(tmp_path, fake_engine))
    body = {"model": "org/fake", "prompt": "x"}
    first = httpx.post(router.base + "/v1/completions", json=body, headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "X-Kept": "1"})
    assert first.status_code == 200
    head = fake_engine.heads[0].lower()
    assert b"\r\nx-kept: 1" in head and b"x-hop" not in head
    # The engine dies between two requests: the second one finds the kept-alive connection
    # closed and the engine refusing a new one. That is an unreachable engine, as a fresh
    # refused connect is: 502 engine_unreachable, and the engine is marked down.
    second = httpx.post(router.base + "/v1/completions", json=body)
    assert second.status_code == 502 and second.json()["error"]["code"] == "engine_unreachable", second.text
    assert httpx.get(router.base + "/models").json()["models"]["org/fake"]["state"] == "down"


def test_a_reload_applies_new_limits_to_new_connections(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path, [sim_instance("org/m")])
    start_engines(procs, config)
    router = run_router(procs, config)
    padded = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    assert exchange(router.port, padded).startswith(b"HTTP/1.1 200 ")
    data = json.loads(config.path.read_text())
    data["router"]["max_header_bytes"] = 2048
    config.path.write_text(json.dumps(data))
    router.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: exchange(router.port, padded).startswith(b"HTTP/1.1 431 "), what="the reloaded header limit")
