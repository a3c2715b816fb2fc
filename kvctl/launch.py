"""`python -m kvctl.launch ENV_FILE -- ARGV...`: run one engine as the child of a subreaper.

supervisord starts every engine through this (SPEC §5, §16). The launcher
* applies the env file: values reach the engine byte for byte (supervisor's own
  `environment=` parser cannot carry every value), and the router's secrets are removed;
* stays the engine's parent as a child subreaper (as tini and dumb-init do): signals are
  forwarded to the engine, orphaned workers are re-parented to the launcher and reaped,
  and when the engine exits for any reason every remaining descendant is ended
  (SIGTERM, grace, SIGKILL) before the launcher exits with the engine's status;
* ends what an earlier run of the same instance left behind before starting;
* counts a start as successful only once the health URL answers 200 within the startup
  timeout. Failed starts in a row are recorded (`kvctl.procstate`) and delayed with
  back-off; after `startretries` of them the launcher gives up: it exits at once with
  GAVE_UP_EXIT, which supervisord turns into FATAL and never restarts (see the template).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from kvctl import procstate, reaper

GAVE_UP_EXIT = 78  # EX_CONFIG; in `exitcodes=`, so supervisord does not restart the program
# Longer than the program's startsecs (1): an exit after a failed start must not look "too quick"
# to supervisord, which would count it against its own startretries (0) and mark it FATAL.
MIN_LIFETIME_SECONDS = 1.5
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
PROBE_INTERVAL_SECONDS = 0.5
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
WAITED = (*FORWARDED, signal.SIGCHLD)
_PR_SET_CHILD_SUBREAPER = 36
_LOG_PREFIX = "kvctl.launch:"


@dataclass(frozen=True)
class LaunchSpec:
    """The env file (RUN_DIR/env/NAME.json, 0600) that `kvctl up` writes for each engine."""

    run_dir: str
    name: str
    env: dict[str, str]
    unset: tuple[str, ...]  # removed from the inherited environment (the router's secrets)
    health_url: str
    startup_timeout_seconds: float
    startretries: int
    log: str  # the program's log file, for the gist of a failure

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str) -> LaunchSpec:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls(
            run_dir=str(data["run_dir"]),
            name=str(data["name"]),
            env={str(k): str(v) for k, v in data["env"].items()},
            unset=tuple(str(n) for n in data["unset"]),
            health_url=str(data["health_url"]),
            startup_timeout_seconds=float(data["startup_timeout_seconds"]),
            startretries=int(data["startretries"]),
            log=str(data["log"]),
        )


def backoff(failures: int) -> float:
    """Delay before the start that follows `failures` failed ones: 0.5, 1, 2, 4 ... 30 s."""
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (failures - 1)) if failures > 0 else 0.0


def engine_env(spec: LaunchSpec, inherited: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in inherited.items() if k not in spec.unset and k != "KVCTL_ENV_DIGEST"}
    env.update(spec.env)
    env[reaper.MARKER_VAR] = reaper.marker(spec.run_dir, spec.name)  # supervisord sets it too
    return env


class Launcher:
    def __init__(self, spec: LaunchSpec, command: list[str], started: float) -> None:
        self.spec = spec
        self.command = command
        self.started = started
        self.engine = 0
        self.status: int | None = None  # the engine's wait status once reaped
        self.stopping = False  # a stop signal was forwarded: the exit is no failure

    def log(self, message: str) -> None:
        print(f"{_LOG_PREFIX} {self.spec.name}: {message}", file=sys.stderr, flush=True)

    def run(self) -> int:
        spec = self.spec
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)  # handled synchronously with sigtimedwait
        record = procstate.read(Path(spec.run_dir), spec.name)
        if record is not None and record.failed:
            # Only a deliberate start (supervisorctl start, kvctl restart/up) runs a launcher
            # after it gave up: that gets the full retries again.
            procstate.reset(Path(spec.run_dir), spec.name)
            record = None
        failures = record.failures if record else 0
        limit = max(1, spec.startretries)
        if record is not None and failures >= limit:
            return self.give_up(procstate.StartRecord(failures, True, record.reason))
        if libc_prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
            self.log("cannot become a child subreaper; orphaned workers are found by their marker only")
        ended = reaper.end_leftovers(spec.run_dir, spec.name)
        if ended:
            self.log(f"ended {len(ended)} process(es) left by an earlier run: {' '.join(map(str, ended))}")
        if failures:
            delay = backoff(failures)
            self.log(f"{failures} failed start(s) in a row; next try in {delay:g}s")
            if self.wait_signals(delay):
                return 0
        log_offset = _size(spec.log)
        try:
            self.engine = os.posix_spawn(
                self.command[0],
                self.command,
                engine_env(spec, dict(os.environ)),
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # what an exec'd program expects
            )
        except OSError as exc:
            return self.give_up(procstate.StartRecord(failures + 1, True, f"cannot run {self.command[0]}: {exc.strerror}"))
        healthy, timed_out = self.supervise()
        self.end_descendants()
        assert self.status is not None
        code, how = _exit_code(self.status)
        if self.stopping:
            return code
        gist = _gist(spec.log, log_offset)
        if timed_out:
            how = f"not healthy within {spec.startup_timeout_seconds:g}s ({spec.health_url})"
        reason = f"{how}: {gist}" if gist else how
        if healthy:
            self.log(f"engine exited after it was healthy ({reason})")
        else:
            current = procstate.read(Path(spec.run_dir), spec.name)  # `kvctl restart` may have reset it
            failures = (current.failures if current else 0) + 1
            procstate.write(Path(spec.run_dir), spec.name, procstate.StartRecord(failures, False, reason))
            self.log(f"start failed ({failures} of {limit}): {reason}")
        self.wait_signals(MIN_LIFETIME_SECONDS - (time.monotonic() - self.started))
        return code

    def give_up(self, record: procstate.StartRecord) -> int:
        procstate.write(Path(self.spec.run_dir), self.spec.name, record)
        self.log(f"failed: {record.reason}; giving up after {record.failures} failed start(s) (`kvctl restart {self.spec.name}` tries again)")
        return GAVE_UP_EXIT

    def supervise(self) -> tuple[bool, bool]:
        """Forward signals and reap until the engine exits; returns (was healthy, timed out)."""
        deadline = time.monotonic() + self.spec.startup_timeout_seconds
        healthy = timed_out = False
        next_probe = time.monotonic()
        while self.status is None:
            if healthy or timed_out or self.stopping:
                self.handle(signal.sigwaitinfo(WAITED).si_signo)
                continue
            timed = signal.sigtimedwait(WAITED, max(0.0, next_probe - time.monotonic()))
            if timed is not None:
                self.handle(timed.si_signo)
                continue
            if _probe(self.spec.health_url):
                healthy = True
                procstate.reset(Path(self.spec.run_dir), self.spec.name)
                self.log("healthy")
            elif time.monotonic() > deadline:
                timed_out = True
                self.log(f"not healthy within {self.spec.startup_timeout_seconds:g}s; stopping it")
                reaper.terminate([self.engine, *reaper.descendants(os.getpid())])
            next_probe = time.monotonic() + PROBE_INTERVAL_SECONDS
        return healthy, timed_out

    def handle(self, signo: int) -> None:
        if signo == signal.SIGCHLD:
            self.reap()
            return
        if signo in STOPPING:
            self.stopping = True
        if self.engine and self.status is None:
            try:
                os.kill(self.engine, signo)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        """Collect every exited child: the engine, and orphans re-parented to this subreaper."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.engine:
                self.status = status

    def end_descendants(self) -> None:
        """The engine is gone: end whatever it left (workers, trackers), grandchildren included."""
        for _ in range(5):  # a process forking while it is ended may leave one more
            pids = reaper.descendants(os.getpid())
            if not pids:
                break
            self.log(f"ending {len(pids)} process(es) the engine left: {' '.join(map(str, sorted(pids)))}")
            reaper.terminate(pids)
            self.reap()
        self.reap()

    def wait_signals(self, seconds: float) -> bool:
        """Wait `seconds` while still answering signals; True if asked to stop meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            info = signal.sigtimedwait(WAITED, remaining)
            if info is not None:
                self.handle(info.si_signo)
                if self.stopping:
                    return True
        return self.stopping


def libc_prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0))


def _exit_code(status: int) -> tuple[int, str]:
    """The launcher's exit code for the engine's wait status (128+N for signal N), and in words."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, f"killed by {signal.Signals(sig).name}"
    code = os.waitstatus_to_exitcode(status)
    # GAVE_UP_EXIT is reserved for giving up: an engine exiting with it must still be restarted.
    return (1 if code == GAVE_UP_EXIT else code), f"exit status {code}"


