"""kvcached's KV-cache segments (SPEC §13): the protocol module against segments made here,
the simulated engine's side, and end to end with real trees of sims."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Procs, free_port, wait_for
from kvctl import kvcached

GiB = 2**30
MiB = 2**20


def raw(name: str) -> tuple[int, int, int]:
    """The segment's 24 bytes read as kvcached's own tool reads them (not through kvctl)."""
    with open(f"/dev/shm/{name}", "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        return struct.unpack("=qqq", fh.read(24))


def write_raw(name: str, limit: int, used: int = 0, prealloc: int = 0) -> None:
    """Another writer of the protocol (an engine, kvcached's `kvctl limit`): exclusive lock, 24 bytes."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 24)
        os.pwrite(fd, struct.pack("=qqq", limit, used, prealloc), 0)
    finally:
        os.close(fd)


@pytest.fixture
def segment_name() -> Iterator[str]:
    name = f"kvctl_test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the protocol module


def test_read_a_segment_written_by_another_writer(segment_name: str) -> None:
    assert kvcached.read(segment_name) is None  # missing = unknown, not an error
    write_raw(segment_name, 3 * GiB, 512 * MiB, 64 * MiB)
    info = kvcached.read(segment_name)
    assert info == kvcached.KvInfo(limit_bytes=3 * GiB, used_bytes=512 * MiB, prealloc_bytes=64 * MiB)
    assert info.held_bytes == 576 * MiB
    assert info.as_json() == {"used_bytes": 512 * MiB, "limit_bytes": 3 * GiB, "prealloc_bytes": 64 * MiB}


def test_write_limit_changes_only_the_limit_and_never_creates(segment_name: str) -> None:
    assert kvcached.write_limit(segment_name, GiB) is None
    assert not Path(f"/dev/shm/{segment_name}").exists()
    write_raw(segment_name, 4 * GiB, 3 * GiB, 5)
    before = kvcached.write_limit(segment_name, GiB)  # below `used`: written as asked, not clamped
    assert before is not None and before.limit_bytes == 4 * GiB
    assert raw(segment_name) == (GiB, 3 * GiB, 5)
    with pytest.raises(ValueError):
        kvcached.write_limit(segment_name, -1)


def test_a_writer_waits_for_a_reader_lock(segment_name: str) -> None:
    """Writers take the exclusive lock: while a reader holds the shared one, the limit stays."""
    write_raw(segment_name, 2 * GiB)
    done = threading.Event()
    with open(f"/dev/shm/{segment_name}", "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        writer = threading.Thread(target=lambda: (kvcached.write_limit(segment_name, GiB), done.set()))
        writer.start()
        assert not done.wait(0.3)  # blocked behind the reader
        assert raw(segment_name)[0] == 2 * GiB
        fcntl.flock(fh, fcntl.LOCK_UN)
    writer.join(5)
    assert done.is_set() and raw(segment_name)[0] == GiB


def test_short_or_foreign_files_are_unknown(segment_name: str) -> None:
    Path(f"/dev/shm/{segment_name}").write_bytes(b"short")
    assert kvcached.read(segment_name) is None
    assert kvcached.write_limit(segment_name, GiB) is None
    assert segment_name not in kvcached.list_owned()


def test_list_owned_and_remove(segment_name: str) -> None:
    write_raw(segment_name, GiB, 1, 2)
    owned = kvcached.list_owned()
    assert owned[segment_name] == kvcached.KvInfo(GiB, 1, 2)
    assert all(name.startswith("kvctl_") for name in owned)
    assert kvcached.remove(segment_name) is True
    assert kvcached.remove(segment_name) is False
    assert segment_name not in kvcached.list_owned()


def test_names_survive_kvcacheds_sanitizer() -> None:
    from kvctl.config import kvcached_ipc_name

    assert kvcached.sanitize("kvctl_llama-3.2-1b") == "kvctl_llama-3-2-1b"
    for name in ("llama-3.2-1b", "a.b_c-d", "x" * 80, "Qwen3.0"):
        ipc = kvcached_ipc_name(name)
        assert kvcached.sanitize(ipc) == ipc and len(ipc) <= 64
    assert kvcached.enabled({"ENABLE_KVCACHED": "true"}) and not kvcached.enabled({"ENABLE_KVCACHED": "false"}) and not kvcached.enabled({})
    assert kvcached.segment_name({"KVCACHED_IPC_NAME": "kvctl_a.b"}) == "kvctl_a-b"


def test_engine_side_segment(segment_name: str) -> None:
    seg = kvcached.Segment(segment_name, 4 * GiB)
    assert raw(segment_name) == (4 * GiB, 0, 0)
    assert os.stat(f"/dev/shm/{segment_name}").st_mode & 0o777 == 0o600
    seg.set_usage(GiB, 2)
    assert raw(segment_name) == (4 * GiB, GiB, 2)
    write_raw(segment_name, GiB, GiB, 2)
    assert seg.limit() == GiB
    seg.remove()
    assert not Path(f"/dev/shm/{segment_name}").exists()


# --------------------------------------------------------------------------- the simulated engine


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in {url}/metrics")


def test_sim_speaks_the_protocol(procs: Procs, segment_name: str) -> None:
    """Segment at start (40 % of --memory-gb), used tracks running requests, a request that
    does not fit waits inside the engine, sleep frees all KV, the segment goes at exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": segment_name}
    # 1 MiB per token; each request reserves 100 prompt words + 20 tokens = 120 MiB; capacity 400 MiB -> 3 fit.
    proc = procs.start_sim("m", port, "--memory-gb", str(1000 / 1024), "--kv-bytes-per-token", str(MiB), "--tokens-per-second", "10", env=env)
    wait_for(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, what="sim up")
    assert raw(segment_name) == (400 * MiB, 0, 0)
    results: list[int] = []
    body = {"model": "m", "prompt": "w " * 100, "max_tokens": 20}
    threads = [threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code)) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: _metric(url, "vllm:num_requests_waiting") == 2 and _metric(url, "vllm:num_requests_running") == 3, what="3 running, 2 waiting")
    wait_for(lambda: raw(segment_name)[1] > 300 * MiB, what="used grows with prompts and tokens")
    assert raw(segment_name)[1] <= 360 * MiB
    for t in threads:
        t.join(60)
    assert results == [200] * 5
    assert raw(segment_name)[1] == 0

    # Sleep frees every byte of KV, also that of a request paused by the sleep (mode=keep).
    paused = threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code))
    paused.start()
    wait_for(lambda: raw(segment_name)[1] > 0, what="a running request holds KV")
    assert httpx.post(url + "/sleep", params={"level": 1, "mode": "keep"}, timeout=10).status_code == 200
    assert raw(segment_name)[1] == 0
    assert httpx.post(url + "/wake_up", timeout=10).status_code == 200
    assert raw(segment_name)[1] > 0
    paused.join(60)
    assert results == [200] * 6 and raw(segment_name)[1] == 0
    proc.terminate()
    proc.wait(10)
    assert not Path(f"/dev/shm/{segment_name}").exists()


# --------------------------------------------------------------------------- config


def test_config_keys_and_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kvctl import config as config_mod
    from kvctl.errors import ConfigError

    def conf(instance: str = "", sleep_manager: str = "") -> Path:
        path = tmp_path / "kvctl.yaml"
        path.write_text(f"sleep_manager:\n  check_interval_seconds: 1\n{sleep_manager}instances:\n"
                        f"  - name: a.b\n    model: m\n    engine: sim\n    port: 9\n    engine_env: {{ENABLE_KVCACHED: 'true'}}\n{instance}")
        return path

    good = config_mod.load(conf("    kv_limit_gb: 1.5\n    sim: {kv_bytes_per_token: 4096}\n",
                                "  kv_rebalance: true\n  kv_budget_gb: 4\n  kv_min_gb: 1\n"))
    inst = good.instances[0]
    assert (inst.kv_limit_gb, inst.sim.kv_bytes_per_token, inst.env["KVCACHED_IPC_NAME"]) == (1.5, 4096, "kvctl_a-b")
    assert (good.sleep_manager.kv_rebalance, good.sleep_manager.kv_budget_gb, good.sleep_manager.kv_min_gb) == (True, 4.0, 1.0)
    from kvctl.engines import adapter_for

    assert adapter_for(inst).command(inst)[-2:] == ["--kv-bytes-per-token", "4096"]

    with pytest.raises(ConfigError) as bad:
        config_mod.load(conf(sleep_manager="  kv_rebalance: true\n"))
    assert "kv_rebalance: needs sleep_manager.kv_budget_gb" in bad.value.problems[0]
    with pytest.raises(ConfigError) as bad:
        config_mod.load(conf(sleep_manager="  kv_budget_gb: 1\n  kv_min_gb: 2\n"))
    assert "kv_min_gb: 2 is more than kv_budget_gb 1" in bad.value.problems[0]

    # Without NVML and a GPU (this machine), `memory_gb: auto` is an error at the key, exit 2.
    path = conf("    memory_gb: auto\n")
    check = subprocess.run([sys.executable, "-m", "kvctl", "config", "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 2
    assert f"{path}:9:16: memory_gb: 'auto' needs each engine's GPU memory from NVML" in check.stderr
