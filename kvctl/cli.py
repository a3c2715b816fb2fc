"""The `kvctl` command line: parse, call the modules that do the work, render with
`kvctl.display`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kvctl import display
from kvctl.errors import ConfigError, KvctlError, StartupError, UsageError
from kvctl.lazy import lazy_module
from kvctl.paths import ROUTER, RunPaths

# The modules a command needs are imported when it runs: `kvctl --help` or `kvctl logs`
# should not pay for httpx, jinja2 and the YAML parser.
if TYPE_CHECKING:
    import json

    from kvctl import client as client_mod
    from kvctl import config as config_mod
    from kvctl import kvcached, tree
    from kvctl import render as render_mod
    from kvctl import supervisor as supervisor_mod
    from kvctl.config import Config
else:
    client_mod, config_mod, json, kvcached, render_mod, supervisor_mod, tree = map(
        lazy_module, ("kvctl.client", "kvctl.config", "json", "kvctl.kvcached", "kvctl.render", "kvctl.supervisor", "kvctl.tree")
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


def _load(path: Path | None, *, warn: bool = False) -> Config:
    """Load the config; `warn` prints its engine-flag warnings (only `config check`, `up` and
    the router's own log want them, not every status or stats call)."""
    config = config_mod.load(path)
    if warn:
        for warning in config.warnings:
            display.plain(err, warning)
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
    with display.UpProgress(err) as progress:
        try:
            result = tree.up(config, progress.report, wait=not no_wait)
        except StartupError as exc:
            progress.stop()
            display.show_startup_failure(err, exc)
            raise
        except KeyboardInterrupt:
            progress.stop()
            display.plain(
                err, f"interrupted: what was started keeps running; `kvctl status -c {config.path}` shows it, `kvctl down -c {config.path}` stops it."
            )
            raise typer.Exit(130) from None
    display.show_up(out, result, config)


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
    result = tree.status(config, full=as_json)
    if as_json:
        out.print_json(json.dumps(result.as_json()))
        raise typer.Exit(result.exit_code)
    if not result.running:
        err.print(f"kvctl is not running (no supervisord at {RunPaths(config.run_dir).socket}).", markup=False)
        raise typer.Exit(3)
    display.show_status(out, result, config)
    raise typer.Exit(result.exit_code)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Program name: 'router', 'supervisord' or an instance name.")],
    config_path: ConfigOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many last lines to print first.")] = 50,
) -> None:
    """Print a program's log (router, supervisord or an instance)."""
    config = _load(config_path)
    known = [ROUTER, "supervisord", *(i.name for i in config.launched)]
    if name not in known:
        raise UsageError(f"no program named '{name}' (choose from: {', '.join(known)})")
    path = RunPaths(config.run_dir).log(name)
    if not path.exists():
        raise KvctlError(f"no log yet for '{name}' ({path}); has `kvctl up` run?")
    text = supervisor_mod.tail_file(path, lines)
    if text:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    if follow:
        try:
            for chunk in supervisor_mod.follow_file(path):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


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
                    out.print(display.event_line(event), soft_wrap=True)
        except KeyboardInterrupt:
            return  # Ctrl-C is how --follow ends
    if follow:
        raise KvctlError("the router ended the event stream (stopped or restarted)")


# --------------------------------------------------------------------------- kvcached


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
    body: dict[str, Any] = kvcached.parse_limit(size)
    if instance is not None:
        body["instance"] = instance
    try:
        if not config.router.enabled:
            raise client_mod.RouterUnreachable("no router (enable_router: false)")
        with client_mod.RouterClient(config) as client:
            result = client.post(f"/models/{client_mod.model_path(model)}/kv_limit", body=body)
    except client_mod.RouterUnreachable as exc:
        result = kvcached.limit_directly(config, model, body, str(exc))
    display.show_kv_limit(out, result)


@kv_app.command("list")
def kv_list(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every kvcached segment kvctl names (/dev/shm/kvctl_*): this config's instances, then others."""
    config = _load(config_path)
    rows = kvcached.inventory((inst.name, inst.model, inst.env) for inst in config.instances)
    if as_json:
        out.print_json(json.dumps({"segments": rows}))
        return
    display.show_kv_list(out, rows)


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
    config = _load(config_path)
    if all_models == (model is not None):
        raise UsageError(f"give a MODEL or --all (not both) to {action}")
    with client_mod.RouterClient(config, timeout=600) as client:
        outcomes = client_mod.model_actions(client, action, list(config.models()) if all_models else [str(model)])
    for outcome in outcomes:
        out.print(display.outcome_line(outcome), soft_wrap=True)
    if any(outcome.mark == "failed" for outcome in outcomes):
        raise typer.Exit(1)


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
                display.live(out, (display.stats_frame(reading, interval, out.width) for reading in stats_mod.readings(client, config, window, interval)))
            except KeyboardInterrupt:
                pass  # Ctrl-C is how --live ends
            return
        snapshot = stats_mod.gather(client, config, window)
    if as_json:
        out.print_json(json.dumps(snapshot))
    else:
        out.print(display.stats_table(snapshot, out.width))


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
    with display.bench_progress(err, spec) as tick:
        result = bench_mod.run(spec, tick)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.print(display.bench_report(result))
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
    except KvctlError as exc:
        if os.environ.get("KVCTL_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        # A config error is its problems as FILE:LINE:COL lines; any other, one `error:` line.
        for line in exc.problems if isinstance(exc, ConfigError) else [f"error: {exc}"]:
            display.plain(err, line)
        sys.exit(exc.exit_code)
