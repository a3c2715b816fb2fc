"""Where kvcached figures show that tests/test_kvcached.py does not look: `/traffic/stats` (per
model, replicas summed), the `kvctl stats` table's KV column (the frame `--live` redraws),
`kvctl kv list`'s table with a segment of no instance here, and `POST .../kv_limit` for admins
only. A real tree of sim engines; segments written raw, as kvcached's own tool writes them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import Tree, free_port, read_segment, sim_yaml, wait_for, write_segment

MiB = 2**20
T = uuid.uuid4().hex[:6]
KEY, ADMIN = "sk-views-key", "views-admin-token"
MODEL = f"org/pair{T}"


@pytest.fixture
def foreign() -> Iterator[str]:
    """A kvctl_* segment of no instance of this config (another tree's, say), written raw."""
    name = f"kvctl_foreign-{T}"
    write_segment(name, 3 * 2**30, 2**30)
    try:
        yield name
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)


def _replica(name: str, extra: str = "") -> str:
    # kvcached on; capacity 40 % of 1000 MiB = 400 MiB.
    return sim_yaml(name, free_port(), model=MODEL, extra=f"    engine_env: {{ENABLE_KVCACHED: 'true'}}\n    sim: {{memory_gb: {1000 / 1024}}}\n{extra}")


def test_model_sums_table_columns_other_segments_and_admin_only_limits(kvtree: Tree, foreign: str) -> None:
    one, two = f"r1.{T}", f"r2.{T}"
    kvtree.write(_replica(one) + _replica(two, "    kv_limit_gb: 0.25\n"), f"  api_keys: [{KEY}]\n  admin_token: {ADMIN}\n")
    up = kvtree.kvctl("up")
    assert up.returncode == 0, up.stderr + up.stdout
    wait_for(lambda: read_segment(f"kvctl_r2-{T}")[0] == 256 * MiB, what="kv_limit_gb applied")

    # /traffic/stats: the model's replicas together (400 + 256 MiB).
    stats = httpx.get(kvtree.router_url + "/traffic/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert stats["traffic_stats"][MODEL]["kv"] == {"used_bytes": 0, "limit_bytes": 656 * MiB, "prealloc_bytes": 0}

    # The stats table's KV column (used/limit GiB): 656 MiB = 0.64 GiB.
    table = kvtree.kvctl("stats")
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if line.split()[:1] == [MODEL]]
    assert "0.0/0.6G" in row.split()

    # `kvctl kv list`: this config's two instances, then the segment of none, as `(other)`.
    listing = kvtree.kvctl("kv", "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines() if line.strip()}
    assert rows[one][1:3] == [MODEL, f"kvctl_r1-{T}"] and rows[one][-2:] == ["0.39", "0"]
    assert rows[two][-2:] == ["0.25", "0"]
    assert rows["(other)"][1:] == [foreign, "1.00", "0.00", "3.00", "33"]

    # Setting a limit is an admin's: not with the api key, nor without credentials.
    url = kvtree.router_url + f"/models/{MODEL}/kv_limit"
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
        refused = httpx.post(url, json={"bytes": 100 * MiB}, headers=headers, timeout=5)
        assert refused.status_code in (401, 403) and "error" in refused.json()
    assert read_segment(f"kvctl_r1-{T}")[0] == 400 * MiB
    done = httpx.post(url, json={"percent": 50, "instance": one}, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    assert done.status_code == 200 and [i["limit_bytes"] for i in done.json()["instances"]] == [200 * MiB]
    assert (read_segment(f"kvctl_r1-{T}")[0], read_segment(f"kvctl_r2-{T}")[0]) == (200 * MiB, 256 * MiB)