def _probe(url: str) -> bool:
    # http.client, not urllib: no proxy from the environment may stand between us and the engine.
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=1.0)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


_ERROR_LINE = re.compile(r"error|exception|fatal|refus|denied|not supported|no such|cannot|failed", re.IGNORECASE)


def _gist(log: str, offset: int) -> str:
    """The engine's last non-empty log line since it started, shortened to one line."""
    # supervisord copies the engine's output from a pipe into the file: let it catch up.
    deadline = time.monotonic() + 1.5
    size = _size(log)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := _size(log)) == size:
            break
        size = now
    try:
        with open(log, "rb") as fh:
            start = offset if size >= offset else 0  # rotated meanwhile: read the new file
            fh.seek(max(start, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.startswith(_LOG_PREFIX)]
    if not lines:
        return ""
    # The last line naming an error says more than a trailer such as pydantic's "For further
    # information visit …" after vLLM's real complaint.
    last = next((line for line in reversed(lines[-20:]) if _ERROR_LINE.search(line)), lines[-1])
    return last if len(last) <= 200 else last[:197] + "..."


def main(argv: list[str] | None = None) -> NoReturn:
    started = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m kvctl.launch ENV_FILE -- PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(GAVE_UP_EXIT)
    try:
        spec = LaunchSpec.load(args[0])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"{_LOG_PREFIX} cannot read {args[0]}: {exc.__class__.__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(GAVE_UP_EXIT)  # retrying cannot help
    sys.exit(Launcher(spec, args[2:], started).run())


if __name__ == "__main__":
    main()
