"""`python -m kvctl.sim --model M --port P [...]`: run the simulated engine.

Its flags are the fields of kvctl.sim.settings.SimSettings (the sim adapter writes them from
an instance's `sim:` block), plus --model, --host and --port. The real engine's own
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
from kvctl.sim import settings as sim_settings
from kvctl.sim.app import create_app
from kvctl.sim.settings import SimSettings
from kvctl.sim.state import DEFAULT_MEMORY_GB, MEMORY_SHARE, KvPool, Settings


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an engine flag like --load-format must not match --load-seconds.
    p = argparse.ArgumentParser(prog="python -m kvctl.sim", description="Simulated vLLM/SGLang engine for tests and demos.", allow_abbrev=False)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    for flag, (attr, kind) in sim_settings.flags().items():
        help_text = sim_settings.FIELDS[attr].doc.replace("%", "%%")  # argparse formats help with %
        p.add_argument(flag, dest=attr, default=sim_settings.FIELDS[attr].default, help=help_text, **kind.flag_options())
    return p


def parse_args(argv: list[str] | None = None) -> Settings:
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        print(f"kvctl.sim: ignoring engine args: {' '.join(unknown)}", file=sys.stderr, flush=True)
    sim = SimSettings(**{attr: getattr(args, attr) for attr, _ in sim_settings.flags().values()})
    memory_gb = sim.memory_gb if sim.memory_gb is not None else DEFAULT_MEMORY_GB
    return Settings(model=args.model, port=args.port, host=args.host, memory_gb=memory_gb, sim=sim, engine_args=tuple(unknown))


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
            # As kvcached does once its KV cache is set up: the segment, with the capacity (the
            # KV-cache region's share of --memory-gb) as the limit.
            capacity = int(MEMORY_SHARE["kv_cache"] * settings.memory_gb * 2**30)
            segment = kvcached.Segment(kvcached.segment_name(os.environ), capacity)
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
