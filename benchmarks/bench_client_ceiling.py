"""How fast can `kvctl bench` drive a fast local endpoint, and what does it cost per request?

Starts a zero-latency sim engine (`python -m kvctl.sim`, ttft 0, no token pacing) and runs
kvctl.bench against it in this process, streaming and not, at a few concurrencies. Reports
the request rate reached and the generator's own CPU time per request (process CPU of
this process, which holds only the client): 1 / that is the rate one core of client can
drive, whatever the server manages. For comparison, the same loop with httpx.AsyncClient.

    .venv/bin/python benchmarks/bench_client_ceiling.py [--requests 5000] [--max-tokens 16]

On a 2-core machine the sim (one process) is the limit, not the client; both share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx
from router_overhead import free_port, wait_ok

from kvctl import bench


def _start_sim(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvctl.sim", "--model", "fast", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health")
    except BaseException:
        proc.kill()
        raise
    return proc


def _kvctl_bench(url: str, requests: int, concurrency: int, stream: bool, max_tokens: int) -> tuple[float, float, int]:
    spec = bench.BenchSpec(
        base_url=url,
        models=("fast",),
        endpoint="completions",
        stream=stream,
        concurrency=concurrency,
        requests=requests,
        prompt_tokens=32,
        max_tokens=max_tokens,
    )
    cpu = time.process_time()
    result = bench.run(spec)
    cpu = time.process_time() - cpu
    overall = result["overall"]
    return overall["request_rate"], cpu / requests, overall["failed"]


def _httpx_bench(url: str, requests: int, concurrency: int, stream: bool, max_tokens: int) -> tuple[float, float, int]:
    body = json.dumps({"model": "fast", "prompt": "hello " * 32, "max_tokens": max_tokens, "stream": stream}).encode()

    async def main() -> tuple[float, int]:
        left, failed = requests, 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def worker() -> None:
                nonlocal left, failed
                while left > 0:
                    left -= 1
                    async with client.stream("POST", "/v1/completions", content=body, headers={"content-type": "application/json"}) as r:
                        async for _ in r.aiter_raw():
                            pass
                        failed += r.status_code != 200

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - start, failed

    cpu = time.process_time()
    seconds, failed = asyncio.run(main())
    return requests / seconds, (time.process_time() - cpu) / requests, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    sim = _start_sim(port)
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"zero-latency sim, {args.requests} requests each, max_tokens {args.max_tokens}, completions endpoint")
        print(f"{'client':<12} {'mode':<10} {'conc':>5} {'req/s':>8} {'client CPU/req':>15} {'1-core ceiling':>15} {'failed':>7}")
        for client, run in (("kvctl bench", _kvctl_bench), ("httpx", _httpx_bench)):
            for stream in (True, False):
                for concurrency in (16, 64):
                    rate, cpu, failed = run(url, args.requests, concurrency, stream, args.max_tokens)
                    mode = "stream" if stream else "no-stream"
                    print(f"{client:<12} {mode:<10} {concurrency:>5} {rate:>8.0f} {cpu * 1e6:>12.0f} µs {1 / cpu:>11.0f}/s {failed:>7}")
    finally:
        sim.kill()
        sim.wait()


if __name__ == "__main__":
    main()
