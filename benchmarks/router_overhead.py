"""What the kvctl router costs: the same engines direct, through kvctl, through nginx.

One run, same machine, same fast sim engines (`python -m kvctl.sim`):
  * non-streamed completions against an unpaced engine: throughput, latency p50/p99
    (added = through a proxy minus direct), and each proxy process's CPU time per request;
  * streamed completions against a paced engine (--tokens-per-second 500: one chunk every
    2 ms, so each chunk is its own read, as with a real engine): CPU per streamed chunk;
  * clients that cut streams mid-flight (close and RST), then a health check: the proxy
    must stay up, and the engine must see the aborts;
  * RSS of the router before and after many requests naming random unknown models.

CPU is utime+stime from /proc/PID/stat: the most stable figure on a shared machine.
nginx is the reference: one process (master_process off), proxy_buffering off, upstream
keepalive; it is installed with apt-get if missing.

    .venv/bin/python benchmarks/router_overhead.py [--requests 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from pathlib import Path

import httpx

from kvctl.bench_http import Pool

CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable


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


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---------------------------------------------------------------------- processes


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
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
        if subprocess.run(["apt-get", "install", "-y", "nginx"], stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(["apt-get", "install", "-y", "nginx"], stdout=subprocess.DEVNULL, check=True)
        path = shutil.which("nginx") or "/usr/sbin/nginx"
    return path


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
  upstream fast {{ server 127.0.0.1:{fast}; keepalive 64; }}
  upstream paced {{ server 127.0.0.1:{paced}; keepalive 64; }}
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

            def sink(data: bytes) -> None:
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
    return {"requests": n, "failures": failures, "seconds": elapsed, "rps": n / elapsed, "chunks": chunks,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            "ttft_p50_ms": pct(ttfts, 0.5) * 1000 if ttfts else None}


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
    """Open streams, read the first bytes, then drop the connection (half close, half RST)."""
    body = json.dumps({"model": model, "prompt": "cut me", "max_tokens": 500, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    cut = 0

    async def one(i: int) -> None:
        nonlocal cut
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await reader.read(4096)
        await asyncio.sleep(random.random() * 0.05)
        sock = writer.get_extra_info("socket")
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        writer.close()
        cut += 1

    for start in range(0, n, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 50))))
    return cut


# ---------------------------------------------------------------------- main


def measure(label: str, pid: int, coro_factory) -> dict:
    cpu0 = cpu_seconds(pid)
    result = asyncio.run(coro_factory())
    result["cpu_s"] = cpu_seconds(pid) - cpu0
    print(f"  {label}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
          f"cpu {result['cpu_s']:.2f}s, failures {result['failures']}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000, help="non-streamed requests per target")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--serial", type=int, default=2000, help="non-streamed requests sent one at a time (latency)")
    ap.add_argument("--streams", type=int, default=320, help="paced streams per target")
    ap.add_argument("--stream-concurrency", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=100)
    ap.add_argument("--cuts", type=int, default=200, help="streams cut mid-flight per proxy")
    ap.add_argument("--unknown", type=int, default=100000, help="requests naming random unknown models")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    nginx = ensure_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="kvctl-bench-"))
    ports = {k: free_port() for k in ("fast", "paced", "kvctl", "nfast", "npaced")}
    procs = Procs()
    try:
        fast = procs.start([PY, "-m", "kvctl.sim", "--model", "bench/fast", "--port", str(ports["fast"])], tmp / "fast.log")
        paced = procs.start([PY, "-m", "kvctl.sim", "--model", "bench/paced", "--port", str(ports["paced"]),
                             "--tokens-per-second", "500"], tmp / "paced.log")
        (tmp / "kvctl.yaml").write_text(KVCTL_CONF.format(port=ports["kvctl"], fast=ports["fast"], paced=ports["paced"]))
        router = procs.start([PY, "-m", "kvctl", "router", "-c", str(tmp / "kvctl.yaml")], tmp / "router.log")
        for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        ngx = procs.start([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log")
        for port in (ports["fast"], ports["paced"], ports["kvctl"]):
            wait_ok(f"http://127.0.0.1:{port}/health")
        wait_ok(f"http://127.0.0.1:{ports['nfast']}/health")
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{ports['kvctl']}/models").json()["models"]["bench/fast"]["state"] != "awake":
            if time.monotonic() > deadline:
                raise SystemExit("the router did not see the engines awake")
            time.sleep(0.1)

        targets = {
            "direct": (fast.pid, paced.pid, f"http://127.0.0.1:{ports['fast']}", f"http://127.0.0.1:{ports['paced']}"),
            "kvctl": (router.pid, router.pid, f"http://127.0.0.1:{ports['kvctl']}", f"http://127.0.0.1:{ports['kvctl']}"),
            "nginx": (ngx.pid, ngx.pid, f"http://127.0.0.1:{ports['nfast']}", f"http://127.0.0.1:{ports['npaced']}"),
        }
        results: dict[str, dict] = {}
        for name, (pid_fast, pid_paced, base_fast, base_paced) in targets.items():
            print(f"{name}:", flush=True)
            asyncio.run(run_load(base_fast, "bench/fast", 500, args.concurrency, False, 16))  # warm-up
            serial = measure("one at a time", pid_fast, lambda: run_load(base_fast, "bench/fast", args.serial, 1, False, 16))
            plain = measure("non-streamed", pid_fast, lambda: run_load(base_fast, "bench/fast", args.requests, args.concurrency, False, 16))
            streamed = measure("streamed   ", pid_paced, lambda: run_load(base_paced, "bench/paced", args.streams, args.stream_concurrency, True, args.stream_tokens))
            results[name] = {"serial": serial, "plain": plain, "stream": streamed,
                             "cpu_us_per_request": plain["cpu_s"] / plain["requests"] * 1e6,
                             "cpu_us_per_chunk": streamed["cpu_s"] / max(1, streamed["chunks"]) * 1e6}

        # Streams cut mid-flight: the proxy survives, the engine sees the aborts.
        state_url = f"http://127.0.0.1:{ports['paced']}/sim/state"
        for name, port in (("kvctl", ports["kvctl"]), ("nginx", ports["npaced"])):
            before = httpx.get(state_url).json()["aborted"]
            cut = asyncio.run(cut_streams(port, "bench/paced", args.cuts))
            deadline = time.monotonic() + 10
            while httpx.get(state_url).json()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
            aborted = httpx.get(state_url).json()["aborted"] - before
            alive = httpx.get(f"http://127.0.0.1:{port}/health" if name == "kvctl" else f"http://127.0.0.1:{port}/health").status_code == 200
            results[name]["cut_streams"] = {"cut": cut, "engine_aborted": aborted, "proxy_alive": alive}
            print(f"{name}: cut {cut} streams mid-flight, engine aborted {aborted}, proxy alive: {alive}", flush=True)

        # Unknown model names must not grow the router.
        rss_before = rss_mb(router.pid)
        got_404 = asyncio.run(unknown_flood(f"http://127.0.0.1:{ports['kvctl']}", args.unknown, 32))
        rss_after = rss_mb(router.pid)
        results["kvctl"]["unknown_models"] = {"requests": args.unknown, "answered_404": got_404,
                                              "rss_mb_before": rss_before, "rss_mb_after": rss_after}
        print(f"kvctl: {args.unknown} unknown-model requests ({got_404} x 404): RSS {rss_before:.1f} -> {rss_after:.1f} MB", flush=True)
    finally:
        procs.stop()

    direct, kv, ng = results["direct"], results["kvctl"], results["nginx"]
    print()
    print(f"{'':24}{'direct':>12}{'kvctl':>12}{'nginx':>12}")
    for label, key in (("req/s (non-streamed)", "rps"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms")):
        print(f"{label:24}" + "".join(f"{r['plain'][key]:>12.2f}" for r in (direct, kv, ng)))
    for label, phase in (("added p50 ms", "plain"), ("added p50 ms, 1 at a time", "serial")):
        key = "p50_ms"
        print(f"{label:24}{'':>12}{kv[phase][key] - direct[phase][key]:>12.3f}{ng[phase][key] - direct[phase][key]:>12.3f}")
    for label, phase in (("added p99 ms", "plain"), ("added p99 ms, 1 at a time", "serial")):
        key = "p99_ms"
        print(f"{label:24}{'':>12}{kv[phase][key] - direct[phase][key]:>12.3f}{ng[phase][key] - direct[phase][key]:>12.3f}")
    print(f"{'stream p50 ms':24}" + "".join(f"{r['stream']['p50_ms']:>12.1f}" for r in (direct, kv, ng)))
    print(f"{'CPU µs / request':24}" + "".join(f"{r['cpu_us_per_request']:>12.1f}" for r in (direct, kv, ng)) + "   (direct = the engine itself)")
    print(f"{'CPU µs / paced chunk':24}" + "".join(f"{r['cpu_us_per_chunk']:>12.1f}" for r in (direct, kv, ng)))
    ratio_req = kv["cpu_us_per_request"] / ng["cpu_us_per_request"]
    ratio_chunk = kv["cpu_us_per_chunk"] / ng["cpu_us_per_chunk"]
    print(f"kvctl / nginx CPU: {ratio_req:.1f}x per request (target <= 10x), {ratio_chunk:.1f}x per paced chunk (target <= 3x)")
    results["ratios"] = {"cpu_per_request": ratio_req, "cpu_per_chunk": ratio_chunk}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
