"""State changes as events (SPEC §11): kept in a bounded history and fanned out to
`GET /events` subscribers.

A subscriber that does not keep up loses its oldest undelivered events rather than
growing the router's memory: each has a bounded queue, and a full queue drops.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

HISTORY = 256
_SUBSCRIBER_QUEUE = 1024


@dataclass(frozen=True)
class Event:
    instance: str
    model: str
    from_state: str
    to_state: str
    cause: str
    duration_seconds: float | None = None  # of the engine call, for sleeps and wakes
    time: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_state")
        data["to"] = data.pop("to_state")
        return data


class EventBus:
    def __init__(self) -> None:
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(_SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)


def first_line(error: Exception) -> str:
    """An error as an event's cause: its first line, bounded."""
    lines = str(error).splitlines()
    return lines[0][:300] if lines else type(error).__name__
