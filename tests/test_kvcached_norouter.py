"""`kvctl kv limit` without a router (SPEC §13: the protocol lets any process write the limit):
with `enable_router: false` or the router down, kvctl writes the segment itself and says so.
Real trees of sim engines; the segment's 24 bytes are read raw, as kvcached's own tool reads them."""

from __future__ import annotations

import json
import uuid

from helpers import Tree, free_port, read_segment, sim_yaml, wait_for

MiB = 2**20
T = uuid.uuid4().hex[:6]


def _kv_sim(name: str, port: int) -> str:
    # kvcached on, capacity 40 % of 1000 MiB = 400 MiB.
    return sim_yaml(name, port, extra=f"    engine_env: {{ENABLE_KVCACHED: 'true'}}\n    sim: {{memory_gb: {1000 / 1024}}}\n")


def test_without_a_router_the_segment_is_written_directly(kvtree: Tree) -> None:
    name, other = f"solo.{T}", f"plain{T}"
    segment = f"kvctl_solo-{T}"
    kvtree.write(_kv_sim(name, free_port()) + sim_yaml(other, free_port()), "  enable_router: false\n")
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    wait_for(lambda: read_segment(segment) == (400 * MiB, 0, 0), what="the engine's segment")
    assert [i["gpu_memory_bytes"] for i in kvtree.status()["instances"]] == [None, None]  # no NVML here: unknown

    limit = kvtree.kvctl("kv", "limit", "org/" + name, "200M")
    assert limit.returncode == 0, limit.stderr + limit.stdout
    assert read_segment(segment) == (200 * MiB, 0, 0)
    assert f"{name} org/{name}: kv limit 400 MiB -> 200 MiB (manual, written to /dev/shm/{segment}: no router (enable_router: false))" in limit.stdout
    assert _listed_limit(kvtree, segment) == 200 * MiB

    # What cannot be done without the router: one-line errors, nothing written.
    share = kvtree.kvctl("kv", "limit", "org/" + name, "50%")
    assert share.returncode == 2 and "a percentage needs it" in share.stderr and "Traceback" not in share.stderr
    assert read_segment(segment)[0] == 200 * MiB
    unknown = kvtree.kvctl("kv", "limit", "org/nothing", "1G")
    assert unknown.returncode == 2 and "model 'org/nothing' is not in" in unknown.stderr
    plain = kvtree.kvctl("kv", "limit", "org/" + other, "1G")
    assert plain.returncode == 2 and f"model 'org/{other}' has no kvcached instance" in plain.stderr
    wrong = kvtree.kvctl("kv", "limit", "org/" + name, "1G", "--instance", other)
    assert wrong.returncode == 2 and f"has no instance '{other}'" in wrong.stderr


def test_with_the_router_down_the_segment_is_written_directly(kvtree: Tree) -> None:
    name = f"down{T}"
    segment = f"kvctl_{name}"
    kvtree.write(_kv_sim(name, free_port()))
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    assert kvtree.kvctl("kv", "limit", "org/" + name, "50%").returncode == 0  # through the router: a share of the capacity
    assert read_segment(segment)[0] == 200 * MiB
    assert kvtree.supervisorctl("stop", "router").returncode == 0

    limit = kvtree.kvctl("kv", "limit", "org/" + name, "300M")
    assert limit.returncode == 0, limit.stderr + limit.stdout
    assert read_segment(segment)[0] == 300 * MiB
    assert f"kv limit 200 MiB -> 300 MiB (manual, written to /dev/shm/{segment}: router at {kvtree.router_url} is unreachable" in limit.stdout


def _listed_limit(tree: Tree, segment: str) -> int:
    listed = tree.kvctl("kv", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {row["segment"]: row for row in json.loads(listed.stdout)["segments"]}[segment]["kv"]["limit_bytes"]
