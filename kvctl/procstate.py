"""RUN_DIR/starts/NAME.json: the launcher's record of an engine's start attempts (SPEC §16).

Written by the launcher (`kvctl.launch`), read by the router and the CLI; `kvctl up` and
`kvctl restart` reset it so the next start gets its full retries. No record means no failed
start since the last reset or healthy start. Standard library only: the launcher imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kvctl.files import write_private


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
    write_private(path(run_dir, name), json.dumps(asdict(record)))


def reset(run_dir: Path, name: str) -> None:
    path(run_dir, name).unlink(missing_ok=True)
