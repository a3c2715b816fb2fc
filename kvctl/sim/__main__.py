"""`python -m kvctl.sim --model M --port P [...]`: run the simulated engine.

Flags are those `SimAdapter.command` (kvctl/engines.py) writes. The real engine's own
flags that kvcached configs append (`--enable-sleep-mode`, `--gpu-memory-utilization
0.5`, ...) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import uvicorn

from kvctl import kvcached
from kvctl.config import SimSettings
from kvctl.sim.app import create_app
from kvctl.sim.state import KvPool, Settings


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an engine flag like --load-format must not match --load-seconds.
    p = argparse.ArgumentParser(prog="python -m kvctl.sim", description="Simulated vLLM/SGLang engine for tests and demos.", allow_abbrev=False)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dialect", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--load-seconds", type=float, default=0.0, help="delay before listening, like loading weights")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    p.add_argument("--tokens-per-second", type=float, default=0.0, help="pace between tokens; 0 = no pause")
    p.add_argument("--sleep-seconds", type=float, default=0.0, help="how long a sleep/release call takes")
    p.add_argument("--wake-seconds", type=float, default=0.0, help="how long a wake/resume call takes")
    p.add_argument("--memory-gb", type=float, default=1.0, help="GPU memory held while awake (reported only)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of generations answered 500")
    p.add_argument("--seed", type=int, default=0, help="seed of the --fail-rate draws")
    p.add_argument("--crash-after", type=int, default=None, metavar="N", help="exit after serving N generations")
    p.add_argument("--hang-on-sleep", action="store_true", help="sleep/release calls never return")
    p.add_argument("--hang-on-wake", action="store_true", help="wake/resume calls never return")
    p.add_argument("--wake-corrupts-weights", action="store_true", help="every wake leaves garbage weights until they are reloaded")
    p.add_argument("--reload-no-effect", action="store_true", help="reloading the weights does not repair them")
    p.add_argument(
        "--spawn-children",
        type=int,
        default=0,
        metavar="N",
        help="start N idle child processes, as vLLM starts its EngineCore and workers; they outlive a killed parent",
    )
    p.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=SimSettings.kv_bytes_per_token,
        metavar="N",
        help="KV cache a token holds, with ENABLE_KVCACHED=true in the environment (default 128 KiB)",
    )
    return p


# With kvcached, the KV cache's capacity is this share of --memory-gb (the rest: weights).
KV_SHARE = 0.4


def parse_args(argv: list[str] | None = None) -> Settings:
    args, unknown = _parser().parse_known_args(argv)
    if not 0.0 <= args.fail_rate <= 1.0:
        sys.exit("kvctl.sim: --fail-rate must be between 0 and 1")
    if args.spawn_children < 0:
        sys.exit("kvctl.sim: --spawn-children must be >= 0")
    if args.kv_bytes_per_token < 1:
        sys.exit("kvctl.sim: --kv-bytes-per-token must be >= 1")
    if unknown:
        print(f"kvctl.sim: ignoring engine args: {' '.join(unknown)}", file=sys.stderr, flush=True)
    sim = SimSettings(
        dialect=args.dialect,
        load_seconds=args.load_seconds,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        sleep_seconds=args.sleep_seconds,
        wake_seconds=args.wake_seconds,
        fail_rate=args.fail_rate,
        crash_after=args.crash_after,
        hang_on_sleep=args.hang_on_sleep,
        hang_on_wake=args.hang_on_wake,
        seed=args.seed,
        spawn_children=args.spawn_children,
        wake_corrupts_weights=args.wake_corrupts_weights,
        reload_no_effect=args.reload_no_effect,
        kv_bytes_per_token=args.kv_bytes_per_token,
    )
    return Settings(model=args.model, port=args.port, host=args.host, memory_gb=args.memory_gb, sim=sim, engine_args=tuple(unknown))


# An idle worker: waits for a signal. It has no pipe to the parent, so nothing tells it when
# the parent is killed -- like a real engine's workers, it lingers unless someone reaps it.
_CHILD_CODE = "import signal\nwhile True: signal.pause()"


def spawn_children(n: int, model: str) -> list[subprocess.Popen[bytes]]:
    # Same process group and environment as the engine; the extra argv names them in `ps`.
    return [subprocess.Popen([sys.executable, "-c", _CHILD_CODE, "kvctl.sim-child", str(i), model], stdin=subprocess.DEVNULL) for i in range(n)]


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """A clean shutdown ends the workers, as vLLM's does; a crash or SIGKILL leaves them."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait()


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    children = spawn_children(settings.sim.spawn_children, settings.model)  # before loading, like vLLM's EngineCore
    segment: kvcached.Segment | None = None

    def cleanup() -> None:
        _stop_children(children)
        if segment is not None:
            segment.remove()  # a clean exit removes it; a crash leaves it (`kvctl down` removes it then)

    def stop(signum: int, _frame: object) -> None:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down, with this handler back in place.
        cleanup()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        if settings.sim.load_seconds > 0:
            time.sleep(settings.sim.load_seconds)  # a real engine binds its port only once loaded
        kv = None
        if kvcached.enabled(os.environ):
            # As kvcached does once its KV cache is set up: the segment, with the capacity as the limit.
            segment = kvcached.Segment(kvcached.segment_name(os.environ), int(KV_SHARE * settings.memory_gb * 2**30))
            kv = KvPool(segment, settings.sim.kv_bytes_per_token)
        app = create_app(settings, kv)
        print(f"kvctl.sim: serving {settings.model} ({settings.sim.dialect} dialect) on {settings.host}:{settings.port}", file=sys.stderr, flush=True)
        uvicorn.run(
            app, host=settings.host, port=settings.port, loop="asyncio", http="httptools", access_log=False, log_level="warning", timeout_graceful_shutdown=5
        )
    finally:
        cleanup()


if __name__ == "__main__":
    main()
