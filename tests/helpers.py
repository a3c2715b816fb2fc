"""Helpers shared by the tests: ports, polling, processes, the CLI, trees, sim engines, the router.

Plain functions and classes only; the fixtures built on them live in conftest.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from kvctl.config import Config, Instance, load
from kvctl.engines import adapter_for

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
KVCTL = [sys.executable, "-m", "kvctl"]
# Never inherited by the CLI under test: a test that needs one passes it in `env`.
_CREDENTIALS = ("KVCTL_ADMIN_TOKEN", "OPENAI_API_KEY")


# --------------------------------------------------------------------------- ports and polling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def wait_http_ok(url: str, timeout: float = 30.0) -> None:
    wait_for(lambda: httpx.get(url, timeout=2).status_code == 200, timeout, what=f"GET {url} -> 200")


async def until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """wait_for for async tests: polls without blocking the event loop the lifecycle runs on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- processes


class Procs:
    """Starts subprocesses in their own process group; kills every group at teardown."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def start_sim(self, model: str, port: int, *extra: str, **kwargs) -> subprocess.Popen:
        return self.start([sys.executable, "-m", "kvctl.sim", "--model", model, "--host", "127.0.0.1", "--port", str(port), *extra], **kwargs)

    def find(self, *argv_prefix: str) -> subprocess.Popen:
        """The one started process whose argv begins with `argv_prefix`, for a test that kills it itself."""
        [proc] = [p for p in self._procs if p.args[: len(argv_prefix)] == list(argv_prefix)]
        return proc

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = _ppid(int(entry))
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def engine_pid(launcher: int) -> int:
    """The engine: the only child of its launcher (`python -m kvctl.launch`, the PID supervisord reports)."""
    [pid] = [p for p in tree_pids(launcher) if _ppid(p) == launcher]
    return pid


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- the CLI and a process tree


def cli_env(env: Mapping[str, str] | None = None, columns: int = 200) -> dict[str, str]:
    """The CLI's environment: a wide terminal (rich prints one line per table row) and no
    credentials from the test runner's environment (`env` adds variables)."""
    environ = {k: v for k, v in os.environ.items() if k not in _CREDENTIALS}
    environ.update(COLUMNS=str(columns), **(env or {}))
    return environ


def kvctl(*args: str, cwd: Path = ROOT, env: Mapping[str, str] | None = None, columns: int = 200, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI as a user runs it, to its end: no stdin, the environment of `cli_env`."""
    return subprocess.run([*KVCTL, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(env, columns), timeout=timeout, stdin=subprocess.DEVNULL)


class Tree:
    """One kvctl config in a short temp dir (unix socket paths are length-limited)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kv"))
        self.config = self.dir / "kvctl.yaml"
        self.run_dir = self.dir / ".kvctl"
        self.router_port = free_port()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def write(self, instances: str, extra: str = "") -> None:
        self.config.write_text(f"router:\n  router_port: {self.router_port}\n{extra}instances:\n{instances}")

    def kvctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return kvctl(*args, "-c", str(self.config), timeout=timeout)

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.run_dir / "supervisord.conf"), *args], capture_output=True, text=True, timeout=30
        )

    def status(self) -> dict:
        result = self.kvctl("status", "--json")
        return json.loads(result.stdout)

    def pids(self) -> dict[str, int]:
        return {i["name"]: i["pid"] for i in self.status()["instances"] if i["pid"]}

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def cleanup(self) -> None:
        if self.config.exists():
            self.kvctl("down", "--timeout", "5")
        pidfile = self.run_dir / "supervisord.pid"
        if pidfile.exists():  # `down` failed: do not leave a supervisord behind
            for pid in tree_pids(int(pidfile.read_text())):
                _kill(pid)
        shutil.rmtree(self.dir, ignore_errors=True)


def sim_yaml(name: str, port: int, model: str | None = None, extra: str = "") -> str:
    """One `instances:` entry for a sim engine, as YAML text for `Tree.write`."""
    return f"  - name: {name}\n    model: {model or 'org/' + name}\n    engine: sim\n    port: {port}\n    startup_timeout_seconds: 30\n{extra}"


