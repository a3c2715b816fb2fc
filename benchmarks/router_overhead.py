"""What the kvctl router costs: the same engines direct, through kvctl, nginx and vllm-router.

One run, same machine, same fast sim engines (`python -m kvctl.sim`), targets interleaved
(each rep runs every load against every target, in a rotated order):
  * non-streamed completions against an unpaced engine, one at a time and at each
    `--concurrency` (16 and 64): throughput, latency p50/p99 (added = through a proxy
    minus direct), and each proxy's CPU time per request;
  * streamed completions against a paced engine (--tokens-per-second 500: one chunk every
    2 ms, so each chunk is its own read, as with a real engine): CPU per streamed chunk;
  * the cut-stream storm: `--cuts` streams opened together and cut mid-flight (half FIN,
    half RST), `--cut-rounds` times: the proxy must stay up, and the engine must see
    every abort;
  * RSS of the router before and after many requests naming random unknown models.

CPU is utime+stime of the proxy's process (all its threads) from /proc/PID/stat: the most
stable figure on a shared machine. No proxy writes an access log (kvctl's default is on:
`--access-log`). References: nginx, one process (master_process off),
proxy_buffering off, upstream keepalive, installed with apt-get if missing; and the Rust
vllm-router (PyPI `vllm-router`, installed into its own venv under ~/.cache/kvctl-bench;
skipped with a line saying why when it cannot be installed). vllm-router does not route
by model, so it runs as two processes, one per engine, like nginx's two servers.
`--baseline REV` adds "kvctl@REV": the router of that git revision (extracted with git
archive, same venv), for before/after figures in the same run. kvctl runs twice: on uvloop
("kvctl") and on asyncio ("kvctl-asyncio"), see LOOPS.

    .venv/bin/python benchmarks/router_overhead.py [--reps 2] [--baseline HEAD~3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from kvctl.http1 import Client as Pool

CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
VLLM_ROUTER_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvctl-bench" / "vllm-router-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ok(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


def extract_revision(rev: str, into: Path) -> Path:
    """The kvctl package of git revision `rev`, unpacked into the new directory `into` (a PYTHONPATH entry)."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kvctl"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---------------------------------------------------------------------- processes


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
        # In the log's directory: `python -m` puts the working directory first on sys.path,
        # so from the repository root a baseline's PYTHONPATH would be ignored.
        proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=log.parent, **popen)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def ensure_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        print("installing nginx (apt-get install -y nginx) ...", flush=True)
        if subprocess.run(["apt-get", "install", "-y", "nginx"], stdout=subprocess.DEVNULL, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(["apt-get", "install", "-y", "nginx"], stdout=subprocess.DEVNULL, check=True)
        path = shutil.which("nginx") or "/usr/sbin/nginx"
    return path


def ensure_vllm_router() -> tuple[Path | None, str]:
    """The vllm-router executable in its own venv (made once), or None and why not."""
    exe = VLLM_ROUTER_VENV / "bin" / "vllm-router"
    if not exe.exists():
        print(f"installing vllm-router from PyPI into {VLLM_ROUTER_VENV} ...", flush=True)
        steps = (
            [sys.executable, "-m", "venv", "--clear", str(VLLM_ROUTER_VENV)],
            [str(VLLM_ROUTER_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary", ":all:", "vllm-router"],
        )
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                return None, lines[-1] if lines else f"{step[0]} failed"
    version = subprocess.run([str(VLLM_ROUTER_VENV / "bin" / "python"), "-m", "pip", "show", "vllm-router"], capture_output=True, text=True, check=False).stdout
    return exe, next((line.split()[1] for line in version.splitlines() if line.startswith("Version:")), "?")


NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  client_max_body_size 16m;
  upstream fast {{ server 127.0.0.1:{fast}; keepalive 128; }}
  upstream paced {{ server 127.0.0.1:{paced}; keepalive 128; }}
  server {{ listen 127.0.0.1:{nfast}; location / {{ proxy_pass http://fast; proxy_http_version 1.1;
           proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 600s; }} }}
  server {{ listen 127.0.0.1:{npaced}; location / {{ proxy_pass http://paced; proxy_http_version 1.1;
           proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 600s; }} }}
}}
"""

KVCTL_CONF = """
router:
  router_port: {port}
  health_check_interval_seconds: 10   # probes are not what is measured
  max_connections: {max_connections}   # see LOOPS
  access_log: {access_log}   # off like nginx's and vllm-router's here (--access-log: on, ~10 µs a request)
instances:
  - name: fast
    model: bench/fast
    engine: sim
    port: {fast}
    external: true
  - name: paced
    model: bench/paced
    engine: sim
    port: {paced}
    external: true
"""


# The router runs on uvloop when its descriptor limit covers max_connections (kvctl/router/server.py):
# "kvctl" gets a max_connections that a limit of ~10,000 covers (as the default 10,000 is with
# LimitNOFILE=65536), "kvctl-asyncio" one no limit here covers, so it runs on asyncio.
LOOPS = {"kvctl": 4096, "kvctl-asyncio": 1 << 20}


class Target:
    """One way to reach the two engines: the process whose CPU is counted for each."""

    def __init__(self, name: str, fast: tuple[int, str], paced: tuple[int, str]) -> None:
        self.name = name
        self.pid_fast, self.base_fast = fast
        self.pid_paced, self.base_paced = paced


# ---------------------------------------------------------------------- load


async def run_load(base: str, model: str, n: int, concurrency: int, stream: bool, max_tokens: int) -> dict:
    pool = Pool(base, concurrency, timeout=60)
    body = json.dumps({"model": model, "prompt": "the quick brown fox", "max_tokens": max_tokens, "stream": stream}).encode()
    request = pool.build("/v1/completions", body, {"Content-Type": "application/json"})
    latencies: list[float] = []
    ttfts: list[float] = []
    chunks = 0
    failures = 0
    todo = iter(range(n))

    async def worker() -> None:
        nonlocal chunks, failures
        for _ in todo:
            start = time.perf_counter()
            first: list[float] = []

            def sink(data: bytes, start: float = start, first: list[float] = first) -> None:
                nonlocal chunks
                if not first:
                    first.append(time.perf_counter() - start)
                chunks += data.count(b"data: ")

            status, _ = await pool.send(request, sink)
            if status != 200:
                failures += 1
            latencies.append(time.perf_counter() - start)
            if first:
                ttfts.append(first[0])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await pool.close()
    return {
        "requests": n,
        "failures": failures,
        "seconds": elapsed,
        "rps": n / elapsed,
        "chunks": chunks,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1000 if ttfts else None,
    }


async def unknown_flood(base: str, n: int, concurrency: int) -> int:
    pool = Pool(base, concurrency, timeout=60)
    rng = random.Random(1)
    statuses: dict[int, int] = {}
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz/._-") for _ in range(rng.randint(1, 200)))
            body = json.dumps({"model": name, "prompt": "x"}).encode()
            status, _ = await pool.send(pool.build("/v1/completions", body, {"Content-Type": "application/json"}), lambda d: None)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await pool.close()
    return statuses.get(404, 0)


async def cut_streams(port: int, model: str, n: int) -> int:
    """Open `n` streams together, read their first bytes, then drop each connection
    (even ones with a FIN, odd ones with a RST). Returns how many were cut mid-flight."""
    body = json.dumps({"model": model, "prompt": "cut me", "max_tokens": 500, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        first = await reader.read(4096)
        await asyncio.sleep(random.random() * 0.05)
        if i % 2:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        return first.startswith(b"HTTP/1.1 200")

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


# ---------------------------------------------------------------------- main


def measure(label: str, pid: int, load: Coroutine[Any, Any, dict]) -> dict:
    cpu0 = cpu_seconds(pid)
    result = asyncio.run(load)
    result["cpu_s"] = cpu_seconds(pid) - cpu0
    print(
        f"  {label:24} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
        f"cpu {result['cpu_s']:.2f}s  failures {result['failures']}",
        flush=True,
    )
    return result


def storm(name: str, port: int, state_url: str, n: int, rounds: int) -> dict:
    """The cut-stream storm against one proxy: alive after every round, every stream aborted at the engine."""
    before = httpx.get(state_url).json()["aborted"]
    cut = 0
    alive = True
    for _ in range(rounds):
        cut += asyncio.run(cut_streams(port, "bench/paced", n))
        deadline = time.monotonic() + 15
        while httpx.get(state_url).json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            alive = alive and httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            alive = False
    aborted = httpx.get(state_url).json()["aborted"] - before
    print(
        f"{name}: {rounds} x {n} streams cut mid-flight (half FIN, half RST): {cut} cut, engine aborted {aborted}, "
        f"in flight at the engine after {httpx.get(state_url).json()['in_flight']}, proxy alive: {alive}",
        flush=True,
    )
    return {"rounds": rounds, "streams": n, "cut": cut, "engine_aborted": aborted, "proxy_alive": alive}


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every load against every target")
    ap.add_argument("--concurrency", default="16,64", help="client concurrencies for the loads")
    ap.add_argument("--requests", type=int, default=4000, help="non-streamed requests per target and concurrency")
    ap.add_argument("--serial", type=int, default=500, help="non-streamed requests sent one at a time (latency)")
    ap.add_argument("--streams", type=int, default=8, help="paced streams per client, per target and concurrency")
    ap.add_argument("--stream-tokens", type=int, default=100)
    ap.add_argument("--cuts", type=int, default=200, help="streams opened together and cut mid-flight")
    ap.add_argument("--cut-rounds", type=int, default=20)
    ap.add_argument("--unknown", type=int, default=30000, help="requests naming random unknown models")
    ap.add_argument("--baseline", metavar="REV", help="also run the kvctl router of this git revision")
    ap.add_argument("--no-vllm-router", action="store_true")
    ap.add_argument("--access-log", action="store_true", help="run kvctl with its access log on (its default)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    nginx = ensure_nginx()
    vllm_router, vllm_note = (None, "--no-vllm-router") if args.no_vllm_router else ensure_vllm_router()
    if vllm_router is None:
        print(f"vllm-router: skipped ({vllm_note})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="kvctl-bench-"))
    ports = {k: free_port() for k in ("fast", "paced", "kvctl", "kvctl-asyncio", "base", "nfast", "npaced", "vfast", "vpaced", "vm1", "vm2")}
    procs = Procs()
    results: dict = {"vllm_router": vllm_note, "runs": {}}
    try:
        fast = procs.start([PY, "-m", "kvctl.sim", "--model", "bench/fast", "--port", str(ports["fast"])], tmp / "fast.log")
        paced = procs.start([PY, "-m", "kvctl.sim", "--model", "bench/paced", "--port", str(ports["paced"]), "--tokens-per-second", "500"], tmp / "paced.log")
        routers = {"kvctl": ports["kvctl"], "kvctl-asyncio": ports["kvctl-asyncio"]}
        if args.baseline:
            extract_revision(args.baseline, tmp / "baseline")
            routers[f"kvctl@{args.baseline}"] = ports["base"]
        pids: dict[str, int] = {}
        for name, port in routers.items():
            conf = tmp / f"{name.replace('/', '_')}.yaml"
            max_connections = LOOPS.get(name, 10000)
            conf.write_text(
                KVCTL_CONF.format(port=port, fast=ports["fast"], paced=ports["paced"], access_log=str(args.access_log).lower(), max_connections=max_connections)
            )
            env = dict(os.environ, PYTHONPATH=str(tmp / "baseline")) if "@" in name else None
            pids[name] = procs.start([PY, "-m", "kvctl", "router", "-c", str(conf)], tmp / f"{name}.log", env).pid
        for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        ngx = procs.start([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log")
        vpids = {}
        if vllm_router is not None:
            for key, engine, metrics in (("vfast", "fast", "vm1"), ("vpaced", "paced", "vm2")):
                vpids[key] = procs.start(
                    [
                        str(vllm_router),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(ports[key]),
                        "--worker-urls",
                        f"http://127.0.0.1:{ports[engine]}",
                        "--policy",
                        "round_robin",
                        "--prometheus-host",
                        "127.0.0.1",
                        "--prometheus-port",
                        str(ports[metrics]),
                        "--log-level",
                        "warning",
                        "--queue-size",
                        "1000",
                    ],
                    tmp / f"{key}.log",
                ).pid
        for port in (ports["fast"], ports["paced"], *routers.values(), ports["nfast"]):
            wait_ok(f"http://127.0.0.1:{port}/health")
        for key in vpids:
            wait_ok(f"http://127.0.0.1:{ports[key]}/health", 60)
        for port in routers.values():
            deadline = time.monotonic() + 30
            while any(m["state"] != "awake" for m in httpx.get(f"http://127.0.0.1:{port}/models").json()["models"].values()):
                if time.monotonic() > deadline:
                    raise SystemExit("a router did not see the engines awake")
                time.sleep(0.1)

        for name in routers:
            chosen = [line.split("event loop: ", 1)[1] for line in (tmp / f"{name}.log").read_text().splitlines() if "event loop: " in line]
            print(f"{name}: event loop {chosen[0] if chosen else 'asyncio (the revision does not say)'}", flush=True)

        def url(key: str) -> str:
            return f"http://127.0.0.1:{ports[key]}"

        targets = [Target("direct", (fast.pid, url("fast")), (paced.pid, url("paced")))]
        targets += [Target(name, (pids[name], f"http://127.0.0.1:{port}"), (pids[name], f"http://127.0.0.1:{port}")) for name, port in routers.items()]
        targets.append(Target("nginx", (ngx.pid, url("nfast")), (ngx.pid, url("npaced"))))
        if vpids:
            targets.append(Target("vllm-router", (vpids["vfast"], url("vfast")), (vpids["vpaced"], url("vpaced"))))
        runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        for t in targets:  # warm-up: connections, caches, the JIT-less interpreter's first calls
            asyncio.run(run_load(t.base_fast, "bench/fast", 300, 16, False, 16))
            asyncio.run(run_load(t.base_paced, "bench/paced", 16, 16, True, 10))
        for rep in range(args.reps):
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for t in order:
                print(f"rep {rep + 1}, {t.name}:", flush=True)
                run: dict = {"serial": measure("1 at a time", t.pid_fast, run_load(t.base_fast, "bench/fast", args.serial, 1, False, 16))}
                for c in concurrencies:
                    plain = measure(f"non-streamed, c={c}", t.pid_fast, run_load(t.base_fast, "bench/fast", args.requests, c, False, 16))
                    streamed = measure(
                        f"paced streams, c={c}", t.pid_paced, run_load(t.base_paced, "bench/paced", args.streams * c, c, True, args.stream_tokens)
                    )
                    run[f"plain{c}"] = plain
                    run[f"stream{c}"] = streamed
                    run[f"cpu_us_per_request{c}"] = plain["cpu_s"] / plain["requests"] * 1e6
                    run[f"cpu_us_per_chunk{c}"] = streamed["cpu_s"] / max(1, streamed["chunks"]) * 1e6
                runs[t.name].append(run)
        results["runs"] = runs

        state_url = f"{url('paced')}/sim/state"
        storms = {name: storm(name, port, state_url, args.cuts, args.cut_rounds) for name, port in routers.items()}
        storms["nginx"] = storm("nginx", ports["npaced"], state_url, args.cuts, args.cut_rounds)
        if vpids:
            storms["vllm-router"] = storm("vllm-router", ports["vpaced"], state_url, args.cuts, args.cut_rounds)
        results["cut_storm"] = storms

        rss_before = rss_mb(pids["kvctl"])
        got_404 = asyncio.run(unknown_flood(f"http://127.0.0.1:{ports['kvctl']}", args.unknown, 32))
        rss_after = rss_mb(pids["kvctl"])
        results["unknown_models"] = {"requests": args.unknown, "answered_404": got_404, "rss_mb_before": rss_before, "rss_mb_after": rss_after}
        print(f"kvctl: {args.unknown} unknown-model requests ({got_404} x 404): RSS {rss_before:.1f} -> {rss_after:.1f} MB", flush=True)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report(runs, concurrencies, args.reps)
    results["ratios"] = ratios(runs, concurrencies)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(runs: dict[str, list[dict]], concurrencies: list[int], reps: int) -> None:
    names = list(runs)
    direct = runs["direct"]
    print(f"\nranges over {reps} rep(s); CPU of the proxy process (for direct: the engine itself)\n")
    print(f"{'':34}" + "".join(f"{n:>16}" for n in names))

    def row(label: str, value: Callable[[dict, int], float], fmt: str = "{:.1f}", skip_direct: bool = False) -> None:
        cells = []
        for n in names:
            if skip_direct and n == "direct":
                cells.append(f"{'':>16}")
                continue
            cells.append(f"{span([value(r, i) for i, r in enumerate(runs[n])], fmt):>16}")
        print(f"{label:34}" + "".join(cells))

    for c in concurrencies:
        row(f"CPU µs / request, c={c}", lambda r, i, c=c: r[f"cpu_us_per_request{c}"])
        row(f"CPU µs / paced chunk, c={c}", lambda r, i, c=c: r[f"cpu_us_per_chunk{c}"])
    for c in concurrencies:
        row(f"req/s, c={c}", lambda r, i, c=c: r[f"plain{c}"]["rps"], "{:.0f}")
    for label, key in (("serial", "serial"), *((f"c={c}", f"plain{c}") for c in concurrencies)):
        for q in ("p50_ms", "p99_ms"):
            row(f"added {q[:3]} ms, {label}", lambda r, i, key=key, q=q: r[key][q] - direct[i][key][q], "{:.2f}", True)
    for c in concurrencies:
        row(f"added stream p50 ms, c={c}", lambda r, i, c=c: r[f"stream{c}"]["p50_ms"] - direct[i][f"stream{c}"]["p50_ms"], "{:.2f}", True)
    print()
    for name, r in ratios(runs, concurrencies).items():
        print(f"{name}: " + ", ".join(f"{k} {span(v, '{:.2f}')}x" for k, v in r.items()))


def _ratio(ours: float, ref: float) -> float:
    # A short run can leave a reference's CPU below the clock's 10 ms tick: no ratio then.
    return ours / ref if ref else float("nan")


def ratios(runs: dict[str, list[dict]], concurrencies: list[int]) -> dict[str, dict[str, list[float]]]:
    """kvctl (and a baseline) CPU over each reference's, per rep."""
    out: dict[str, dict[str, list[float]]] = {}
    for ours in (n for n in runs if n.startswith("kvctl")):
        for ref in ("vllm-router", "nginx"):
            if ref not in runs:
                continue
            out[f"{ours} / {ref}"] = {
                f"{what} c={c}": [_ratio(a[f"cpu_us_per_{what}{c}"], b[f"cpu_us_per_{what}{c}"]) for a, b in zip(runs[ours], runs[ref], strict=True)]
                for what in ("request", "chunk")
                for c in concurrencies
            }
    return out


if __name__ == "__main__":
    main()
