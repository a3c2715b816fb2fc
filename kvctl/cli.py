"""The `kvctl` command line: parse, call the modules that do the work, render with rich."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.text import Text

from kvctl import tables
from kvctl.errors import ConfigError, KvctlError, StartupError, UsageError
from kvctl.lazy import lazy_module
from kvctl.tables import Cell, Column

# The modules a command needs are imported when it runs: `kvctl --help` or `kvctl logs`
# should not pay for httpx, jinja2 and supervisor's XML-RPC (~100 ms of start-up).
if TYPE_CHECKING:
    from kvctl import client as client_mod
    from kvctl import config as config_mod
    from kvctl import kvcached, tree
    from kvctl import render as render_mod
    from kvctl import supervisor as supervisor_mod
    from kvctl.config import Config
else:
    client_mod, config_mod, kvcached, render_mod, supervisor_mod, tree = map(
        lazy_module, ("kvctl.client", "kvctl.config", "kvctl.kvcached", "kvctl.render", "kvctl.supervisor", "kvctl.tree")
    )

app = typer.Typer(
    name="kvctl",
    help="Run several LLM engines on shared GPUs as one OpenAI-compatible service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)
config_app = typer.Typer(help="Validate or render the config file.", no_args_is_help=True)
app.add_typer(config_app, name="config")
kv_app = typer.Typer(help="kvcached KV cache: see and cap each engine's KV cache.", no_args_is_help=True)
app.add_typer(kv_app, name="kv")

# Piped output gets a wide page rather than rich's 80 columns, so tables stay one line a row.
out = Console(width=shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $KVCTL_CONFIG, then ./kvctl.yaml).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (stable; see README).")]

_STATE_STYLE = {
    "awake": "green",
    "asleep": "blue",
    "waking": "yellow",
    "draining": "yellow",
    "starting": "yellow",
    "down": "red",
    "failed": "bold red",
    "unknown": "red",
    "stopped": "blue",
}


def _load(path: Path | None, *, warn: bool = False) -> Config:
    """Load the config; `warn` prints its engine-flag warnings (only `config check`, `up` and
    the router's own log want them, not every status or stats call)."""
    config = config_mod.load(path)
    if warn:
        for warning in config.warnings:
            err.print(warning, markup=False, highlight=False, soft_wrap=True)
    return config


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"kvctl {version('kvctl')}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (also KVCTL_DEBUG=1).")] = False,
    _show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print kvctl's version and exit.")] = False,
) -> None:
    if debug:
        os.environ["KVCTL_DEBUG"] = "1"


# --------------------------------------------------------------------------- lifecycle


