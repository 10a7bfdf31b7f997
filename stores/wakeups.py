"""Wake-ups within one process: threads (greenlets) waiting for a task, and whoever subscribed to every end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Waiters:
    """Threads (greenlets) in this process waiting for a task; `wake` sets their events."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}
        self._subscribers: list[Callable[[str], None]] = []

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._subscribers.append(callback)

    @contextmanager
    def listen(self, task_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._events.get(task_id, set())
                events.discard(event)
                if not events:
                    self._events.pop(task_id, None)

    def wake(self, task_id: str) -> None:
        with self._lock:
            events = list(self._events.get(task_id, ()))
        for event in events:
            event.set()
        for callback in self._subscribers:
            callback(task_id)
