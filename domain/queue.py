"""The queue: generations wait here for their turn at the upstream, paid nothing, and go as fast as the API keys'
pacing allows (CONTRACT §11).

The queue itself lives in the store, shared by every worker and instance, so they share one pacing and one
order of turns. Each process runs one dispatcher: it takes the turns that have come (stores/interface.py,
`take_turns`), hands each task to `submit`, and sleeps until a key allows another, a task is queued or ends
here, or a second has passed (for tasks queued by other processes). A busy answer from the upstream sends the
task back to its turn and holds its key a while, longer each time in a row. The dispatcher also ends the tasks
that waited longer than QUEUE_MAX_WAIT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from background import Background
from config import Pacing
from errors import StoreUnavailable
from stores.interface import Queue
from stores.records import TaskRecord

log = logging.getLogger(__name__)

LOOK_EVERY = 1.0  # seconds between two looks at the queue when nothing wakes the dispatcher
EXPIRE_EVERY = 5.0  # seconds between two looks for tasks queued too long
TURNS_AT_ONCE = 200  # turns taken in one go
SWEEP_EVERY = 60.0  # seconds between two looks for turns taken here and never used (work lost to a bug or an outage)
STRANDED_AFTER = 30.0  # a turn taken this long ago and never marked as sending was lost
BUSY_HOLD = 1.0  # seconds a key rests after the upstream said it was busy, doubled for each rest in a row
BUSY_HOLD_MAX = 60.0


class Dispatcher:
    def __init__(
        self,
        store: Queue,
        pacing: Pacing,
        follower: str,
        usable_keys: Callable[[], list[str]],
        submit: Callable[[TaskRecord], None],
        expire: Callable[[TaskRecord], None],
        stranded: Callable[[TaskRecord], None],
        max_wait: float,
        background: Background,
        clock: Callable[[], float] = time.time,
    ):
        """`submit(record)` sends a task whose turn came (it is pending now, with its key); `expire(record)` ends
        a task queued longer than `max_wait` seconds; `stranded(record)` puts back a task whose turn was taken here
        long ago and never used; `usable_keys()` are the ids of the keys not set aside."""
        self.store = store
        self.pacing = pacing
        self.follower = follower
        self.usable_keys = usable_keys
        self.submit = submit
        self.expire = expire
        self.stranded = stranded
        self.max_wait = max_wait
        self.background = background
        self.clock = clock
        self._wake = threading.Event()
        self._starting = threading.Lock()
        self._looking = threading.Lock()  # one look at a time in this process
        self._started = False
        self._lock = threading.Lock()
        self._rests_in_a_row: dict[str | None, int] = {}
        self._resting_until: dict[str | None, float] = {}
        self._left_queued = False  # the last look left tasks in the queue
        self._next_expiry = 0.0
        self._next_sweep = 0.0

    def start(self) -> None:
        """Look at the queue from now on (the first wake starts it too)."""
        with self._starting:
            if not self._started:
                self._started = True
                self.background.loop("queue", self._run, wake=self._wake.set)

    def wake(self) -> None:
        """A task was sent back to the queue, or a key may allow one: look now."""
        if not self._started:
            self.start()
        self._wake.set()

    def task_ended(self) -> None:
        """A task ended: a key may have room for one of the tasks left in the queue."""
        if self._left_queued:
            self._wake.set()

    def hold_after_busy(self, key_id: str | None, retry_after: float | None) -> float:
        """Until when a key rests after a busy answer: as the upstream said, else longer for each rest in a row.
        Refusals of submissions sent together, while the key already rests, make the rest no longer."""
        now = self.clock()
        with self._lock:
            if self._resting_until.get(key_id, 0.0) > now:
                return self._resting_until[key_id]
            rests = self._rests_in_a_row.get(key_id, 0)
            self._rests_in_a_row[key_id] = rests + 1
            until = now + (retry_after or min(BUSY_HOLD * 2**rests, BUSY_HOLD_MAX))
            self._resting_until[key_id] = until
        return until

    def went_through(self, key_id: str | None) -> None:
        """A submission with the key was accepted: it is no longer busy."""
        with self._lock:
            self._rests_in_a_row.pop(key_id, None)

    def look(self) -> float:
        """Take the turns that have come and end the tasks queued too long; the seconds until the next look."""
        now = self.clock()
        with self._looking:
            if now >= self._next_expiry:
                self._next_expiry = now + min(EXPIRE_EVERY, self.max_wait / 4)
                for record in self.store.queued_before(now - self.max_wait, TURNS_AT_ONCE):
                    self.expire(record)
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_EVERY
                self.sweep(now)
            next_chance = self._take_turns(now)
        return LOOK_EVERY if next_chance is None else max(0.0, min(LOOK_EVERY, next_chance - self.clock()))

    def sweep(self, now: float) -> None:
        """Put back the turns this process took long ago and never used (their work was lost)."""
        for record in self.store.unsent(self.follower, now - STRANDED_AFTER, TURNS_AT_ONCE):
            self.stranded(record)

    def _take_turns(self, now: float) -> float | None:
        """Take every turn that has come, handing each task to `submit`; when a key may allow another."""
        next_chance = None
        while not self.background.stopping.is_set():
            turns = self.store.take_turns(self.follower, now, self.pacing, self.usable_keys(), TURNS_AT_ONCE)
            for record in turns.taken:
                self.submit(record)
            self._left_queued, next_chance = turns.left, turns.next_chance
            if len(turns.taken) < TURNS_AT_ONCE:
                break
            now = self.clock()
        return next_chance

    def _run(self) -> None:
        store_away = False
        while True:
            self._wake.clear()
            if self.background.stopping.is_set():  # checked after clear(): a wake to stop is never lost
                return
            try:
                pause = self.look()
                store_away = False
            except StoreUnavailable as away:
                if not store_away:
                    log.warning("the store is unavailable (%s): queued tasks wait until it is back", away)
                store_away, pause = True, LOOK_EVERY
            except Exception:
                log.exception("taking turns from the queue failed; looking again shortly")
                pause = LOOK_EVERY
            self._wake.wait(pause)
