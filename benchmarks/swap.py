"""Swapping under a memory budget that fits one model: plain wake-on-request against
swap-aware serving (SPEC §15).

Two (or three) sim models of 10 GB each under `memory_budget_gb: 10`; clients send
requests alternating A, B, A, B… at a fixed rate (open loop: each request is sent on
schedule whatever the others do). Each policy runs on a fresh tree (`kvctl up`, real
supervisord and router):
  * fifo: `min_awake_seconds: 0` — every request for the sleeping model evicts the other
    as soon as it is idle (plain first-come wake-on-request);
  * swap-aware: `min_awake_seconds: 5` — a woken model serves its queue and keeps the GPU
    while it has work, so the models take turns.
Reported per policy: wakes (from the sims), throughput, latency p50/p99 and the worst wait.

    .venv/bin/python benchmarks/swap.py [--seconds 20] [--rate 10] [--models 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from router_overhead import free_port

KVCTL = [sys.executable, "-m", "kvctl"]
POLICIES = {"fifo": 0, "swap-aware": 5}


def write_config(directory: Path, models: int, min_awake: float) -> tuple[Path, int, list[int]]:
    router, ports = free_port(), [free_port() for _ in range(models)]
    instances = "".join(
        f"  - name: m{i}\n    model: org/m{i}\n    engine: sim\n    port: {port}\n    memory_gb: 10\n"
        "    sim: {ttft_ms: 20, tokens_per_second: 200, sleep_seconds: 0.3, wake_seconds: 0.5}\n"
        for i, port in enumerate(ports)
    )
    path = directory / "kvctl.yaml"
    path.write_text(
        f"router:\n  router_port: {router}\n  access_log: false\n"
        f"sleep_manager:\n  memory_budget_gb: 10\n  min_awake_seconds: {min_awake}\n  max_swap_wait_seconds: 60\n"
        f"instances:\n{instances}"
    )
    return path, router, ports


async def drive(router: int, models: int, seconds: float, rate: float) -> list[tuple[int, float]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router}", timeout=300, limits=httpx.Limits(max_connections=1000)) as client:

        async def one(model: str) -> tuple[int, float]:
            started = time.monotonic()
            try:
                response = await client.post("/v1/completions", json={"model": model, "prompt": "swap", "max_tokens": 8})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            return status, time.monotonic() - started

        tasks = []
        start = time.monotonic()
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(f"org/m{i % models}")))
        return await asyncio.gather(*tasks)


def run(policy: str, models: int, seconds: float, rate: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kvswap") as tmp:
        config, router, ports = write_config(Path(tmp), models, POLICIES[policy])
        subprocess.run([*KVCTL, "up", "-c", str(config)], check=True, capture_output=True)
        try:
            started = time.monotonic()
            results = asyncio.run(drive(router, models, seconds, rate))
            elapsed = time.monotonic() - started
            wakes = sum(httpx.get(f"http://127.0.0.1:{port}/sim/state").json()["wake_calls"] for port in ports)
        finally:
            subprocess.run([*KVCTL, "down", "-c", str(config), "--timeout", "5"], capture_output=True)
    latencies = sorted(latency for _, latency in results)
    ok = sum(1 for status, _ in results if status == 200)
    return {
        "policy": policy,
        "requests": len(results),
        "ok": ok,
        "wakes": wakes,
        "throughput_rps": round(ok / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(statistics.quantiles(latencies, n=100)[98], 3),
        "worst_wait_s": round(latencies[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=10, help="requests per second, alternating between the models")
    parser.add_argument("--models", type=int, default=2, choices=(2, 3))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [run(policy, args.models, args.seconds, args.rate) for policy in POLICIES]
    print(f"{args.models} models of 10 GB, budget 10 GB, alternating at {args.rate:g} req/s for {args.seconds:g} s")
    print(f"{'policy':<12}{'ok/sent':>10}{'wakes':>7}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'worst s':>9}")
    for row in rows:
        print(
            f"{row['policy']:<12}{row['ok']:>5}/{row['requests']:<4}{row['wakes']:>7}{row['throughput_rps']:>8}{row['p50_s']:>8}{row['p99_s']:>8}{row['worst_wait_s']:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
