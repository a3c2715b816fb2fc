"""Everything the CLI draws, in one place: the colours of states, number formats, tables that
fit the terminal, and the views of `status`, `stats`, `bench`, `kv`, `events`, `sleep`/`wake`
and `up`'s progress.

Views take the data the other modules return (no I/O of their own besides the console);
`kvctl.cli` parses, calls and hands the result here. rich's progress, live and panel
modules are imported by the views that use them, not by every command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from kvctl.paths import ROUTER

if TYPE_CHECKING:
    from kvctl.bench import BenchSpec
    from kvctl.client import ModelOutcome
    from kvctl.config import Config
    from kvctl.errors import StartupError
    from kvctl.stats import Reading
    from kvctl.tree import TreeStatus, UpResult

STATE_STYLE = {
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
HEALTH_STYLE = {"ok": "green", "loading": "yellow", "stopped": "blue", "failing": "red"}
MARK_STYLE = {"ok": "green", "failed": "red", "note": "yellow"}


def plain(console: Console, line: str) -> None:
    """A line as it is: no rich markup or highlighting, never folded."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- formats


def gib(n: int | float | None, fmt: str = "{:.1f}") -> str:
    return fmt.format(n / 2**30) if isinstance(n, (int, float)) else "-"


def kv_cell(kv: dict[str, Any] | None) -> Text:
    """`used/limitG` (GiB); red when more is used than the limit allows (it was lowered)."""
    if not kv:
        return Text("-")
    over = kv["used_bytes"] > kv["limit_bytes"]
    return Text(f"{gib(kv['used_bytes'])}/{gib(kv['limit_bytes'])}G", style="red" if over else "")


def uptime(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _health(health: str) -> Text:
    return Text(health, style=HEALTH_STYLE.get(health, ""))


def _num(value: Any, fmt: str = "{}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


# --------------------------------------------------------------------------- tables

Cell = str | Text  # a str is rich markup


@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    # 0: always shown. Otherwise hidden when the table is too wide, highest first.
    drop: int = 0


def fit(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int, **table: Any) -> RenderableType:
    """A table of `rows` no wider than `width` when hiding optional columns can make it so:
    rather than folding every row into fragments, optional columns give way (the least useful
    first) and a dim line names them. `table` holds rich Table arguments (title, box, ...)."""
    shown = list(range(len(columns)))
    measure = Console(width=10 * width + 1000)  # rich clamps a measurement to the console's width
    while True:
        built = _build(columns, rows, shown, table)
        optional = [i for i in shown if columns[i].drop]
        if measure.measure(built).maximum <= width or not optional:
            break
        shown.remove(max(optional, key=lambda i: columns[i].drop))
    hidden = [c.header for i, c in enumerate(columns) if i not in shown]
    if not hidden:
        return built
    note = Text(f"hidden at {width} columns: {', '.join(hidden)}; a wider terminal or --json shows them", style="dim")
    return Group(built, note)


def _build(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], shown: list[int], table: dict[str, Any]) -> Table:
    result = Table(**table)
    for i in shown:
        # Only the always-shown columns may fold, and only when nothing else is left to hide.
        result.add_column(columns[i].header, justify=columns[i].justify, no_wrap=bool(columns[i].drop), overflow="fold")
    for row in rows:
        result.add_row(*(row[i] for i in shown))
    return result


def _fit(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int, title: str, table_box: box.Box) -> RenderableType:
    return fit(columns, rows, width, title=Text(title), title_justify="left", box=table_box, pad_edge=False, collapse_padding=True)


# --------------------------------------------------------------------------- up, status


class UpProgress:
    """`kvctl up`'s progress: a spinner a program with what it is doing now. `report` is the
    `tree.Reporter` to pass to `tree.up`."""

    def __init__(self, console: Console) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn

        columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[name]:<20}"), TextColumn("{task.description}"))
        self._progress = Progress(*columns, console=console, transient=False)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> UpProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def report(self, name: str, what: str, done: bool) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(what, name=name, total=1)
        self._progress.update(self._tasks[name], description=what, completed=1 if done else 0)

    def stop(self) -> None:
        self._progress.stop()


def show_startup_failure(console: Console, exc: StartupError) -> None:
    """The failed program's last log lines (the error itself is printed by the caller)."""
    if exc.log_tail:
        console.rule(f"last log lines of {exc.args[0].split()[0]}")
        console.print(exc.log_tail, markup=False, highlight=False)
        console.rule()


def show_up(console: Console, result: UpResult, config: Config) -> None:
    for line in result.changes:
        console.print(line, markup=False, highlight=False)
    if result.started_supervisord:
        summary = "kvctl started."
    elif result.changes or result.started:
        summary = "kvctl updated."
    else:
        summary = "kvctl already up; nothing changed."
    console.print(summary + (f" Router: {config.router.url}/v1" if config.router.enabled else ""), markup=False, highlight=False)


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