@app.command()
def up(
    config_path: ConfigOption = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the router answers /health, without waiting for the engines.")] = False,
) -> None:
    """Make the running system match the file: start it, or apply every change (only changed engines restart)."""
    config = _load(config_path, warn=True)
    from rich.progress import Progress, SpinnerColumn, TextColumn

    tasks: dict[str, Any] = {}
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[name]:<20}"), TextColumn("{task.description}"), console=err, transient=False) as progress:

        def report(name: str, what: str, done: bool) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(what, name=name, total=1)
            progress.update(tasks[name], description=what, completed=1 if done else 0)

        try:
            result = tree.up(config, report, wait=not no_wait)
        except StartupError as exc:
            progress.stop()
            if exc.log_tail:
                err.rule(f"last log lines of {exc.args[0].split()[0]}")
                err.print(exc.log_tail, markup=False, highlight=False)
                err.rule()
            raise
        except KeyboardInterrupt:
            progress.stop()
            err.print(
                f"interrupted: what was started keeps running; `kvctl status -c {config.path}` shows it, `kvctl down -c {config.path}` stops it.",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    for line in result.changes:
        out.print(line, markup=False, highlight=False)
    if result.started_supervisord:
        summary = "kvctl started."
    elif result.changes or result.started:
        summary = "kvctl updated."
    else:
        summary = "kvctl already up; nothing changed."
    out.print(summary + (f" Router: {config.router.url}/v1" if config.router.enabled else ""), markup=False, highlight=False)


@app.command()
def reload(config_path: ConfigOption = None) -> None:
    """The same as `kvctl up`: apply the file to the running system (the router reloads in place)."""
    up(config_path)


@app.command()
def down(
    config_path: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish before processes are killed.")] = 30.0,
) -> None:
    """Stop admitting, let in-flight requests finish, stop engines and supervisord."""
    config = _load(config_path)
    with err.status("stopping") as spinner:
        stopped = tree.down(config, timeout, lambda name, what, done: spinner.update(f"{name}: {what}"))
    out.print("kvctl stopped." if stopped else "kvctl is not running.")


@app.command()
def restart(
    name: Annotated[str, typer.Argument(help="Instance name, or 'router'.")],
    config_path: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish before it is killed.")] = 30.0,
) -> None:
    """Restart one program, also one that gave up (`failed`); wait until healthy or failed."""
    config = _load(config_path)
    with err.status(f"restarting {name}") as spinner:
        tree.restart(config, name, timeout, lambda program, what, done: spinner.update(f"{program}: {what}"))
    out.print(f"{name} restarted and healthy.", markup=False, highlight=False)


@app.command()
def status(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Programs, health and model states. Exit 0 healthy, 1 degraded, 3 not running."""
    config = _load(config_path)
    result = tree.status(config, tree.router_instances(config))
    if as_json:
        out.print_json(json.dumps(result.as_json()))
        raise typer.Exit(result.exit_code)
    if not result.running:
        err.print(f"kvctl is not running (no supervisord at {render_mod.RunPaths(config.run_dir).socket}).", markup=False)
        raise typer.Exit(3)
    rows: list[list[Cell]] = []
    if result.router is not None:
        router_health = "ok" if result.router_healthy else "failing"
        rows.append(
            [
                render_mod.ROUTER,
                "",
                "",
                str(config.router.port),
                result.router.state,
                str(result.router.pid or ""),
                _uptime(result.router.uptime),
                _health(router_health),
                "",
                "",
                "",
            ]
        )
    for inst in result.instances:
        process = inst.process
        rows.append(
            [
                Text(inst.name),
                Text(inst.model),
                inst.engine,
                str(inst.port),
                "external" if inst.external else (process.state if process else "-"),
                str(process.pid) if process and process.pid else "",
                _uptime(process.uptime if process else None),
                _health(inst.health),
                Text(inst.state, style=_STATE_STYLE.get(inst.state, "")),
                _kv_cell(inst.kv),
                _gib(inst.gpu_memory_bytes, "{:.1f}G"),
            ]
        )
    table = tables.fit(
        _STATUS_COLUMNS, rows, out.width, title=Text(f"kvctl — {config.path}"), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    out.print(table)
    for inst in result.instances:
        if inst.failure:
            out.print(Text.assemble((inst.name, "bold"), ": failed: ", inst.failure), soft_wrap=True)
        elif inst.state == "unknown" and result.router_healthy:
            out.print(Text.assemble((inst.name, "bold"), ": the router does not know this instance (`kvctl up` applies the file)"), soft_wrap=True)
    raise typer.Exit(result.exit_code)


# At 80 columns with long model names, GPU, engine, pid, KV, port and uptime give way (in that order).
_STATUS_COLUMNS = [
    Column("name"),
    Column("model"),
    Column("engine", drop=6),
    Column("port", "right", drop=2),
    Column("process"),
    Column("pid", "right", drop=5),
    Column("uptime", "right", drop=1),
    Column("health"),
    Column("state"),
    Column("KV", "right", drop=4),
    Column("GPU", "right", drop=7),
]


def _gib(n: int | float | None, fmt: str = "{:.1f}") -> str:
    return fmt.format(n / 2**30) if isinstance(n, (int, float)) else "-"


def _kv_cell(kv: dict[str, Any] | None) -> Text:
    """`used/limitG` (GiB); red when more is used than the limit allows (it was lowered)."""
    if not kv:
        return Text("-")
    over = kv["used_bytes"] > kv["limit_bytes"]
    return Text(f"{_gib(kv['used_bytes'])}/{_gib(kv['limit_bytes'])}G", style="red" if over else "")


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_HEALTH_STYLE = {"ok": "green", "loading": "yellow", "stopped": "blue", "failing": "red"}


def _health(health: str) -> Text:
    return Text(health, style=_HEALTH_STYLE.get(health, ""))


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Program name: 'router', 'supervisord' or an instance name.")],
    config_path: ConfigOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many last lines to print first.")] = 50,
) -> None:
    """Print a program's log (router, supervisord or an instance)."""
    config = _load(config_path)
    known = [render_mod.ROUTER, "supervisord", *(i.name for i in config.launched)]
    if name not in known:
        raise UsageError(f"no program named '{name}' (choose from: {', '.join(known)})")
    path = render_mod.RunPaths(config.run_dir).log(name)
    if not path.exists():
        raise KvctlError(f"no log yet for '{name}' ({path}); has `kvctl up` run?")
    text = supervisor_mod.tail_file(path, lines)
    if text:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    if follow:
        try:
            _follow(path)
        except KeyboardInterrupt:
            pass


def _follow(path: Path) -> None:
    """Print what is appended to `path`, reopening it when supervisord rotates it."""
    fh = open(path, "rb")  # noqa: SIM115 - reopened when the log rotates, closed in `finally`
    fh.seek(0, os.SEEK_END)
    try:
        while True:
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
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


@app.command()
def events(
    config_path: ConfigOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new state changes until Ctrl-C.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line, as the router's GET /events sends them.")] = False,
) -> None:
    """The router's recent state changes (sleeps, wakes, failures), one line each, with their causes."""
    config = _load(config_path)
    with client_mod.RouterClient(config) as client:
        try:
            for event in client.events(follow=follow):
                if as_json:
                    sys.stdout.write(json.dumps(event) + "\n")
                    sys.stdout.flush()
                else:
                    out.print(_event_line(event), soft_wrap=True)
        except KeyboardInterrupt:
            return  # Ctrl-C is how --follow ends
    if follow:
        raise KvctlError("the router ended the event stream (stopped or restarted)")


def _event_line(event: dict[str, Any]) -> Text:
    """`TIME INSTANCE MODEL: FROM -> TO (cause) [1.2s]`, the router log's wording."""
    when = event.get("time")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "-"
    to = str(event.get("to"))
    line = Text(f"{stamp} {event.get('instance')} {event.get('model')}: {event.get('from')} -> ")
    line.append(to, style=_STATE_STYLE.get(to, ""))
    line.append(f" ({event.get('cause')})")
    duration = event.get("duration_seconds")
    if isinstance(duration, (int, float)):
        line.append(f" [{duration:.1f}s]")
    return line


# --------------------------------------------------------------------------- kvcached


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _kv_size(text: str) -> dict[str, float | int]:
    """`512M`, `2G`, `1.5GiB`, `1073741824` (bytes) -> {"bytes": N}; `30%` -> {"percent": 30}."""
    if text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise UsageError(f"SIZE '{text[:40]}': a percentage must be in (0, 100]")
        return {"percent": percent}
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"SIZE '{text[:40]}' is not a size: use e.g. 512M, 2G, 1.5GiB, a number of bytes, or 30% of the capacity")
    return {"bytes": int(float(match.group(1)) * _UNITS.get((match.group(2) or "").lower(), 1))}


@kv_app.command("limit")
def kv_limit(
    model: Annotated[str, typer.Argument(help="Model name (or alias).")],
    size: Annotated[str, typer.Argument(help="512M, 2G (binary units), or 30% of each instance's KV capacity.")],
    instance: Annotated[str | None, typer.Option("--instance", help="Only this replica of the model.")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Set the KV-cache limit of a model's kvcached engines (through the router, logged there;
    with no router, written to the segments directly)."""
    config = _load(config_path)
    body: dict[str, Any] = _kv_size(size)
    if instance is not None:
        body["instance"] = instance
    try:
        if not config.router.enabled:
            raise client_mod.RouterUnreachable("no router (enable_router: false)")
        with client_mod.RouterClient(config) as client:
            result = client.post(f"/models/{client_mod.model_path(model)}/kv_limit", body=body)
    except client_mod.RouterUnreachable as exc:
        result = kvcached.limit_directly(config, model, body, str(exc))
    for entry in result.get("instances") or ():
        mark = "ok" if entry.get("limit_bytes") is not None else "failed"
        out.print(Text.assemble((mark, _MARKS[mark]), f" {entry.get('message')}"), soft_wrap=True)


@kv_app.command("list")
def kv_list(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every kvcached segment kvctl names (/dev/shm/kvctl_*): this config's instances, then others."""
    config = _load(config_path)
    rows = kvcached.inventory((inst.name, inst.model, inst.env) for inst in config.instances)
    if as_json:
        out.print_json(json.dumps({"segments": rows}))
        return
    cells: list[list[Cell]] = []
    for row in rows:
        kv = row["kv"] or {}
        used, limit = kv.get("used_bytes"), kv.get("limit_bytes")
        share = f"{100 * used / limit:.0f}" if isinstance(used, int) and limit else "-"
        cells.append(
            [
                Text(row["instance"] or "(other)"),
                Text(row["model"] or ""),
                Text(row["segment"]),
                _gib(used, "{:.2f}"),
                _gib(kv.get("prealloc_bytes"), "{:.2f}"),
                _gib(limit, "{:.2f}"),
                share,
            ]
        )
    if not cells:
        out.print("no kvcached instance (ENABLE_KVCACHED=true) in this config and no kvctl_* segment in /dev/shm", markup=False)
        return
    columns = [
        Column("instance"),
        Column("model", drop=2),
        Column("segment", drop=1),
        Column("used", "right"),
        Column("prealloc", "right", drop=3),
        Column("limit", "right"),
        Column("use%", "right"),
    ]
    out.print(
        tables.fit(
            columns, cells, out.width, title=Text("kvcached KV cache (GiB)"), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
        )
    )


# --------------------------------------------------------------------------- config


@config_app.command("check")
def config_check(config_path: ConfigOption = None) -> None:
    """Validate the config file: every problem as FILE:LINE:COL, exit 2 on errors."""
    config = _load(config_path, warn=True)
    render_mod.render_text(config)  # proves the rendered supervisord.conf round-trips
    models = config.models()
    out.print(f"{config.path}: ok ({len(config.instances)} instances, {len(models)} models, {len(config.warnings)} warnings)", markup=False, highlight=False)


@config_app.command("render")
def config_render(config_path: ConfigOption = None) -> None:
    """Print the supervisord.conf that `kvctl up` would write."""
    sys.stdout.write(render_mod.render_text(_load(config_path)))


# --------------------------------------------------------------------------- router


@app.command()
def router(config_path: ConfigOption = None) -> None:
    """Run the router in the foreground (what supervisord runs; also a stand-alone router)."""
    from kvctl.router import serve

    serve(_load(config_path, warn=True))


def _model_action(action: str, model: str | None, all_models: bool, config_path: Path | None) -> None:
    """Ask the router to sleep or wake each model, then report where each one ENDED: a later
    wake may have put an earlier model back to sleep to make room (memory budget)."""
    config = _load(config_path)
    if all_models == (model is not None):
        raise UsageError(f"give a MODEL or --all (not both) to {action}")
    wanted = {"sleep": "asleep", "stop": "stopped", "wake": "awake"}[action]
    results: dict[str, dict[str, Any]] = {}  # canonical model name -> the router's answer
    evicted_for: dict[str, str] = {}  # instance name -> the model whose wake put it to sleep
    with client_mod.RouterClient(config, timeout=600) as client:
        for name in list(config.models()) if all_models else [model]:
            assert name is not None
            result = client.post(f"/models/{client_mod.model_path(name)}/{action}")
            results[str(result.get("model_name") or name)] = result
            evicted_for.update({str(inst): str(result.get("model_name") or name) for inst in result.get("evicted") or ()})
        final = client_mod.json_object(client.get("/models").get("models"))
    failed = False
    for name, result in results.items():
        info = client_mod.json_object(final.get(name))
        state = str(info.get("state", result.get("state")))
        if state == wanted:
            out.print(_model_line("ok", name, state), soft_wrap=True)
            continue
        failed = True
        # The router's own words first when the action failed; else why the state changed.
        message = "" if result.get("success") else str(result.get("message", ""))
        reason = _evicted(info, evicted_for) or message or _cause(info) or "changed again after the router answered"
        out.print(_model_line("failed", name, state, f" — {reason}"), soft_wrap=True)
    for name, info in final.items():
        reason = _evicted(client_mod.json_object(info), evicted_for)
        if name not in results and reason:
            out.print(_model_line("note", name, str(client_mod.json_object(info).get("state")), f" ({reason})"), soft_wrap=True)
    if failed:
        raise typer.Exit(1)


_MARKS = {"ok": "green", "failed": "red", "note": "yellow"}


def _model_line(mark: str, model: str, state: str, tail: str = "") -> Text:
    return Text.assemble((mark, _MARKS[mark]), f" {model}: ", (state, _STATE_STYLE.get(state, "")), tail)


def _instances(info: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in info.get("instances") or () if isinstance(i, dict)]


def _evicted(info: dict[str, Any], evicted_for: dict[str, str]) -> str:
    """'put to sleep to make room for M' when this command's wake of M slept the model."""
    if info.get("state") == "awake":
        return ""
    for inst in _instances(info):
        if inst.get("name") in evicted_for and inst.get("state") in ("asleep", "draining"):
            return f"put to sleep to make room for {evicted_for[inst['name']]}"
    return ""


def _cause(info: dict[str, Any]) -> str:
    """The router's reason for a model's state: why an instance failed, or its sleep cause."""
    instances = _instances(info)
    failures = [f"instance {i.get('name')} failed: {i['failure']}" for i in instances if i.get("failure")]
    causes = sorted({str(i["cause"]) for i in instances if i.get("cause") and i.get("state") == "asleep"})
    return "; ".join(failures) or (f"sleep cause: {', '.join(causes)}" if causes else "")


@app.command()
def sleep(
    model: Annotated[str | None, typer.Argument(help="Model name (or alias).")] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Every configured model.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the engine's process too (frees host memory; the next request starts it).")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Put a model to sleep through the router (drains in-flight requests first)."""
    _model_action("stop" if stop else "sleep", model, all_models, config_path)


@app.command()
def wake(
    model: Annotated[str | None, typer.Argument(help="Model name (or alias).")] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Every configured model.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Wake a sleeping model through the router."""
    _model_action("wake", model, all_models, config_path)


# --------------------------------------------------------------------------- operator tools


@app.command()
def stats(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    live: Annotated[bool, typer.Option("--live", help="Redraw in place every --interval seconds until Ctrl-C.")] = False,
    window: Annotated[float, typer.Option(help="Seconds over which rates and latency percentiles are computed.")] = 60.0,
    interval: Annotated[float, typer.Option(help="Seconds between redraws with --live.")] = 2.0,
) -> None:
    """Per-model state, in-flight, queue, request rate, success, latency, idle time and memory."""
    from kvctl import stats as stats_mod

    if window <= 0 or interval <= 0:
        raise UsageError("--window and --interval must be positive")
    if live and as_json:
        raise UsageError("--live and --json do not go together")
    config = _load(config_path)
    with client_mod.RouterClient(config, timeout=min(10.0, max(2.0, interval))) as client:
        if live:
            try:
                stats_mod.live(client, config, window, interval, out)
            except KeyboardInterrupt:
                pass  # Ctrl-C is how --live ends
            return
        snapshot = stats_mod.gather(client, config, window)
    if as_json:
        out.print_json(json.dumps(snapshot))
    else:
        out.print(stats_mod.render(snapshot, out.width))


@app.command()
def bench(
    config_path: ConfigOption = None,
    url: Annotated[str | None, typer.Option("--url", help="Any OpenAI-compatible base URL (with or without /v1) instead of the config's router.")] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Model to load (repeatable; default: every configured model, or GET /v1/models with --url).")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Closed loop: this many requests in flight (default 8). With --rate: the connection cap (default 256).", show_default=False),
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Open loop: Poisson arrivals at this many requests/s (seeded).", show_default=False)] = None,
    requests: Annotated[int | None, typer.Option(help="Requests in total, round-robin over the models (default 100).", show_default=False)] = None,
    duration: Annotated[float | None, typer.Option(help="Run for this many seconds instead of a request count.", show_default=False)] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream responses (needed for TTFT and ITL).")] = True,
    endpoint: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in (roughly) tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of each request.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrival times.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the full result as JSON to this file.", show_default=False)] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key (default: $OPENAI_API_KEY, then the config's first api_key).", show_default=False),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the first byte and between chunks.")] = 600.0,
    allow_errors: Annotated[bool, typer.Option("--allow-errors", help="Exit 0 even when requests failed.")] = False,
) -> None:
    """Load-test the router (or --url): req/s, tokens/s, TTFT, ITL and latency percentiles."""
    from kvctl import bench as bench_mod

    # With --url the config is optional: used for its api_key when there is one.
    config = _load(config_path) if url is None or config_mod.resolve_path(config_path).exists() else None
    spec = bench_mod.make_spec(
        config,
        url=url,
        models=model or [],
        api_key=api_key,
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        duration=duration,
        stream=stream,
        endpoint=endpoint,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        seed=seed,
        timeout=timeout,
    )
    result = bench_mod.run_with_progress(spec, err)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.print(bench_mod.render(result))
    if result["interrupted"]:
        err.print("interrupted: the figures cover the requests that finished", markup=False)
        raise typer.Exit(130)
    overall = result["overall"]
    if overall["failed"] and not allow_errors:
        raise KvctlError(f"{overall['failed']} of {overall['requests']} requests failed (--allow-errors to exit 0 anyway)")


# --------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app(prog_name="kvctl")
    except ConfigError as exc:
        if os.environ.get("KVCTL_DEBUG") == "1":
            traceback.print_exc()
        for problem in exc.problems:
            err.print(problem, markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KvctlError as exc:
        if os.environ.get("KVCTL_DEBUG") == "1":
            traceback.print_exc()
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
