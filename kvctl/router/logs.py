"""The router's log (SPEC §11): what it decided and why, one line per event.

supervisord captures the router's stderr into RUN_DIR/logs/router.log, so the router
logs to stderr: a timestamp, a level and a message (`text`), or one JSON object per line
with the same fields plus the event's own (`json`, for log shippers). Loggers:
``kvctl.router`` (decisions: state changes, reloads, failed engine calls) and
``kvctl.access`` (one line per finished request). Nothing here ever formats a secret:
callers pass names, states, causes and numbers only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ROUTER_LOGGER = "kvctl.router"
ACCESS_LOGGER = "kvctl.access"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

access_log = logging.getLogger(ACCESS_LOGGER)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_FORMATTERS = {"text": _TextFormatter, "json": _JsonFormatter}
_handler: logging.Handler | None = None


def configure(level: str, fmt: str, access: bool) -> None:
    """Route kvctl's and uvicorn's loggers to stderr in the chosen format; callable again on reload."""
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        for name in ("kvctl", "uvicorn", "uvicorn.error", "asyncio"):
            logger = logging.getLogger(name)
            logger.handlers = [_handler]
            logger.propagate = False
    _handler.setFormatter(_FORMATTERS[fmt]())
    logging.getLogger("kvctl").setLevel(LEVELS[level])
    logging.getLogger("uvicorn.error").setLevel(max(LEVELS[level], logging.INFO))
    # The access log is ours (with model, TTFT and request id); uvicorn's stays off.
    access_log.disabled = not access


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a record whose JSON form carries these fields."""
    return {"fields": values}
