"""The poll schedule: when each followed task is to be asked about next, kept in one heap by one thread.

A thousand waiting tasks cost one sleeping thread, not a thousand: the thread sleeps until the
earliest task is due, then hands every due one to `ask` in short work of its own (a slow answer
holds up nobody), and sleeps again. Adding a task that is due sooner wakes it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from background import Background

MAX_PAUSE = 60.0  # the schedule looks again at least this often

Item = TypeVar("Item")


class PollSchedule(Generic[Item]):
    def __init__(
        self,
        background: Background,
        ask: Callable[[Item], None],
        is_over: Callable[[Item], bool],
        clock: Callable[[], float] = time.time,
    ):
        """`ask(item)` runs when the item is due, unless `is_over(item)` says it no longer needs asking."""
        self.background = background
        self.ask = ask
        self.is_over = is_over
        self.clock = clock
        self._heap: list[tuple[float, int, Item]] = []
        self._order = itertools.count()  # equal times keep the order they came in
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._started = False

    def add(self, item: Item, when: float) -> None:
        """Ask about `item` at `when` (wall clock); the thread starts with the first item."""
        with self._lock:
            if self.background.stopping.is_set():
                return
            heapq.heappush(self._heap, (when, next(self._order), item))
            sooner = self._heap[0][2] is item
            if not self._started:
                self._started = True
                self.background.loop("polls", self._run, wake=self._changed.set)
        if sooner:
            self._changed.set()

    def due(self, now: float) -> tuple[list[Item], float]:
        """The items whose turn has come (taken off the schedule), and seconds until the next one's."""
        due = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                item = heapq.heappop(self._heap)[2]
                if not self.is_over(item):
                    due.append(item)
            pause = self._heap[0][0] - now if self._heap else MAX_PAUSE
        return due, min(pause, MAX_PAUSE)

    def __len__(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            self._changed.clear()
            if self.background.stopping.is_set():  # checked after clear(): a wake to stop is never lost
                return
            due, pause = self.due(self.clock())
            for item in due:
                self.background.spawn(self.ask, item)
            self._changed.wait(pause)
