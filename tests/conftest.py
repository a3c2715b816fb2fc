"""Fixtures shared by the tests; every process a test starts is stopped here, even when it fails.

Plain helpers (ports, polling, the CLI runner, configs) live in helpers.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Procs, Router, Tree, router_process, start_engines, write_config


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as p:
        yield p


@pytest.fixture
def kvtree() -> Iterator[Tree]:
    """A config dir for the whole process tree; `kvctl down` (or SIGKILL) at teardown."""
    with Tree() as tree:
        yield tree


@pytest.fixture
def router(procs: Procs, tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """Starts sims for the given `instances:` entries and the real router in front of them
    (its log in tmp_path/router.log); `procs` stops them all."""

    def _start(instances: list[dict[str, Any]], **sections: Any) -> Router:
        config = write_config(tmp_path, instances, **sections)
        start_engines(procs, config)
        log = open(tmp_path / "router.log", "ab")  # noqa: SIM115 - kept open for the subprocess
        router_process(procs, config, stdout=log, stderr=subprocess.STDOUT)
        return Router(config)

    yield _start
