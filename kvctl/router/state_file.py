"""RUN_DIR/router-state.json: the router's record of which instances it put to sleep,
why and since when.

Engines that cannot say whether they sleep (SGLang) are reconciled from this file when
the router restarts, and every engine's sleep cause and start time survive a restart. It is replaced atomically (write a temporary file, then rename),
mode 0600, so a router killed mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Record:
    state: str  # "asleep" | "awake"
    cause: str | None = None  # why it sleeps: manual | idle | budget | policy
    since: float | None = None  # wall clock of the sleep


def read(path: Path) -> dict[str, Record]:
    """Instance name -> its record; empty when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            str(name): Record(str(entry["state"]), entry.get("cause"), entry.get("since"))
            for name, entry in data["instances"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write(path: Path, records: dict[str, Record]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps({"instances": {name: asdict(record) for name, record in sorted(records.items())}}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".router-state.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
