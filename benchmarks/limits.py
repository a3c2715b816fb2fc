"""The router under client load and abuse, with the limits `kvctl up` sets (SPEC §10, §16).

Figures, not a test. Three parts, each against `python -m kvctl router` on sim engines:

  streams    N concurrent streams (default 10,000) held open together: how many complete,
             how many are refused (503 router_overloaded) and nothing else; router RSS and CPU.
             The router's file-descriptor hard limit is this shell's unless --router-nofile
             raises it (as root): a stream needs two descriptors in the router.
  rss        router RSS every --every requests over --requests non-streamed completions
             (1,000,000 takes ~6 minutes on 2 cores; the default is scaled to ~2 minutes).
  slowloris  --slow connections sending their headers at 1 byte/s while 8 clients keep
             making requests: when each slow one is cut (header_timeout_seconds, 10 by
             default) and with what, and the other clients' latency and errors before and during.

    .venv/bin/python benchmarks/limits.py [streams|rss|slowloris|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from router_overhead import PY, Procs, cpu_seconds, free_port, pct, rss_mb, wait_ok

from kvctl.http1 import Client

# One sim engine behind the router, for these parts and many_streams.py; access_log as each measures it.
CONFIG = """
router:
  router_port: {port}
  access_log: {access_log}
  health_check_interval_seconds: 10
instances:
  - name: sim
    model: bench/sim
    engine: sim
    port: {engine}
    external: true
