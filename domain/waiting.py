"""Who waits here for which task, and how they hear of its end.

A caller waits on a `Following`: a task this process follows (it took the task's turn, or took the task
over), or one it only watches (the task is queued, or another process took its turn). An end recorded in
this process answers its callers at once. An end recorded by another process arrives as the store's
notification, or, should that be lost, with a look in the store every WATCH_EVERY seconds (a `Watch` in the
poll schedule). A caller of a task this process neither follows nor watches waits on the store alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from background import Background
from errors import StoreUnavailable
from nanobanana_client import NanoBananaError
from stores.interface import Store
from stores.records import TaskRecord, TaskState

log = logging.getLogger(__name__)

WAITING = (TaskState.QUEUED, TaskState.PENDING)  # states a caller waits through
WATCH_EVERY = 10.0  # seconds between two looks in the store at a task waited for here but followed elsewhere


@dataclass
class Following:
    """A task followed by this process, or only watched: requests for it wait on `ended`."""

    record: TaskRecord
    ended: threading.Event = field(default_factory=threading.Event)
    refusal: NanoBananaError | None = None  # the upstream refused the submission: nothing was made
    watching: bool = False  # only waited for here: its end comes by a notification, or a look in the store
    watches: int = 0  # Watches scheduled for it; only the latest one is alive


@dataclass(frozen=True)
class Watch:
    """A look in the store at a watched task, in the poll schedule: in case the notification of its end is lost."""

    following: Following
    number: int  # of the Watches of the task: an earlier one is dropped


class Waiting:
    def __init__(self, store: Store, background: Background, schedule: Callable[[Watch, float], None]):
        """`schedule(watch, when)` puts a look in the store at a watched task into the poll schedule."""
        self.store = store
        self.background = background
        self.schedule = schedule
        self._following: dict[str, Following] = {}
        self._lock = threading.Lock()
        store.on_notify(self._woken)

    def in_line(self, record: TaskRecord) -> Following | None:
        """A task just queued here: its caller waits here, whichever process takes its turn (this one may have
        taken it already). None when this process is stopping."""
        with self._lock:
            if self.background.stopping.is_set():
                return None
            following = self._following.setdefault(record.task_id, Following(record, watching=True))
            watching = following.watching
        if watching:
            self._schedule_watch(following)
        return following

    def own(self, record: TaskRecord) -> Following | None:
        """Follow a task from here on (its turn was taken here, or it was taken over); None if it already is,
        or if this process is stopping."""
        with self._lock:
            if self.background.stopping.is_set():
                return None
            following = self._following.get(record.task_id)
            if following is None:
                following = self._following[record.task_id] = Following(record)
            elif not following.watching:
                return None
            following.record, following.watching = record, False
        return following

    def watch(self, following: Following, record: TaskRecord) -> None:
        """A task followed here is no longer this process's (it went back to the queue): from now on it is only
        watched."""
        following.record, following.watching = record, True
        self._schedule_watch(following)

    def release(self, following: Following) -> None:
        """The task ended (or this process stops following it): whoever waits is answered with its record."""
        with self._lock:
            self._following.pop(following.record.task_id, None)
        following.ended.set()

    def adopt(self, stored: TaskRecord) -> None:
        """A task followed or watched here ended elsewhere (or its end was recorded here by another path)."""
        following = self._following.get(stored.task_id)
        if following is not None and stored.state not in WAITING:
            following.record = stored
            self.release(following)

    def look_again(self, following: Following) -> None:
        """A watched task: its end is looked up in the store, in case its notification was lost."""
        try:
            stored = self.store.task(following.record.task_id)
        except StoreUnavailable:
            stored = None
        if stored is not None and stored.state not in WAITING:
            self.adopt(stored)
        elif not following.ended.is_set():
            following.record = stored or following.record
            self._schedule_watch(following)

    def answer_all(self) -> None:
        """Stopping: whoever still waits gets the task as it stands."""
        with self._lock:
            followed = list(self._following.values())
        for following in followed:
            following.ended.set()

    def until_ended(self, record: TaskRecord, deadline: float, following: Following | None = None) -> TaskRecord:
        """The task as it stands when it ends or the caller's wait runs out, whichever comes first; a refusal of
        its submission is raised."""
        following = following or self._following.get(record.task_id)
        if following is None:
            return self._until_ended_in_store(record, deadline)
        following.ended.wait(max(0.0, deadline - time.monotonic()))
        if following.refusal is not None:
            raise following.refusal
        if following.watching and not following.ended.is_set():  # how it stands may have changed elsewhere
            try:
                return self.store.task(following.record.task_id) or following.record
            except StoreUnavailable:
                return following.record
        return following.record

    def _until_ended_in_store(self, record: TaskRecord, deadline: float) -> TaskRecord:
        """Wait for a task another process follows: its end is in the store, and a notification says when (looked up
        every WATCH_EVERY seconds too, in case a notification was lost)."""
        with self.store.listen(record.task_id) as woken:
            current = self.store.task(record.task_id) or record
            while current.state in WAITING and (left := deadline - time.monotonic()) > 0:
                if woken.wait(min(left, WATCH_EVERY)):
                    woken.clear()
                current = self.store.task(record.task_id) or current
        return current

    def _schedule_watch(self, following: Following) -> None:
        following.watches += 1
        self.schedule(Watch(following, following.watches), time.time() + WATCH_EVERY)

    def _woken(self, task_id: str) -> None:
        """Some process says the task ended (a callback or a status request it received): look it up."""
        if task_id in self._following:
            self.background.spawn(self._adopt_stored, task_id)

    def _adopt_stored(self, task_id: str) -> None:
        try:
            stored = self.store.task(task_id)
        except StoreUnavailable:
            return  # its schedule asks the upstream anyway
        if stored is not None:
            self.adopt(stored)


def is_over(item: Following | Watch) -> bool:
    """An item of the poll schedule that no longer needs its turn."""
    if isinstance(item, Watch):
        following = item.following
        return following.ended.is_set() or not following.watching or item.number != following.watches
    return item.ended.is_set()
