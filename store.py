"""Where the service keeps users' last images and the tasks it created.

`MemoryStore` keeps them in this process; a Redis store implements the same methods
for several processes. The store knows nothing of HTTP or of the upstream's wire format.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

TASK_TTL = 24 * 3600
MAX_TASKS = 100_000


@dataclass(frozen=True)
class TaskRecord:
    """A task this service created, and what became of it."""

    task_id: str
    key_number: int
    user_id: str | None
    mode: str
    source_image_urls: tuple[str, ...]
    used_previous_image: bool
    created_at: float
    sequence: int = 0  # order of submission, given by the store
    state: str = "pending"
    image_urls: tuple[str, ...] = ()
    error_message: str | None = None
    completed_at: float | None = None


@dataclass(frozen=True)
class Remembered:
    image_url: str
    updated_at: float


class Store(Protocol):
    name: str

    def remembered_image(self, user_id: str) -> Remembered | None: ...
    def forget(self, user_id: str) -> None: ...
    def add_task(self, record: TaskRecord) -> TaskRecord: ...
    def task(self, task_id: str) -> TaskRecord | None: ...
    def complete_task(
        self, task_id: str, state: str, image_urls: tuple[str, ...], error_message: str | None
    ) -> TaskRecord | None: ...
    def claim_poll(self, task_id: str, interval: float) -> bool: ...


@dataclass(frozen=True)
class _HistoryEntry:
    image_url: str | None  # None after the user asked to forget: the sequence still bars older results
    sequence: int
    updated_at: float


class MemoryStore:
    """Thread-safe, bounded in-memory store for one process."""

    name = "memory"

    def __init__(self, history_ttl: float, max_users: int, clock: Callable[[], float] = time.time):
        self.history_ttl = history_ttl
        self.max_users = max_users
        self.clock = clock
        self._lock = threading.Lock()
        self._history: OrderedDict[str, _HistoryEntry] = OrderedDict()
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self._last_poll: dict[str, float] = {}
        self._sequence = 0

    def remembered_image(self, user_id: str) -> Remembered | None:
        """The user's last image, unless it expired or was forgotten."""
        with self._lock:
            entry = self._live_entry(user_id)
            if entry is None or entry.image_url is None:
                return None
            return Remembered(entry.image_url, entry.updated_at)

    def forget(self, user_id: str) -> None:
        """Forget the user's image; results of tasks submitted before now stay forgotten too."""
        with self._lock:
            self._remember(user_id, _HistoryEntry(None, self._sequence, self.clock()))

    def add_task(self, record: TaskRecord) -> TaskRecord:
        """Record a new task, giving it the next sequence number."""
        with self._lock:
            self._drop_old_tasks()
            self._sequence += 1
            record = replace(record, sequence=self._sequence)
            self._tasks[record.task_id] = record
            return record

    def task(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._tasks.get(task_id)

    def complete_task(
        self, task_id: str, state: str, image_urls: tuple[str, ...] = (), error_message: str | None = None
    ) -> TaskRecord | None:
        """Record a task's end once; a success becomes the user's image unless a later task's already did."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.state != "pending":
                return record
            record = replace(
                record, state=state, image_urls=image_urls, error_message=error_message, completed_at=self.clock()
            )
            self._tasks[task_id] = record
            if state == "success" and record.user_id is not None:
                entry = self._live_entry(record.user_id)
                if entry is None or entry.sequence < record.sequence:
                    self._remember(record.user_id, _HistoryEntry(image_urls[0], record.sequence, self.clock()))
            return record

    def claim_poll(self, task_id: str, interval: float) -> bool:
        """True at most once per `interval` seconds for a task: whoever gets it may ask the upstream."""
        with self._lock:
            now = self.clock()
            if now - self._last_poll.get(task_id, float("-inf")) < interval:
                return False
            self._last_poll[task_id] = now
            return True

    def _live_entry(self, user_id: str) -> _HistoryEntry | None:
        entry = self._history.get(user_id)
        if entry is None:
            return None
        if self.clock() - entry.updated_at >= self.history_ttl:
            del self._history[user_id]
            return None
        self._history.move_to_end(user_id)
        return entry

    def _remember(self, user_id: str, entry: _HistoryEntry) -> None:
        self._history[user_id] = entry
        self._history.move_to_end(user_id)
        while len(self._history) > self.max_users:
            self._history.popitem(last=False)

    def _drop_old_tasks(self) -> None:
        # Tasks are kept in submission order, so the oldest are always at the front.
        cutoff = self.clock() - TASK_TTL
        while self._tasks:
            oldest = next(iter(self._tasks.values()))
            if oldest.created_at > cutoff and len(self._tasks) < MAX_TASKS:
                break
            self._tasks.popitem(last=False)
            self._last_poll.pop(oldest.task_id, None)