"""


class Stack:
    """A sim engine and the router in front of it; the router's fd limit optionally raised."""

    def __init__(self, tmp: Path, sim_args: list[str], router_nofile: int | None = None, access_log: bool = True) -> None:
        self.procs = Procs()
        self.port, engine = free_port(), free_port()
        self.engine_url = f"http://127.0.0.1:{engine}"
        (tmp / "kvctl.yaml").write_text(CONFIG.format(port=self.port, engine=engine, access_log=str(access_log).lower()))  # on: kvctl's default
        self.log = tmp / "router.log"
        self.base = f"http://127.0.0.1:{self.port}"

        def limit() -> None:
            if router_nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (router_nofile, router_nofile))

        try:
            self.sim = self.procs.start([PY, "-m", "kvctl.sim", "--model", "bench/sim", "--port", str(engine), *sim_args], tmp / "sim.log")
            wait_ok(self.engine_url + "/health")
            # preexec_fn: setrlimit in the child, before any thread exists.
            self.router = self.procs.start([PY, "-m", "kvctl", "router", "-c", str(tmp / "kvctl.yaml")], self.log, preexec_fn=limit)
            wait_ok(self.base + "/health")
        except BaseException:
            self.procs.stop()  # a half-started stack leaves no process behind
            raise

    def rss(self) -> float:
        return rss_mb(self.router.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.router.pid)

    def fd_limit(self) -> int:
        for line in Path(f"/proc/{self.router.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return 0


def completion(stream: bool, max_tokens: int) -> bytes:
    return json.dumps({"model": "bench/sim", "prompt": "the quick brown fox", "max_tokens": max_tokens, "stream": stream}).encode()


# ---------------------------------------------------------------------- streams


async def one_stream(port: int, request: bytes) -> str:
    """Open a stream and read it to the end: "done", or what stopped it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed ({exc.strerror})"
    try:
        writer.write(request)
        head = b""
        tail = b""
        while chunk := await reader.read(65536):
            if len(head) < 64:
                head += chunk
            tail = (tail + chunk)[-64:]
            if b"data: [DONE]" in tail:
                return "done"
        status = head[9:12].decode(errors="replace")
        if status == "503" and b"router_overloaded" in head + tail:
            return "503 router_overloaded"
        return f"ended early (status {status or 'none'})"
    except OSError as exc:
        return f"reset ({exc.strerror})"
    finally:
        writer.close()


async def streams_part(tmp: Path, n: int, tokens: int, rate: float, router_nofile: int | None) -> dict:
    stack = Stack(tmp, ["--tokens-per-second", str(rate)], router_nofile)
    try:
        body = completion(True, tokens)
        request = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        rss0, cpu0, t0 = stack.rss(), stack.cpu(), time.monotonic()
        peak = {"rss": rss0, "in_flight": 0}
        done = asyncio.Event()

        async def in_flight() -> None:
            reader_pool = Client(stack.engine_url, 1, timeout=10)
            while not done.is_set():
                got = bytearray()
                status, _ = await reader_pool.send(b"GET /sim/state HTTP/1.1\r\nhost: x\r\n\r\n", got.extend)
                if status == 200:
                    peak["in_flight"] = max(peak["in_flight"], json.loads(got)["in_flight"])
                peak["rss"] = max(peak["rss"], stack.rss())
                await asyncio.sleep(0.5)
            await reader_pool.close()

        sampler = asyncio.ensure_future(in_flight())
        gate = asyncio.Semaphore(256)  # connects in flight at once: the listen backlog is 2048

        async def paced() -> str:
            async with gate:
                task = asyncio.ensure_future(one_stream(stack.port, request))
                await asyncio.sleep(0)  # let the connect start before taking the next
            return await task

        outcomes: dict[str, int] = {}
        for result in await asyncio.gather(*(paced() for _ in range(n))):
            outcomes[result] = outcomes.get(result, 0) + 1
        done.set()
        await sampler
        elapsed = time.monotonic() - t0
        cpu = stack.cpu() - cpu0
        return {
            "streams": n,
            "tokens_each": tokens,
            "tokens_per_second": rate,
            "router_fd_limit": stack.fd_limit(),
            "outcomes": outcomes,
            "peak_in_flight_at_engine": peak["in_flight"],
            "seconds": round(elapsed, 1),
            "router_rss_mb": {"before": round(rss0, 1), "peak": round(peak["rss"], 1), "after": round(stack.rss(), 1)},
            "router_cpu_seconds": round(cpu, 2),
            "router_cpu_ms_per_stream": round(cpu / n * 1e3, 2),
            "log_lines_out_of_fds": sum("out of file descriptors" in line for line in stack.log.read_text().splitlines()),
        }
    finally:
        stack.procs.stop()


# ---------------------------------------------------------------------- rss


async def rss_part(tmp: Path, n: int, every: int, concurrency: int) -> dict:
    stack = Stack(tmp, [])
    try:
        pool = Client(stack.base, concurrency, timeout=60)
        request = pool.build("/v1/completions", completion(False, 1), {"Content-Type": "application/json"})
        curve = [(0, round(stack.rss(), 1))]
        sent = completed = failures = 0
        t0, cpu0 = time.monotonic(), stack.cpu()

        async def worker() -> None:
            nonlocal sent, completed, failures
            while sent < n:
                sent += 1
                status, _ = await pool.send(request, lambda d: None)
                completed += 1
                failures += status != 200
                if completed % every == 0:
                    curve.append((completed, round(stack.rss(), 1)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await pool.close()
        elapsed = time.monotonic() - t0
        return {
            "requests": sent,
            "failures": failures,
            "seconds": round(elapsed, 1),
            "rps": round(sent / elapsed),
            "router_cpu_us_per_request": round((stack.cpu() - cpu0) / sent * 1e6, 1),
            "rss_mb_every": every,
            "rss_curve": curve,
        }
    finally:
        stack.procs.stop()


# ---------------------------------------------------------------------- slowloris


async def slow_client(port: int) -> tuple[float, str]:
    """Headers at one byte a second, never ending: (seconds until the router cut it, how)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return time.monotonic() - t0, f"connect failed ({exc.strerror})"
    read = asyncio.ensure_future(reader.read(65536))
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: ")
        while not read.done():
            await asyncio.wait([read], timeout=1.0)
            if not read.done():
                writer.write(b"s")
        answer = read.result()
        how = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "closed without answer"
    except OSError as exc:
        how = f"reset ({exc.strerror})"
    finally:
        read.cancel()
        writer.close()
    return time.monotonic() - t0, how


async def slowloris_part(tmp: Path, slow: int, normal_clients: int) -> dict:
    stack = Stack(tmp, [])
    try:
        pool = Client(stack.base, normal_clients, timeout=60)
        request = pool.build("/v1/completions", completion(False, 4), {"Content-Type": "application/json"})
        phase = "before"
        stats: dict[str, dict[str, list[float] | int]] = {p: {"latencies": [], "errors": 0} for p in ("before", "during", "after")}
        stop = asyncio.Event()

        async def normal() -> None:
            while not stop.is_set():
                current = stats[phase]
                start = time.perf_counter()
                try:
                    status, _ = await pool.send(request, lambda d: None)
                except Exception:
                    status = 0
                if status == 200:
                    current["latencies"].append(time.perf_counter() - start)  # type: ignore[union-attr]
                else:
                    current["errors"] += 1  # type: ignore[operator]

        workers = [asyncio.ensure_future(normal()) for _ in range(normal_clients)]
        await asyncio.sleep(5)
        phase = "during"
        rss0 = stack.rss()
        slow_tasks = [asyncio.ensure_future(slow_client(stack.port)) for _ in range(slow)]
        results = await asyncio.gather(*slow_tasks)
        rss_peak = stack.rss()
        phase = "after"
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*workers)
        await pool.close()
        cut_after = sorted(seconds for seconds, _ in results)
        hows: dict[str, int] = {}
        for _, how in results:
            hows[how] = hows.get(how, 0) + 1

        def summary(p: str) -> dict:
            lat = stats[p]["latencies"]
            return {
                "requests": len(lat),
                "errors": stats[p]["errors"],
                "p50_ms": round(pct(lat, 0.5) * 1000, 2),  # type: ignore[arg-type]
                "p99_ms": round(pct(lat, 0.99) * 1000, 2),
            }  # type: ignore[arg-type]

        return {
            "slow_connections": slow,
            "cut": hows,
            "cut_after_seconds": {"min": round(cut_after[0], 2), "p50": round(pct(cut_after, 0.5), 2), "max": round(cut_after[-1], 2)},
            "router_rss_mb": {"before": round(rss0, 1), "after_all_cut": round(rss_peak, 1)},
            "normal_clients": normal_clients,
            "normal": {p: summary(p) for p in ("before", "during", "after")},
        }
    finally:
        stack.procs.stop()


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", default="all", choices=["streams", "rss", "slowloris", "all"])
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--stream-tokens", type=int, default=40)
    ap.add_argument("--tokens-per-second", type=float, default=2.0, help="pace of each stream (long enough to hold them all open)")
    ap.add_argument("--router-nofile", type=int, help="the router's fd limit, soft and hard (raising the hard limit needs CAP_SYS_RESOURCE)")
    ap.add_argument("--requests", type=int, default=400_000)
    ap.add_argument("--every", type=int, default=50_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slow", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the load generator holds a socket a stream too
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kvctl-limits-") as tmp:
        if args.part in ("streams", "all"):
            figures["streams"] = asyncio.run(streams_part(Path(tmp), args.streams, args.stream_tokens, args.tokens_per_second, args.router_nofile))
            print(json.dumps({"streams": figures["streams"]}, indent=1), flush=True)
        if args.part in ("rss", "all"):
            figures["rss"] = asyncio.run(rss_part(Path(tmp), args.requests, args.every, args.concurrency))
            print(json.dumps({"rss": figures["rss"]}), flush=True)
        if args.part in ("slowloris", "all"):
            figures["slowloris"] = asyncio.run(slowloris_part(Path(tmp), args.slow, 8))
            print(json.dumps({"slowloris": figures["slowloris"]}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    sys.exit(main())