class LineStream(threading.Thread):
    """A streamed completion read line by line in the background while a test acts on the tree."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {"model": model, "prompt": "count slowly", "max_tokens": max_tokens, "stream": True}
        self.lines: list[str] = []
        self.started = threading.Event()  # the first line arrived

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()


# --------------------------------------------------------------------------- configs and sim engines


def sim_instance(
    model: str, *, name: str | None = None, dialect: str = "vllm", memory_gb: float | None = None, sleep: dict[str, Any] | None = None, **sim: Any
) -> dict[str, Any]:
    """One `instances:` entry for a sim engine on a free port, for `write_config`."""
    entry: dict[str, Any] = {"model": model, "engine": "sim", "port": free_port(), "sim": {"dialect": dialect, **sim}}
    if name:
        entry["name"] = name
    if memory_gb is not None:
        entry["memory_gb"] = memory_gb
    if sleep is not None:
        entry["sleep"] = sleep
    if dialect == "sglang":
        entry["engine_args"] = ["--enable-memory-saver"]
    return entry


def write_config(
    tmp_path: Path, instances: list[dict[str, Any]], *, sleep_manager: dict[str, Any] | None = None, router: dict[str, Any] | None = None
) -> Config:
    """Write a kvctl.yaml (JSON is YAML) and load it through the real loader."""
    data = {
        "router": {"router_port": free_port(), "health_check_interval_seconds": 0.2, **(router or {})},
        "sleep_manager": {"wake_timeout_seconds": 20, "drain_timeout_seconds": 10, **(sleep_manager or {})},
        "run_dir": str(tmp_path / "run"),
        "instances": instances,
    }
    path = tmp_path / "kvctl.yaml"
    path.write_text(json.dumps(data, indent=1))
    return load(path)


def start_engine(procs: Procs, inst: Instance) -> subprocess.Popen:
    """Start one instance's engine by the command its adapter builds; wait until it is healthy."""
    argv = adapter_for(inst).command(inst)
    assert argv[0] == sys.executable or argv[0].endswith("python")
    proc = procs.start(argv)
    wait_http_ok(inst.url + "/health")
    return proc


def start_engines(procs: Procs, config: Config) -> None:
    for inst in config.instances:
        procs.start(adapter_for(inst).command(inst))
    for inst in config.instances:
        wait_http_ok(inst.url + "/health")


def sim_state(inst: Instance) -> dict[str, Any]:
    response = httpx.get(inst.url + "/sim/state", timeout=5)
    response.raise_for_status()
    return response.json()


async def asim_state(inst: Instance) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(inst.url + "/sim/state", timeout=5)
        response.raise_for_status()
        return response.json()


# An "engine" that is healthy but fails every generation: "drop" closes without answering,
# "cut" sends a head and part of the body, then closes. Run: python -c BROKEN_ENGINE PORT MODE.
BROKEN_ENGINE = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    while True:
        conn, _ = srv.accept()
        data = conn.recv(65536)
        if data.startswith(b"GET "):
            conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\nconnection: close\\r\\n\\r\\n{}")
        elif sys.argv[2] == "cut":
            conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 100\\r\\n\\r\\n{\\"partial")
        conn.close()
""")


# --------------------------------------------------------------------------- kvcached segments


def read_segment(name: str) -> tuple[int, int, int]:
    """A kvcached segment's 24 bytes (limit, used, prealloc), read as kvcached's own tool reads them (not through kvctl)."""
    with open(f"/dev/shm/{name}", "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        return struct.unpack("=qqq", fh.read(24))


def write_segment(name: str, limit: int, used: int = 0, prealloc: int = 0) -> None:
    """Another writer of the protocol (an engine, kvcached's `kvctl limit`): exclusive lock, 24 bytes."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 24)
        os.pwrite(fd, struct.pack("=qqq", limit, used, prealloc), 0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the router


def router_process(procs: Procs, config: Config, **popen: Any) -> subprocess.Popen:
    """Start the real router (`python -m kvctl router`) on `config`; wait until it answers /health."""
    proc = procs.start([*KVCTL, "router", "-c", str(config.path)], **popen)
    wait_http_ok(config.router.url + "/health")
    return proc


def wait_awake(config: Config, token: str | None = None) -> None:
    """Wait until the router on `config` reports every model awake."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    wait_for(
        lambda: all(m["state"] == "awake" for m in httpx.get(config.router.url + "/models", headers=headers, timeout=5).json()["models"].values()),
        what="every model awake",
    )


def start_router(procs: Procs, config: Config, *, awake: bool = True, token: str | None = None) -> str:
    """Start the router on `config`; wait until it answers (and every model is awake). Its URL."""
    router_process(procs, config)
    if awake:
        wait_awake(config, token)
    return config.router.url


class Router:
    """A running router, asked over HTTP."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.url = config.router.url

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def state(self, model: str) -> str:
        return self.get("/models").json()["models"][model]["state"]

    def complete(self, model: str, **body: Any) -> httpx.Response:
        return self.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4, **body})


def open_stream(port: int, model: str, max_tokens: int = 1000) -> socket.socket:
    """A raw client that sent a streamed completion request and read its first bytes."""
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in sock.recv(65536)
    return sock


def cut(sock: socket.socket, rst: bool) -> None:
    """Drop a client connection mid-response: a plain close or a TCP reset."""
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
