"""`kvctl stats`: per-model state, load, traffic and memory, read from the router's API.

`gather` joins three router answers (`/traffic/stats?window=`, `/models`, `/sleep/status`)
into one row per configured model, in config order; `render` draws it as a rich table;
`live` redraws it in place until Ctrl-C, showing (not raising) an unreachable router.
The JSON shape of `gather` is what `kvctl stats --json` prints (documented in README).
"""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from kvctl.client import RouterClient, RouterRequestError, RouterUnreachable, json_object
from kvctl.config import Config
from kvctl.tables import Cell, Column, fit


def gather(client: RouterClient, config: Config, window: float) -> dict[str, Any]:
    """One snapshot: {"router", "window_seconds", "auto_sleep_enabled", "idle_threshold_seconds", "models": {model: row}}."""
    traffic = json_object(client.get("/traffic/stats", window=f"{window:g}").get("traffic_stats"))
    models = json_object(client.get("/models").get("models"))
    sleep = json_object(client.get("/sleep/status"))
    candidates = set(sleep.get("sleep_candidates") or ())
    rows = {
        model: _row(model, instances, json_object(traffic.get(model)), json_object(models.get(model)), candidates)
        for model, instances in config.models().items()
    }
    return {
        "router": client.url,
        "window_seconds": window,
        "auto_sleep_enabled": sleep.get("auto_sleep_enabled"),
        "idle_threshold_seconds": sleep.get("idle_threshold_seconds"),
        "models": rows,
    }


def _row(model: str, configured: list[Any], traffic: dict[str, Any], info: dict[str, Any], candidates: set[str]) -> dict[str, Any]:
    instances = [i for i in info.get("instances") or () if isinstance(i, dict)]
    awake = [i for i in instances if i.get("state") == "awake"]
    # memory_gb comes from the config; it is "known" when any replica of the model declares it.
    memory = [i.get("memory_gb") for i in awake if isinstance(i.get("memory_gb"), (int, float))]
    declared = any(inst.memory_gb is not None for inst in configured)
    total = traffic.get("lifetime_total_requests", traffic.get("total_requests"))
    ok = traffic.get("lifetime_successful_requests", traffic.get("successful_requests"))
    failed = traffic.get("lifetime_failed_requests", traffic.get("failed_requests"))
    return {
        "state": info.get("state", "unknown"),
        "instances": len(instances) or len(configured),
        "instances_awake": len(awake),
        "in_flight": traffic.get("in_flight", sum(i.get("in_flight", 0) for i in instances)),
        "queued": traffic.get("queued", 0),
        "request_rate": traffic.get("request_rate"),
        "window_requests": traffic.get("total_requests"),
        "total_requests": total,
        "successful_requests": ok,
        "failed_requests": failed,
        "success_rate": 100.0 * ok / total if isinstance(ok, int) and isinstance(total, int) and total else None,
        "latency_p50_ms": _ms(traffic.get("p50_latency")),
        "latency_p95_ms": _ms(traffic.get("p95_latency")),
        "ttft_p50_ms": _ms(traffic.get("p50_ttft")),
        "idle_seconds": traffic.get("idle_time_seconds"),
        "sleep_candidate": model in candidates,
        "memory_gb": sum(memory) if declared else None,
        "kv": traffic.get("kv"),  # kvcached: {"used_bytes", "limit_bytes", "prealloc_bytes"} of its instances, or null
    }


def _ms(seconds: Any) -> float | None:
    return seconds * 1000 if isinstance(seconds, (int, float)) else None


# --------------------------------------------------------------------------- display


# Short headers (units are in the title). At 80 columns the least needed give way first.
_COLUMNS = [
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


def render(snapshot: dict[str, Any], width: int) -> RenderableType:
    from kvctl.cli import _STATE_STYLE, _kv_cell, _uptime  # the CLI's colours and formats, shared

    window = snapshot["window_seconds"]
    auto = snapshot.get("auto_sleep_enabled")
    idle = snapshot.get("idle_threshold_seconds")
    sleeping = f"auto-sleep after {idle:g}s idle" if auto and isinstance(idle, (int, float)) else "auto-sleep off"
    rows: list[list[Cell]] = []
    for model, row in snapshot["models"].items():
        state = row["state"]
        idle_text = _uptime(row["idle_seconds"]) if isinstance(row["idle_seconds"], (int, float)) else "-"
        rows.append(
            [
                Text(model),
                Text(state, style=_STATE_STYLE.get(state, "")),
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
                _kv_cell(row.get("kv")),
            ]
        )
    title = Text(f"kvctl stats — {snapshot['router']} — {window:g}s window, latency ms — {sleeping}")
    return fit(_COLUMNS, rows, width, title=title, title_justify="left", box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True)


def _num(value: Any, fmt: str = "{}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def live(client: RouterClient, config: Config, window: float, interval: float, console: Console) -> None:
    """Redraw every `interval` seconds until KeyboardInterrupt (which the caller turns into exit 0)."""
    last: dict[str, Any] | None = None
    last_at = 0.0
    with Live(console=console, auto_refresh=False) as display:
        while True:
            try:
                last, last_at = gather(client, config, window), time.time()
                view: RenderableType = render(last, console.width)
            except RouterUnreachable as exc:
                view = _trouble("router unreachable", str(exc), last, last_at, interval, console.width)
            except RouterRequestError as exc:
                view = _trouble("router error", str(exc), last, last_at, interval, console.width)
            display.update(view, refresh=True)
            time.sleep(interval)  # the refresh period itself, not a wait for a condition


def _trouble(title: str, message: str, last: dict[str, Any] | None, last_at: float, interval: float, width: int) -> RenderableType:
    since = f"; last data {time.time() - last_at:.0f}s ago (below)" if last is not None else ""
    panel = Panel(Text(f"{message}\nretrying every {interval:g}s{since}", style="bold red"), title=title, border_style="red", expand=False)
    return Group(panel, render(last, width)) if last is not None else panel
