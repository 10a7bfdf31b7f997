"""The keeper: this process's lease on the tasks it follows, the take-over of tasks whose follower is gone,
and the store's housekeeping, once a second.

Each process renews the lease on all its tasks with one heartbeat. When a process goes away (a crash,
a restart, a deploy) its lease runs out, and any process of the service takes its pending tasks over,
at start-up and continually. A process that stops retires its lease, so others need not wait for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from background import Background
from errors import StoreUnavailable
from stores.interface import Store
from stores.records import FOLLOWER_LEASE, Picture, TaskRecord

log = logging.getLogger(__name__)

KEEPER_EVERY = 1.0  # seconds between two renewals (and take-over sweeps)
PURGE_EVERY = 60.0
TAKE_OVER_BATCH = 500
UPLOADS_PER_PURGE = 500  # removed by one purge (in the background); the rest wait for the next


class Keeper:
    def __init__(
        self,
        store: Store,
        follower_id: str,
        adopt: Callable[[TaskRecord], None],
        background: Background,
        expired: Callable[[list[Picture]], None] = lambda pictures: None,
        uploads_expired: Callable[[list[str]], None] = lambda urls: None,
        clock: Callable[[], float] = time.time,
    ):
        """`adopt(record)` starts following a task taken over from a follower that is gone; `expired(pictures)`
        hears of the pictures of conversations that expired, `uploads_expired(urls)` of uploads nobody used in time."""
        self.store = store
        self.follower_id = follower_id
        self.adopt = adopt
        self.expired = expired
        self.uploads_expired = uploads_expired
        self.background = background
        self.clock = clock
        self._next_purge = 0.0
        self._store_away = False

    def start(self) -> None:
        self.background.loop("keeper", self._run)

    def retire(self) -> None:
        """End the lease at once, so another process takes the pending tasks over."""
        try:
            self.store.retire(self.follower_id)
        except StoreUnavailable:
            log.warning("could not end this process's lease: its tasks are taken over when it runs out")

    def tick(self) -> None:
        """Renew the lease, take over orphans, and purge when it is time; the store being away is no error."""
        now = self.clock()
        try:
            self.store.heartbeat(self.follower_id, now + FOLLOWER_LEASE)
            self._take_over(now)
            if now >= self._next_purge:
                dropped = self.store.purge(now)
                self._next_purge = now + PURGE_EVERY
                if dropped:
                    self.expired(dropped)
                if uploads := self.store.expired_uploads(now, UPLOADS_PER_PURGE):
                    self.uploads_expired(uploads)
            if self._store_away:
                log.info("the store is back")
            self._store_away = False
        except StoreUnavailable as away:
            if not self._store_away:
                log.warning("the store is unavailable (%s); taking over waits until it is back", away)
            self._store_away = True

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("renewing the lease or taking over failed; trying again")
            if self.background.stopping.wait(KEEPER_EVERY):
                return

    def _take_over(self, now: float) -> None:
        while not self.background.stopping.is_set():
            orphans = self.store.take_over(self.follower_id, now, TAKE_OVER_BATCH)
            for record in orphans:
                self.adopt(record)
            if orphans:
                log.info("took over %d pending tasks whose follower was gone", len(orphans))
            if len(orphans) < TAKE_OVER_BATCH:
                return
