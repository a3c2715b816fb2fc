"""Helpers shared by the lifecycle tests: configs of sim engines, starting them, asking them."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kvctl.config import Config, Instance, load
from kvctl.engines import adapter_for

from conftest import Procs, free_port, wait_http_ok


def sim_instance(
    model: str, *, name: str | None = None, dialect: str = "vllm", memory_gb: float | None = None, sleep: dict[str, Any] | None = None, **sim: Any
) -> dict[str, Any]:
    """One `instances:` entry for a sim engine on a free port."""
    entry: dict[str, Any] = {"model": model, "engine": "sim", "port": free_port(), "sim": {"dialect": dialect, **sim}}
    if name:
        entry["name"] = name
    if memory_gb is not None:
        entry["memory_gb"] = memory_gb
    if sleep is not None:
        entry["sleep"] = sleep
    if dialect == "sglang":
        entry["engine_args"] = ["--enable-memory-saver"]
    return entry


def write_config(
    tmp_path: Path, instances: list[dict[str, Any]], *, sleep_manager: dict[str, Any] | None = None, router: dict[str, Any] | None = None
) -> Config:
    """Write a kvctl.yaml (JSON is YAML) and load it through the real loader."""
    data = {
        "router": {"router_port": free_port(), "health_check_interval_seconds": 0.2, **(router or {})},
        "sleep_manager": {"wake_timeout_seconds": 20, "drain_timeout_seconds": 10, **(sleep_manager or {})},
        "run_dir": str(tmp_path / "run"),
        "instances": instances,
    }
    path = tmp_path / "kvctl.yaml"
    path.write_text(json.dumps(data, indent=1))
    return load(path)


def start_engine(procs: Procs, inst: Instance) -> None:
    argv = adapter_for(inst).command(inst)
    assert argv[0] == sys.executable or argv[0].endswith("python")
    procs.start(argv)
    wait_http_ok(inst.url + "/health")


def start_engines(procs: Procs, config: Config) -> None:
    for inst in config.instances:
        procs.start(adapter_for(inst).command(inst))
    for inst in config.instances:
        wait_http_ok(inst.url + "/health")


def sim_state(inst: Instance) -> dict[str, Any]:
    response = httpx.get(inst.url + "/sim/state", timeout=5)
    response.raise_for_status()
    return response.json()


async def until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """wait_for for async tests: polls without blocking the event loop the lifecycle runs on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def asim_state(inst: Instance) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(inst.url + "/sim/state", timeout=5)
        response.raise_for_status()
        return response.json()
