"""`memory_gb: auto` (SPEC §13): the budget counts each engine's GPU memory as NVML measures it.

No GPU here: tests/fake_nvml/pynvml.py stands in for nvidia-ml-py (as the sim stands in for
engines) on the tree's PYTHONPATH, reporting per-PID GPU memory from a file the test writes.
kvctl's own code (config check, kvctl/gpu.py, the router's budget, `kvctl status`) is the real one.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from helpers import Tree, engine_pid, free_port, kvctl, sim_yaml, wait_for

GiB = 2**30
FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"
T = uuid.uuid4().hex[:6]
AUTO, DECLARED, WAKER = f"auto{T}", f"declared{T}", f"waker{T}"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The fake NVML for every kvctl process the test starts (and the tree they start); the
    file of per-PID figures it reads. Requested before `kvtree`, so `down` at teardown sees it."""
    figures = tmp_path / "nvml.json"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FAKE_NVML), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("KVCTL_FAKE_NVML", str(figures))
    return figures


def _report(figures: Path, by_pid: dict[int, int]) -> None:
    """What the fake GPU reports from now on (renamed into place: never read half-written)."""
    part = figures.with_suffix(".part")
    part.write_text(json.dumps({str(pid): used for pid, used in by_pid.items()}))
    part.replace(figures)


def _states(tree: Tree) -> dict[str, tuple[str, str | None]]:
    models = httpx.get(tree.router_url + "/models", timeout=5).json()["models"]
    return {inst["name"]: (inst["state"], inst.get("cause")) for m in models.values() for inst in m["instances"]}


def test_config_check_takes_auto_when_nvml_sees_a_gpu(nvml: Path, tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("instances:\n" + sim_yaml("a", 9001, extra="    memory_gb: auto\n"))
    assert kvctl("config", "check", "-c", str(path)).returncode == 0
    # nvidia-ml-py there but no driver: an error at the key saying why, exit 2.
    broken = kvctl("config", "check", "-c", str(path), env={"KVCTL_FAKE_NVML": ""})
    assert broken.returncode == 2
    assert (
        f"{path}:7:16: memory_gb: 'auto' needs each engine's GPU memory from NVML, which is not available here (NVML cannot start: Driver Not Loaded)"
        in broken.stderr
    )


def test_budget_follows_the_measured_gpu_memory(nvml: Path, kvtree: Tree) -> None:
    """Budget 8 GB: `auto` (priority 0, slept first), `declared` 4 GB, `waker` 3 GB asleep. Waking
    `waker` fits while `auto` measures 0.5 GiB; once it measures 4 GiB the same wake puts it to sleep."""
    ports = [free_port() for _ in range(3)]
    kvtree.write(
        sim_yaml(AUTO, ports[0], extra="    memory_gb: auto\n    sleep: {priority: 0}\n")
        + sim_yaml(DECLARED, ports[1], extra="    memory_gb: 4\n    sleep: {priority: 1}\n")
        + sim_yaml(WAKER, ports[2], extra="    memory_gb: 3\n    sleep: {start: asleep, priority: 1}\n"),
        "sleep_manager:\n  memory_budget_gb: 8\n",
    )
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    wait_for(lambda: {n: s for n, (s, _) in _states(kvtree).items()} == {AUTO: "awake", DECLARED: "awake", WAKER: "asleep"}, what="waker asleep")
    engine = engine_pid(kvtree.pids()[AUTO])

    # `kvctl status` shows each engine tree's GPU memory (NVML per process).
    _report(nvml, {engine: GiB // 2})
    status = {i["name"]: i for i in kvtree.status()["instances"]}
    assert (status[AUTO]["gpu_memory_bytes"], status[DECLARED]["gpu_memory_bytes"]) == (GiB // 2, 0)
    assert "0.5G" in kvtree.kvctl("status").stdout

    # 0.5 + 4 + 3 <= 8: the wake fits, nobody is slept.
    assert kvtree.kvctl("wake", "org/" + WAKER).returncode == 0
    assert {n: s for n, (s, _) in _states(kvtree).items()} == {AUTO: "awake", DECLARED: "awake", WAKER: "awake"}
    assert kvtree.kvctl("sleep", "org/" + WAKER).returncode == 0

    # 4 + 4 + 3 > 8: the same wake puts `auto` to sleep for the budget (its priority is lowest).
    _report(nvml, {engine: 4 * GiB})
    wake = kvtree.kvctl("wake", "org/" + WAKER)
    assert wake.returncode == 0, wake.stderr + wake.stdout
    wait_for(lambda: _states(kvtree)[AUTO] == ("asleep", "budget"), what="auto slept for the budget")
    assert (_states(kvtree)[DECLARED][0], _states(kvtree)[WAKER][0]) == ("awake", "awake")
