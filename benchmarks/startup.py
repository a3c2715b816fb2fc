"""How long `kvctl --help` and `kvctl status` take to start, and which imports cost most.

Each command runs `--runs` times as a fresh process (`python -m kvctl ...`); the figure is
the median wall time. With `--baseline` the two versions take turns run by run, so that a
machine busy with other work weighs on both alike. `status` runs against examples/sim.yaml with nothing running (it
still loads the config and asks supervisord). `--baseline REV` runs the kvctl of that git
revision too (git archive, same venv), for before/after in one run. Then
`python -X importtime` names the slowest top-level imports of each command.

    .venv/bin/python benchmarks/startup.py [--runs 15] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from router_overhead import ROOT, extract_revision

COMMANDS = {"kvctl --help": ["--help"], "kvctl status": ["status", "-c", str(ROOT / "examples" / "sim.yaml")]}


def wall_ms(args: list[str], variants: dict[str, dict[str, str]], runs: int, cwd: Path) -> dict[str, float]:
    """{variant: median ms}, the variants interleaved run by run."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, env in variants.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "kvctl", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, cwd=cwd)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def slowest_imports(args: list[str], env: dict[str, str], cwd: Path, top: int = 8) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the top-level imports (those `kvctl` itself triggers)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvctl", *args], env=env, capture_output=True, text=True, check=False, cwd=cwd)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        if name.startswith(" ") and not name.startswith("   "):  # depth 0 and 1 under kvctl
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline", metavar="REV", help="also time the kvctl of this git revision")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvctl-startup-"))
    # Run from the temp dir: `python -m` puts the working directory first on sys.path, so
    # from the repository root a baseline's PYTHONPATH would be ignored.
    # Compiled modules are cached as an installed kvctl's are (PYTHONDONTWRITEBYTECODE would
    # compile every module on every run), in the temp dir rather than in the repository.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    variants = {"now": env}
    try:
        if args.baseline:
            variants[args.baseline] = dict(env, PYTHONPATH=str(extract_revision(args.baseline, tmp / "baseline")))
        for argv in COMMANDS.values():
            wall_ms(argv, variants, 2, tmp)  # warm the page cache and .pyc files
        for command, argv in COMMANDS.items():
            for name, ms in wall_ms(argv, variants, args.runs, tmp).items():
                print(f"{command:14} {name:>10}: median {ms:6.0f} ms over {args.runs} runs", flush=True)
        print(f"\nbare interpreter: {wall_ms_python(args.runs):.0f} ms")
        for command, argv in COMMANDS.items():
            print(f"\nslowest imports of `{command}` (cumulative ms):")
            for micros, module in slowest_imports(argv, variants["now"], tmp):
                print(f"  {micros / 1000:6.1f}  {module}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wall_ms_python(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=False)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    main()
