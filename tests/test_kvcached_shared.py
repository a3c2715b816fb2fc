"""Segment names are per machine (/dev/shm/kvctl_NAME), not per tree: `kvctl up` refuses to
start a kvcached instance whose segment a live process of another tree (or no tree) uses, and
names who. Real trees of sim engines."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from helpers import Procs, Tree, free_port, sim_yaml, wait_for

T = uuid.uuid4().hex[:6]


def _kv_sim(name: str, port: int) -> str:
    return sim_yaml(name, port, extra="    engine_env: {ENABLE_KVCACHED: 'true'}\n")


def test_up_refuses_a_segment_another_tree_uses(kvtree: Tree) -> None:
    name = f"twin.{T}"
    segment = Path(f"/dev/shm/kvctl_twin-{T}")
    with Tree() as other:
        other.write(_kv_sim(name, free_port()))
        up = other.kvctl("up")
        assert up.returncode == 0, up.stderr + up.stdout
        assert segment.exists()

        kvtree.write(_kv_sim(name, free_port()) + _kv_sim(f"own{T}", free_port()))
        clash = kvtree.kvctl("up")
        assert clash.returncode == 1, clash.stdout + clash.stderr
        assert f"instance '{name}': its kvcached segment {segment} is in use by the kvctl tree of run dir {other.run_dir} (PID " in clash.stderr
        assert "segment names are per machine: rename the instance" in clash.stderr
        assert not (kvtree.run_dir / "supervisord.pid").exists()  # nothing was started

        again = other.kvctl("up")  # its own engine's segment is no clash
        assert again.returncode == 0, again.stderr + again.stdout
    assert not segment.exists()
    up = kvtree.kvctl("up")  # that tree is gone: the name is free
    assert up.returncode == 0, up.stderr + up.stdout


def test_up_refuses_a_segment_an_engine_outside_kvctl_uses(kvtree: Tree, procs: Procs) -> None:
    name = f"stray{T}"
    env = {**os.environ, "ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": f"kvctl_{name}"}
    stray = procs.start_sim("m", free_port(), env=env)
    wait_for(lambda: Path(f"/dev/shm/kvctl_{name}").exists(), what="the stray engine's segment")
    kvtree.write(_kv_sim(name, free_port()))
    clash = kvtree.kvctl("up")
    assert clash.returncode == 1
    assert f"is in use by PID {stray.pid} (not started by kvctl)" in clash.stderr
