"""The whole process tree as one thing: bring it up, take it down, report its status.

`up` and `down` drive supervisord (through `kvctl.supervisor`) and wait on the engines'
and the router's health; the CLI only renders what they report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvctl import config as config_mod
from kvctl import converge, gpu, kvcached, procstate, reaper
from kvctl.client import RouterClient, json_object
from kvctl.config import Config, Instance
from kvctl.engines import adapter_for
from kvctl.errors import KvctlError, NotRunningError, StartupError, UsageError
from kvctl.files import write_private
from kvctl.lazy import lazy_module
from kvctl.paths import ROUTER, RunPaths
from kvctl.supervisor import FAILED_STATES, RUNNING_STATES, ProcessInfo, Supervisor

if TYPE_CHECKING:
    import httpx
else:
    httpx = lazy_module("httpx")  # ~40 ms of imports: `status` of a stopped tree does without

ROUTER_STARTUP_TIMEOUT_SECONDS = 60.0
LOG_TAIL_LINES = 30
# Router instance states in which `up` counts an instance ready.
READY_STATES = frozenset({"awake", "asleep"})

# Called with (program name, what it is doing now, finished?) so a caller can show progress.
Reporter = Callable[[str, str, bool], None]


@dataclass(frozen=True)
class UpResult:
    started_supervisord: bool
    changes: list[str]  # one line per change to the running system (SPEC §14)
    started: list[str]  # programs that were not running and were started


def supervisor_for(config: Config) -> Supervisor:
    return Supervisor(RunPaths(config.run_dir))


def health_url(inst: Instance) -> str:
    return inst.url + adapter_for(inst).health_path


def probe(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def up(config: Config, report: Reporter, *, wait: bool = True) -> UpResult:
    """Make the running tree match the file (SPEC §14): render, start or update supervisord,
    reload the router in place, start what is not running, and (unless `wait` is False)
    return only when the router reports every launched instance ready."""
    from kvctl import render  # jinja2: only `up` renders

    shared = kvcached.shared_with_others(config)  # /dev/shm names are per machine, not per tree
    if shared:
        raise KvctlError("\n".join(shared))
    paths = RunPaths(config.run_dir)
    previous = _applied(config)
    render.write(config)
    sup = supervisor_for(config)
    started_supervisord = not sup.is_running()
    changes: list[str] = []
    if started_supervisord:
        # Processes of an earlier run whose supervisord died (a router holding its port, engines).
        reaper.end_run(config.run_dir)
        report("supervisord", "starting", False)
        sup.start_daemon()
        report("supervisord", "running", True)
    else:
        added, changed, removed = sup.apply_config()
        if previous is not None:
            changes = converge.changes(previous, config, restarted=frozenset(changed))
        else:  # no record of what ran before: say what supervisord saw
            changes = [f"instance {n}: added" for n in added if n != ROUTER] + [f"instance {n}: restarted" for n in changed if n != ROUTER]
            changes += [f"instance {n}: removed" for n in removed if n != ROUTER]
        if ROUTER in changed:
            changes.append("router: restarted (its host or port changed)")
        elif ROUTER in added:
            changes.append("router: added")
        elif ROUTER in removed:
            changes.append("router: removed")
        elif config.router.enabled and previous != config and sup.process(ROUTER).state in RUNNING_STATES:
            _reload_router(config, sup, report)
    write_private(paths.applied_config, config.path.read_text(encoding="utf-8"))
    processes = sup.processes()
    # Engines that stay stopped: `start: stopped`, and (on a running tree) those the router
    # stopped by policy or by hand; a request or `kvctl wake` starts them.
    stopped = {inst.name for inst in config.launched if inst.sleep.start == "stopped"}
    if not started_supervisord:
        stopped |= {name for name, info in (router_instances(config) or {}).items() if info.get("state") == "stopped"}
    stopped -= {name for name, info in processes.items() if info.state in RUNNING_STATES}
    # The router first: clients get a clear 503 rather than a refused connection while engines load.
    order = [ROUTER] if ROUTER in processes else []
    order += [inst.name for inst in config.launched if inst.name not in stopped]
    started: list[str] = []
    for name in order:
        if processes[name].state in RUNNING_STATES:
            continue
        if started and name != ROUTER and config.launch_delay_seconds:
            report(name, f"launch delay {config.launch_delay_seconds:g}s", False)
            time.sleep(config.launch_delay_seconds)
        report(name, "starting", False)
        if name != ROUTER:
            procstate.reset(config.run_dir, name)  # a new start gets its full retries
        sup.start(name)
        started.append(name)
    for name in sorted(stopped):
        report(name, "stopped (starts on demand)", True)
    if wait:
        _wait_healthy(config, sup, report, skip=stopped)
        _wait_router_ready(config, report, stopped)
    elif config.router.enabled:
        _wait(config.router.url + "/health", ROUTER_STARTUP_TIMEOUT_SECONDS, "the router to answer /health")
        report(ROUTER, "answering", True)
    return UpResult(started_supervisord, changes, started)


def _applied(config: Config) -> Config | None:
    """The config `up` applied last (RUN_DIR keeps a copy), to say what changed since."""
    try:
        text = RunPaths(config.run_dir).applied_config.read_text(encoding="utf-8")
        return config_mod.parse(text, config.path)
    except (OSError, KvctlError):
        return None


def _reload_router(config: Config, sup: Supervisor, report: Reporter) -> None:
    """SIGHUP the router and wait until it runs this file's content (or says it refused it)."""
    digest = converge.file_digest(config.path)
    report(ROUTER, "reloading", False)
    sup.signal(ROUTER, "HUP")
    deadline = time.monotonic() + ROUTER_STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            health = httpx.get(config.router.url + "/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            health = {}
        if health.get("config") == digest:
            report(ROUTER, "reloaded", True)
            return
        if health.get("refused_config") == digest:
            raise KvctlError(f"the router refused {config.path} and keeps its previous configuration; see `kvctl logs router`")
        time.sleep(0.05)
    raise KvctlError(f"the router did not reload {config.path} within {ROUTER_STARTUP_TIMEOUT_SECONDS:g}s; see `kvctl logs router`")


def _wait(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe(url):
        if time.monotonic() > deadline:
            raise StartupError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def router_instances(config: Config) -> dict[str, dict[str, Any]] | None:
    """The router's /health/all entries by instance name; None when it cannot be asked."""
    if not config.router.enabled:
        return None
    try:
        with RouterClient(config, timeout=5) as client:
            body = json_object(client.get("/health/all"))
    except KvctlError:
        return None
    return {str(i["name"]): i for i in body.get("instances") or () if isinstance(i, dict) and "name" in i}


def _wait_router_ready(config: Config, report: Reporter, stopped: set[str]) -> None:
    """Until the router itself has every launched instance ready (awake, or asleep where the
    budget put it), so the next command (`kvctl sleep M`) finds it so."""
    if not config.router.enabled:
        return
    deadline = time.monotonic() + max((inst.startup_timeout_seconds for inst in config.launched), default=0) + ROUTER_STARTUP_TIMEOUT_SECONDS
    pending = {inst.name for inst in config.launched}
    with RouterClient(config, timeout=5) as client:
        while pending:
            try:
                states = {i["name"]: i for i in client.get("/health/all").get("instances", [])}
            except KvctlError:
                states = {}
            for name in sorted(pending):
                info = states.get(name, {})
                if info.get("state") in READY_STATES or (name in stopped and info.get("state") == "stopped"):
                    report(name, f"ready ({info['state']})", True)
                    pending.discard(name)
                elif info.get("state") == "failed":
                    raise StartupError(f"{name} failed to start: {info.get('failure')}", supervisor_for(config).tail(name, LOG_TAIL_LINES))
            if pending and time.monotonic() > deadline:
                raise StartupError(f"the router does not report {', '.join(sorted(pending))} ready")
            if pending:
                time.sleep(0.05)


def _wait_healthy(config: Config, sup: Supervisor, report: Reporter, skip: set[str]) -> None:
    """Poll every program until healthy; fail on the first that dies or times out."""
    now = time.monotonic()
    pending: dict[str, tuple[str, float]] = {
        inst.name: (health_url(inst), now + inst.startup_timeout_seconds) for inst in config.launched if inst.name not in skip
    }
    if config.router.enabled:
        pending[ROUTER] = (config.router.url + "/health", now + ROUTER_STARTUP_TIMEOUT_SECONDS)
    while pending:
        processes = sup.processes()
        for name, (url, deadline) in list(pending.items()):
            info = processes[name]
            record = procstate.read(config.run_dir, name) if name != ROUTER else None
            # Between the launcher's retries a program shows EXITED or STARTING; only FATAL
            # or the launcher's own record of giving up is final.
            if info.state == "FATAL" or (record is not None and record.failed) or (name == ROUTER and info.state in FAILED_STATES):
                reason = record.reason if record is not None and record.failed else f"{info.state}: {info.description}"
                raise _startup_failure(sup, name, f"{name} failed to start ({reason})")
            if info.state in RUNNING_STATES and probe(url):
                report(name, "healthy", True)
                del pending[name]
            elif time.monotonic() > deadline:
                raise _startup_failure(sup, name, f"{name} did not become healthy within its startup timeout ({url})")
            else:
                report(name, f"waiting for health ({info.state.lower()})", False)
        if pending:
            time.sleep(0.2)


def _startup_failure(sup: Supervisor, name: str, message: str) -> StartupError:
    return StartupError(message, sup.tail(name, LOG_TAIL_LINES))


def down(config: Config, timeout: float, report: Reporter) -> bool:
    """Stop the router (in-flight requests finish), then the engines, then supervisord, then
    whatever a killed launcher or supervisord left behind (found by its marker, SPEC §16).

    Returns False when nothing was running.
    """
    sup = supervisor_for(config)
    running = sup.is_running()
    if running:
        processes = sup.processes()
        if ROUTER in processes:
            report(ROUTER, "stopping (in-flight requests finish)", False)
            sup.stop(ROUTER, timeout)
            report(ROUTER, "stopped", True)
        report("engines", "stopping", False)
        sup.stop_all(timeout)
        report("engines", "stopped", True)
        report("supervisord", "stopping", False)
        sup.shutdown()
        report("supervisord", "stopped", True)
    leftovers = reaper.end_run(config.run_dir)
    if leftovers:
        report("leftovers", f"ended {len(leftovers)} process(es) of an earlier run", True)
    # Every engine has ended: a kvcached segment still there belongs to one that died (a clean exit removes its own).
    stale = kvcached.remove_unused(config)
    if stale:
        report("kvcached", f"removed {len(stale)} segment(s) of engines that died: {', '.join(stale)}", True)
    return running or bool(leftovers)


def restart(config: Config, name: str, timeout: float, report: Reporter) -> None:
    """Stop one program, clear its failed-start record, start it and wait until it is healthy.

    Raises StartupError when its start fails for good (retries used up) or never gets healthy.
    """
    known = {inst.name: inst for inst in config.launched}
    if name != ROUTER and name not in known:
        raise UsageError(f"no program named '{name}' (choose from: {', '.join([ROUTER, *known]) if config.router.enabled else ', '.join(known)})")
    sup = supervisor_for(config)
    if not sup.is_running():
        raise NotRunningError(f"kvctl is not running for {config.path} (start it with `kvctl up`)")
    if name not in sup.processes():
        raise UsageError(f"'{name}' is not in the running tree yet; run `kvctl up`")
    report(name, "stopping", False)
    sup.stop(name, timeout)
    if name == ROUTER:
        url, wait_seconds = config.router.url + "/health", ROUTER_STARTUP_TIMEOUT_SECONDS
    else:
        from kvctl.launch import backoff  # ctypes and http.client: only `restart` needs it

        inst = known[name]
        procstate.reset(config.run_dir, name)
        attempts = max(1, inst.startretries)
        url = health_url(inst)
        # Every attempt may use its startup timeout, plus the back-off between attempts.
        wait_seconds = attempts * inst.startup_timeout_seconds + sum(backoff(n) for n in range(1, attempts)) + 30
    report(name, "starting", False)
    sup.start(name)
    deadline = time.monotonic() + wait_seconds
    while True:
        info = sup.process(name)
        if info.state in RUNNING_STATES and probe(url):
            report(name, "healthy", True)
            return
        record = procstate.read(config.run_dir, name) if name != ROUTER else None
        if record is not None and record.failed:
            raise _startup_failure(sup, name, f"{name} failed to start: {record.reason}")
        if info.state == "FATAL" or time.monotonic() > deadline:
            raise _startup_failure(sup, name, f"{name} did not become healthy ({info.state}: {info.description}); see `kvctl logs {name}`")
        if record is not None and record.failures:
            report(name, f"{record.failures} failed start(s), retrying: {record.reason}", False)
        time.sleep(0.2)


# Router states in which an instance does not serve and will not by itself (SPEC §4: degraded).
_DEGRADED_STATES = frozenset({"down", "failed", "unknown"})


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    model: str
    engine: str
    port: int
    external: bool
    process: ProcessInfo | None
    # "ok"; "loading": up, not yet healthy, within its startup timeout; "stopped": stopped by
    # policy or `kvctl sleep --stop` (a request starts it); "failing": anything else.
    health: str
    # The router's state; "unknown" when the router runs without this instance, "-" when it
    # cannot be asked (not running, or no router configured).
    state: str
    failure: str | None = None  # why the instance is `failed` (the launcher gave up)
    kv: dict[str, int] | None = None  # its kvcached segment (used/limit/prealloc bytes), None when unknown
    gpu_memory_bytes: int | None = None  # its engine process tree's GPU memory (NVML), None when unknown

    @property
    def healthy(self) -> bool:
        return self.health == "ok"

    @property
    def degraded(self) -> bool:
        return self.health not in ("ok", "stopped") or self.state in _DEGRADED_STATES

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.model,
            "engine": self.engine,
            "port": self.port,
            "external": self.external,
            "process_state": self.process.state if self.process else None,
            "pid": self.process.pid if self.process and self.process.pid else None,
            "uptime_seconds": round(self.process.uptime, 1) if self.process and self.process.uptime is not None else None,
            "healthy": self.healthy,
            "health": self.health,
            "state": self.state,
            "failure": self.failure,
            "kv": self.kv,
            "gpu_memory_bytes": self.gpu_memory_bytes,
        }


@dataclass(frozen=True)
class TreeStatus:
    running: bool
    router: ProcessInfo | None
    router_healthy: bool
    instances: list[InstanceStatus]

    @property
    def exit_code(self) -> int:
        """0 all healthy, 1 degraded, 3 not running."""
        if not self.running:
            return 3
        degraded = any(i.degraded for i in self.instances) or (self.router is not None and not self.router_healthy)
        return 1 if degraded else 0

    def as_json(self) -> dict[str, object]:
        return {
            "running": self.running,
            "router": {
                "process_state": self.router.state if self.router else None,
                "pid": self.router.pid if self.router and self.router.pid else None,
                "healthy": self.router_healthy,
            },
            "instances": [i.as_json() for i in self.instances],
            "exit_code": self.exit_code,
        }


def status(config: Config, *, full: bool = True) -> TreeStatus:
    """Process states from supervisord, health probed at each engine, and the router's view
    (its /health/all). With `full` False a tree whose supervisord is not running is reported
    as only that, without asking the router or the engines (all `kvctl status` prints then)."""
    sup = supervisor_for(config)
    try:
        processes = sup.processes()
    except NotRunningError:
        processes = None
        if not full:
            return TreeStatus(running=False, router=None, router_healthy=False, instances=[])
    router_view = router_instances(config)
    instances = []
    nvml = gpu.unavailable_reason() is None
    for inst in config.instances:
        process = (processes or {}).get(inst.name)
        kv = kvcached.for_env(inst.env)
        pid = process.pid if process and process.pid else None
        seen = router_view.get(inst.name) if router_view is not None else None
        state = "-" if router_view is None else str(seen.get("state", "unknown")) if seen else "unknown"
        record = procstate.read(config.run_dir, inst.name)
        failure = record.reason if record and record.failed else (seen or {}).get("failure")
        instances.append(
            InstanceStatus(
                name=inst.name,
                model=inst.model,
                engine=inst.engine,
                port=inst.port,
                external=inst.external,
                process=process,
                health=_health(inst, process, state, probed=processes is not None or inst.external),
                state=state,
                failure=str(failure) if failure else None,
                kv=kv.as_json() if kv is not None else None,
                gpu_memory_bytes=gpu.process_memory_bytes({pid, *reaper.descendants(pid)}) if nvml and pid else None,
            )
        )
    router = (processes or {}).get(ROUTER)
    return TreeStatus(
        running=processes is not None,
        router=router,
        router_healthy=router is not None and probe(config.router.url + "/health"),
        instances=instances,
    )


def _health(inst: Instance, process: ProcessInfo | None, state: str, *, probed: bool) -> str:
    if probed and probe(health_url(inst)):
        return "ok"
    if state == "stopped" and (process is None or process.state not in RUNNING_STATES):
        return "stopped"  # on purpose, and the router starts it on demand: not a fault
    # An engine loads its weights for a while before it answers: that is not a failure yet.
    if process is not None and process.state in ("STARTING", "RUNNING") and (process.uptime is None or process.uptime < inst.startup_timeout_seconds):
        return "loading"
    return "failing"
