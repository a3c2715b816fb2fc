"""RUN_DIR/router-state.json: the router's record of which instances it put to sleep.

Engines that cannot say whether they sleep (SGLang) are reconciled from this file when
the router restarts. It is replaced atomically (write a temporary file, then rename),
mode 0600, so a router killed mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def read(path: Path) -> dict[str, str]:
    """Instance name -> "asleep" | "awake"; empty when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        states = data["instances"]
        return {str(name): str(entry["state"]) for name, entry in states.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write(path: Path, states: dict[str, str]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps({"instances": {name: {"state": state} for name, state in sorted(states.items())}}, indent=1)
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
