"""Starting, stopping and talking to supervisord (XML-RPC over its unix socket)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.errors import NotRunningError, SupervisorError
from kvctl.lazy import lazy_module
from kvctl.paths import RunPaths

if TYPE_CHECKING:
    import http.client as http_client
    import xmlrpc.client as xmlrpc_client
else:
    # The standard library's XML-RPC, imported by the first call that reaches a supervisord
    # (`status` of a stopped tree does without, ~15 ms); supervisor's own client module,
    # `supervisor.xmlrpc`, would cost ~40 ms more on every command.
    http_client, xmlrpc_client = lazy_module("http.client"), lazy_module("xmlrpc.client")

# After a stop's timeout: how long a second SIGTERM gets before SIGKILL.
CUT_GRACE_SECONDS = 3.0
# Process states as supervisord names them.
RUNNING_STATES = {"RUNNING"}
STARTING_STATES = {"STARTING", "BACKOFF"}
FAILED_STATES = {"FATAL", "EXITED", "UNKNOWN"}
STOPPED_STATES = {"STOPPED", "EXITED", "FATAL"}


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: str
    pid: int
    start: float  # epoch seconds, 0 if never started
    exitstatus: int
    description: str

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        return cls(
            name=info["name"],
            state=info["statename"],
            pid=int(info.get("pid") or 0),
            start=float(info.get("start") or 0),
            exitstatus=int(info.get("exitstatus") or 0),
            description=str(info.get("description", "")),
        )

    @property
    def uptime(self) -> float | None:
        return time.time() - self.start if self.state == "RUNNING" and self.start else None


class Supervisor:
    """A client for one kvctl run dir's supervisord."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def _call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call, on a connection of its own: the socket is local (a connect costs
        microseconds) and a failed call leaves nothing half-used behind."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.paths.socket))
            connection = http_client.HTTPConnection("localhost")  # the host only goes into the Host header
            connection.sock = sock
            connection.request("POST", "/RPC2", xmlrpc_client.dumps(args, method).encode(), {"Content-Type": "text/xml"})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise NotRunningError(f"supervisord at {self.paths.socket} answered HTTP {response.status}")
            return xmlrpc_client.loads(body)[0][0]
        except OSError as exc:  # first: a stopped tree's missing socket imports no XML-RPC
            raise NotRunningError(f"supervisord is not running for {self.paths.run_dir} ({exc.__class__.__name__})") from None
        except xmlrpc_client.Fault as fault:
            raise SupervisorError(f"supervisord: {method}: {fault.faultString}", fault.faultCode) from None
        except http_client.HTTPException as exc:
            raise NotRunningError(f"supervisord is not running for {self.paths.run_dir} ({exc.__class__.__name__})") from None
        finally:
            sock.close()

    # -- state
    def is_running(self) -> bool:
        try:
            return bool(self._call("supervisor.getState")["statename"] == "RUNNING")
        except (NotRunningError, SupervisorError):
            return False

    def pid(self) -> int:
        return int(self._call("supervisor.getPID"))

    def processes(self) -> dict[str, ProcessInfo]:
        return {i["name"]: ProcessInfo.from_rpc(i) for i in self._call("supervisor.getAllProcessInfo")}

    def process(self, name: str) -> ProcessInfo:
        return ProcessInfo.from_rpc(self._call("supervisor.getProcessInfo", name))

    # -- control
    def start_daemon(self, timeout: float = 20.0) -> None:
        """Start supervisord on RUN_DIR/supervisord.conf; it daemonizes itself."""
        self.paths.socket.unlink(missing_ok=True)  # a stale socket from a killed supervisord
        result = subprocess.run(  # its exit status is checked below, with its output
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.paths.conf)],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise SupervisorError(f"supervisord failed to start: {(result.stderr or result.stdout).strip()}")
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise SupervisorError(f"supervisord did not come up within {timeout:.0f}s; see {self.paths.log('supervisord')}")
            time.sleep(0.05)
        os.chmod(self.paths.socket, 0o700)

    def apply_config(self) -> tuple[list[str], list[str], list[str]]:
        """Like `supervisorctl update`: reread the file, restart only changed programs.

        Returns (added, changed, removed) program names. Added and changed programs are
        left stopped (autostart=false); the caller starts them in order.
        """
        [[added, changed, removed]] = self._call("supervisor.reloadConfig")
        for name in removed + changed:
            self._stop_quietly(name)
            self._call("supervisor.removeProcessGroup", name)
        for name in added + changed:
            self._call("supervisor.addProcessGroup", name)
        return added, changed, removed

    def _stop_quietly(self, name: str, wait: bool = True) -> None:
        """stopProcess that does not mind a program that is not running."""
        try:
            self._call("supervisor.stopProcess", name, wait)
        except SupervisorError as exc:
            if exc.fault != _faults().NOT_RUNNING:
                raise

    def start(self, name: str) -> None:
        try:
            self._call("supervisor.startProcess", name, False)
        except SupervisorError as exc:
            if exc.fault != _faults().ALREADY_STARTED:
                raise

    def signal(self, name: str, signame: str) -> None:
        """Send a signal (e.g. "HUP") to a program's process."""
        self._call("supervisor.signalProcess", name, signame)

    def stop(self, name: str, timeout: float) -> None:
        """SIGTERM; after `timeout` a second SIGTERM (the router then cuts what is still in
        flight, ending streams with an error event), and SIGKILL to the process group if it is
        still alive CUT_GRACE_SECONDS later."""
        self._stop_quietly(name, wait=False)
        deadline = time.monotonic() + timeout
        cut = False
        while (info := self.process(name)).state not in STOPPED_STATES:
            if time.monotonic() > deadline:
                if not cut and info.pid:
                    cut = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(info.pid, signal.SIGTERM)
                    deadline = time.monotonic() + CUT_GRACE_SECONDS
                    continue
                if info.pid:
                    _kill_group(info.pid)  # an engine's launcher and the engine with it
                deadline = time.monotonic() + 10
            time.sleep(0.05)

    def restart(self, name: str, timeout: float) -> None:
        """Stop (as `stop`), then start again without waiting for the start to finish."""
        self.stop(name, timeout)
        self.start(name)

    def stop_all(self, timeout: float) -> None:
        """Stop every program at once; SIGKILL the process groups of any left after `timeout`."""
        for info in self.processes().values():
            if info.state in RUNNING_STATES | STARTING_STATES:
                self._stop_quietly(info.name, wait=False)
        deadline = time.monotonic() + timeout
        while any(p.state not in STOPPED_STATES for p in self.processes().values()):
            if time.monotonic() > deadline:
                for p in self.processes().values():
                    if p.state not in STOPPED_STATES and p.pid:
                        _kill_group(p.pid)
                deadline = time.monotonic() + 10
            time.sleep(0.05)

    def shutdown(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        self._call("supervisor.shutdown")
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        self.paths.socket.unlink(missing_ok=True)

    def tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a program's log, read from the file (works when it is dead too)."""
        return tail_file(self.paths.log(name), lines)


def _faults() -> Any:
    """supervisord's fault codes, imported only when a call failed (see `http_client` above)."""
    from supervisor.xmlrpc import Faults

    return Faults


def tail_file(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def follow_file(path: Path) -> Iterator[bytes]:
    """What is appended to `path` from now on, forever; reopened when supervisord rotates it."""
    fh = open(path, "rb")  # noqa: SIM115 - reopened when the log rotates, closed in `finally`
    fh.seek(0, os.SEEK_END)
    try:
        while True:
            chunk = fh.read(65536)
            if chunk:
                yield chunk
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino or os.stat(path).st_size < fh.tell()
            except FileNotFoundError:
                rotated = False
            if rotated:
                fh.close()
                fh = open(path, "rb")  # noqa: SIM115 - as above
            time.sleep(0.25)  # polling a file: no event to wait on without inotify
    finally:
        fh.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
