"""RUN_DIR/starts/NAME.json: the launcher's record of an engine's start attempts (SPEC §16).

Written by the launcher (`kvctl.launch`), read by the router and the CLI; `kvctl up` and
`kvctl restart` reset it so the next start gets its full retries. No record means no failed
start since the last reset or healthy start. Standard library only: the launcher imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class StartRecord:
    failures: int = 0  # consecutive starts that never became healthy
    failed: bool = False  # the launcher gave up: the instance stays stopped
    reason: str = ""  # one line: exit status and the gist of the last log lines


def path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "starts" / f"{name}.json"


def read(run_dir: Path, name: str) -> StartRecord | None:
    try:
        data = json.loads(path(run_dir, name).read_text(encoding="utf-8"))
        return StartRecord(int(data.get("failures", 0)), bool(data.get("failed", False)), str(data.get("reason", "")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def write(run_dir: Path, name: str, record: StartRecord) -> None:
    """Replace the record atomically (0600 in a 0700 directory); readers never see half a file."""
    target = path(run_dir, name)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A unique temporary name: the launcher and `kvctl restart` may write at the same time.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(record), fh)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def reset(run_dir: Path, name: str) -> None:
    path(run_dir, name).unlink(missing_ok=True)
