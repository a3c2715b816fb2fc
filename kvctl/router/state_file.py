"""RUN_DIR/router-state.json: the router's record of which instances it put to sleep,
why and since when.

Engines that cannot say whether they sleep (SGLang) are reconciled from this file when
the router restarts, and every engine's sleep cause and start time survive a restart. It is
replaced atomically (kvctl.files), so a router killed mid-write leaves the previous version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from kvctl.files import write_private

log = logging.getLogger("kvctl.router")


@dataclass(frozen=True)
class Record:
    state: str  # "asleep" | "awake" | "stopped"
    cause: str | None = None  # why it sleeps: manual | idle | budget | policy
    since: float | None = None  # wall clock of the sleep


def read(path: Path) -> dict[str, Record]:
    """Instance name -> its record; empty when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(name): Record(str(entry["state"]), entry.get("cause"), entry.get("since")) for name, entry in data["instances"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write(path: Path, records: dict[str, Record]) -> None:
    write_private(path, json.dumps({"instances": {name: asdict(record) for name, record in sorted(records.items())}}, indent=1))


class SleepStates:
    """The records of one run dir, read once; `save` rewrites the file when a record changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records = read(path)

    def get(self, name: str) -> Record | None:
        return self._records.get(name)

    def save(self, name: str, record: Record) -> None:
        if self._records.get(name) == record:
            return
        self._records[name] = record
        try:
            write(self.path, self._records)
        except OSError as exc:  # the router keeps serving; only a restart would lose the record
            log.warning("cannot write %s: %s", self.path, exc)