def show_status(console: Console, result: TreeStatus, config: Config) -> None:
    """The table of programs, then a line for each failed instance or one the router lacks."""
    rows: list[list[Cell]] = []
    if result.router is not None:
        router_health = "ok" if result.router_healthy else "failing"
        router = result.router
        rows.append([ROUTER, "", "", str(config.router.port), router.state, str(router.pid or ""), uptime(router.uptime), _health(router_health), "", "", ""])
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
                uptime(process.uptime if process else None),
                _health(inst.health),
                Text(inst.state, style=STATE_STYLE.get(inst.state, "")),
                kv_cell(inst.kv),
                gib(inst.gpu_memory_bytes, "{:.1f}G"),
            ]
        )
    console.print(_fit(_STATUS_COLUMNS, rows, console.width, f"kvctl — {config.path}", box.SIMPLE_HEAD))
    for inst in result.instances:
        if inst.failure:
            console.print(Text.assemble((inst.name, "bold"), ": failed: ", inst.failure), soft_wrap=True)
        elif inst.state == "unknown" and result.router_healthy:
            console.print(Text.assemble((inst.name, "bold"), ": the router does not know this instance (`kvctl up` applies the file)"), soft_wrap=True)


# --------------------------------------------------------------------------- events, sleep/wake, kv


def event_line(event: dict[str, Any]) -> Text:
    """`TIME INSTANCE MODEL: FROM -> TO (cause) [1.2s]`, the router log's wording."""
    when = event.get("time")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "-"
    to = str(event.get("to"))
    line = Text(f"{stamp} {event.get('instance')} {event.get('model')}: {event.get('from')} -> ")
    line.append(to, style=STATE_STYLE.get(to, ""))
    line.append(f" ({event.get('cause')})")
    duration = event.get("duration_seconds")
    if isinstance(duration, (int, float)):
        line.append(f" [{duration:.1f}s]")
    return line


def outcome_line(outcome: ModelOutcome) -> Text:
    """`ok MODEL: STATE`; `failed MODEL: STATE — why`; `note MODEL: STATE (why)`."""
    tail = f" — {outcome.reason}" if outcome.mark == "failed" else f" ({outcome.reason})" if outcome.reason else ""
    return Text.assemble((outcome.mark, MARK_STYLE[outcome.mark]), f" {outcome.model}: ", (outcome.state, STATE_STYLE.get(outcome.state, "")), tail)


def show_kv_limit(console: Console, result: dict[str, Any]) -> None:
    """One line an instance: `ok`/`failed` and the router's message."""
    for entry in result.get("instances") or ():
        mark = "ok" if entry.get("limit_bytes") is not None else "failed"
        console.print(Text.assemble((mark, MARK_STYLE[mark]), f" {entry.get('message')}"), soft_wrap=True)


_KV_COLUMNS = [
    Column("instance"),
    Column("model", drop=2),
    Column("segment", drop=1),
    Column("used", "right"),
    Column("prealloc", "right", drop=3),
    Column("limit", "right"),
    Column("use%", "right"),
]


def show_kv_list(console: Console, rows: list[dict[str, Any]]) -> None:
    """`kvcached.inventory`'s rows as a table (GiB)."""
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
                gib(used, "{:.2f}"),
                gib(kv.get("prealloc_bytes"), "{:.2f}"),
                gib(limit, "{:.2f}"),
                share,
            ]
        )
    if not cells:
        console.print("no kvcached instance (ENABLE_KVCACHED=true) in this config and no kvctl_* segment in /dev/shm", markup=False)
        return
    console.print(_fit(_KV_COLUMNS, cells, console.width, "kvcached KV cache (GiB)", box.SIMPLE_HEAD))


# --------------------------------------------------------------------------- stats


# Short headers (units are in the title). At 80 columns the least needed give way first.
_STATS_COLUMNS = [
    Column("model"),
    Column("state"),
    Column("inst", "right", drop=6),
    Column("run", "right"),
    Column("queue", "right", drop=7),
    Column("req/s", "right"),
    Column("total", "right", drop=5),
    Column("ok%", "right"),
    Column("p50", "right", drop=1),
    Column("p95", "right", drop=8),
    Column("ttft50", "right", drop=9),
    Column("idle", "right", drop=2),
    Column("GB", "right", drop=4),
    Column("KV", "right", drop=3),
]


