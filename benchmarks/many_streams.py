"""CPU per streamed chunk with many streams open at once, stream set-up excluded.

N streams (default 5,000) are opened against a paced sim engine through `kvctl router`;
once the engine has all N in flight, the router's CPU time is read over `--window`
seconds in which every stream gets one chunk per 1/`--rate` s, so that
CPU / (N × rate × window) is the cost of relaying one chunk at that concurrency, without
the connects, accepts and request parsing that dominate a short stream. The router gets
the file-descriptor soft limit raised to the hard one, as `kvctl up` does (2 per stream).

    .venv/bin/python benchmarks/many_streams.py [--streams 5000] [--rate 2] [--window 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path

import httpx
from limits import Stack
from router_overhead import cpu_seconds


async def hold_streams(port: int, n: int, tokens: int, done: asyncio.Event) -> int:
    """Open n streams and read them; returns how many ended with [DONE] (if let run)."""
    body = json.dumps({"model": "bench/sim", "prompt": "p", "max_tokens": tokens, "stream": True}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.write(request)
        tail = b""
        while chunk := await reader.read(65536):
            tail = (tail + chunk)[-64:]
            if tail.endswith(b"0\r\n\r\n"):
                break
        writer.close()
        return b"[DONE]" in tail

    results = await asyncio.gather(*(one() for _ in range(n)))
    done.set()
    return sum(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=2.0, help="tokens (chunks) per second per stream")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of steady streaming measured")
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client holds a descriptor per stream
    stack = Stack(Path(tempfile.mkdtemp(prefix="kvctl-streams-")), ["--tokens-per-second", str(args.rate)], access_log=False)
    port, engine, router, sim = stack.port, stack.engine_url, stack.router, stack.sim
    try:
        tokens = int(args.rate * (args.window + 120))  # outlasts the ramp-up and the window: stopped after

        async def run() -> tuple[int, float, float]:
            done = asyncio.Event()
            task = asyncio.create_task(hold_streams(port, args.streams, tokens, done))
            deadline = time.monotonic() + 60
            async with httpx.AsyncClient() as client:
                while (await client.get(f"{engine}/sim/state")).json()["in_flight"] < args.streams:
                    if time.monotonic() > deadline or done.is_set():
                        raise SystemExit("the streams did not all start")
                    await asyncio.sleep(0.2)
            cpu0, t0 = cpu_seconds(router.pid), time.monotonic()
            await asyncio.sleep(args.window)
            cpu, elapsed = cpu_seconds(router.pid) - cpu0, time.monotonic() - t0
            task.cancel()
            return cpu, elapsed

        cpu, elapsed = asyncio.run(run())
        chunks = args.streams * args.rate * elapsed
        print(
            f"{args.streams} streams at {args.rate:g} chunks/s each: router CPU {cpu:.2f} s over {elapsed:.1f} s of steady "
            f"streaming = {cpu / chunks * 1e6:.1f} µs per chunk (engine CPU {cpu_seconds(sim.pid):.1f} s in all)"
        )
    finally:
        stack.procs.stop()


if __name__ == "__main__":
    main()