def stats_table(snapshot: dict[str, Any], width: int) -> RenderableType:
    """`stats.gather`'s snapshot: a row a model."""
    window = snapshot["window_seconds"]
    auto = snapshot.get("auto_sleep_enabled")
    idle = snapshot.get("idle_threshold_seconds")
    sleeping = f"auto-sleep after {idle:g}s idle" if auto and isinstance(idle, (int, float)) else "auto-sleep off"
    rows: list[list[Cell]] = []
    for model, row in snapshot["models"].items():
        state = row["state"]
        idle_text = uptime(row["idle_seconds"]) if isinstance(row["idle_seconds"], (int, float)) else "-"
        rows.append(
            [
                Text(model),
                Text(state, style=STATE_STYLE.get(state, "")),
                f"{row['instances_awake']}/{row['instances']}",
                _num(row["in_flight"]),
                _num(row["queued"]),
                _num(row["request_rate"], "{:.2f}"),
                _num(row["total_requests"]),
                _num(row["success_rate"], "{:.1f}"),
                _num(row["latency_p50_ms"], "{:.1f}"),
                _num(row["latency_p95_ms"], "{:.1f}"),
                _num(row["ttft_p50_ms"], "{:.1f}"),
                Text(idle_text, style="yellow" if row["sleep_candidate"] else ""),  # yellow: would be slept now
                _num(row["memory_gb"], "{:g}"),
                kv_cell(row.get("kv")),
            ]
        )
    title = f"kvctl stats — {snapshot['router']} — {window:g}s window, latency ms — {sleeping}"
    return _fit(_STATS_COLUMNS, rows, width, title, box.SIMPLE_HEAVY)


def stats_frame(reading: Reading, interval: float, width: int) -> RenderableType:
    """One redraw of `stats --live`: the table, or what went wrong above the last table seen."""
    if reading.error is None:
        assert reading.snapshot is not None  # a poll that did not fail gathered one
        return stats_table(reading.snapshot, width)
    from rich.panel import Panel

    title, message = reading.error
    since = f"; last data {time.time() - reading.at:.0f}s ago (below)" if reading.snapshot is not None else ""
    panel = Panel(Text(f"{message}\nretrying every {interval:g}s{since}", style="bold red"), title=title, border_style="red", expand=False)
    return Group(panel, stats_table(reading.snapshot, width)) if reading.snapshot is not None else panel


def live(console: Console, frames: Iterable[RenderableType]) -> None:
    """Draw each frame in place of the last, until `frames` ends (or KeyboardInterrupt)."""
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as view:
        for frame in frames:
            view.update(frame, refresh=True)


# --------------------------------------------------------------------------- bench


@contextmanager
def bench_progress(console: Console, spec: BenchSpec) -> Iterator[Callable[[Any, float], None]]:
    """A progress bar (done/total, or elapsed/duration); yields `bench.run`'s `on_tick`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    by_time = spec.requests is None
    columns = [
        TextColumn("[bold]bench"),
        BarColumn(),
        TextColumn("{task.fields[where]}"),
        TextColumn("[green]ok {task.fields[ok]}[/] [red]failed {task.fields[failed]}[/]"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("bench", total=spec.duration if by_time else spec.requests, ok=0, failed=0, where="")

        def tick(state: Any, elapsed: float) -> None:
            done = min(elapsed, spec.duration or 0.0) if by_time else state.done
            where = f"{done:.0f}/{spec.duration:g}s" if by_time else f"{state.done}/{spec.requests}"
            progress.update(task, completed=done, ok=state.done - state.failed, failed=state.failed, where=where)

        yield tick


def bench_report(result: dict[str, Any]) -> Group:
    """`bench.run`'s result: one row per model and one for all, then the first errors."""
    from kvctl.bench import PERCENTILES

    spec = result["spec"]
    mode = f"rate {spec['rate']:g}/s" if spec["rate"] is not None else f"concurrency {spec['concurrency']}"
    title = f"bench {spec['url']} — {spec['endpoint']}, {'stream' if spec['stream'] else 'no stream'}, {mode}, {result['duration_seconds']:.1f}s"
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold")
    for column in ("ok", "failed", "req/s", "tok/s"):
        table.add_column(column, justify="right", no_wrap=True)
    quantiles = " / ".join(f"p{q}" for q in PERCENTILES)
    for column in ("TTFT ms", "ITL ms", "E2E ms"):
        table.add_column(f"{column}\n{quantiles}", justify="right")
    rows = list(result["models"].items())
    if len(rows) > 1:
        rows.append(("[bold]overall[/]", result["overall"]))
    for name, m in rows:
        table.add_row(
            name,
            str(m["ok"]),
            f"[red]{m['failed']}[/]" if m["failed"] else "0",
            f"{m['request_rate']:.1f}",
            f"{m['output_tokens_per_second']:.0f}",
            *(" / ".join(_ms(m[key][f"p{q}"]) for q in PERCENTILES) for key in ("ttft_ms", "itl_ms", "e2e_latency_ms")),
        )
    parts: list[Any] = [table]
    for name, m in result["models"].items():
        for error in m["errors"]:
            parts.append(Text(f"{name}: {error['count']}× {error['message']}", style="red"))
    return Group(*parts)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}" if value >= 1000 else f"{value:.1f}"
