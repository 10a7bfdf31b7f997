"""Background work with an owner: every thread the service's parts start is started, named, tracked and stopped
here (the Redis store's subscriber is the store's own, and ends when the store is closed).

Under gunicorn's gevent worker the standard library is patched, so each "thread" is a greenlet. Two kinds:
- loops (`loop`): a few long-lived threads (the keeper, the poll schedule, the outbox), each running
  until `stop()`; they wait on `stopping`, so they end as soon as it is set;
- short work (`spawn`): one per submission, status poll, delivery attempt or chat update, so tens of
  thousands may run at once with 10,000 requests waiting. These start with `_thread.start_new_thread`
  rather than `threading.Thread`: a Thread object (its locks, its place in threading's registry) per
  poll cost memory and CPU that the 10,000-waiting benchmark showed. They are counted, and `stop()`
  gives them a bounded time to finish.
"""

from __future__ import annotations

import _thread
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Background:
    def __init__(self):
        self.stopping = threading.Event()
        self._loops: list[threading.Thread] = []
        self._wakes: list[Callable[[], None]] = []
        self._running = 0
        self._idle = threading.Condition(threading.Lock())  # a plain lock: cheaper per spawn than an RLock

    def loop(self, name: str, body: Callable[[], None], wake: Callable[[], None] | None = None) -> None:
        """Run `body` in a thread called `name`; it must return once `stopping` is set. None starts after stop.

        A loop that sleeps on an event of its own passes `wake`, which sets that event, so stopping ends its sleep.
        """
        with self._idle:
            if self.stopping.is_set():
                return
            thread = threading.Thread(target=self._guarded, args=(body, ()), name=name, daemon=True)
            thread.start()
            self._loops.append(thread)
            if wake is not None:
                self._wakes.append(wake)

    def spawn(self, work: Callable, *args) -> bool:
        """Run `work(*args)` apart from the caller; a failure is logged, never lost in silence. After stop, the
        work does not start and False says so."""
        with self._idle:
            if self.stopping.is_set():
                return False
            self._running += 1
        _thread.start_new_thread(self._counted, (work, args))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Ask everything to stop, then wait up to `timeout` seconds in all for it to finish."""
        self.begin_stop()
        self.wait(timeout)

    def begin_stop(self) -> None:
        """Ask everything to stop: no new work starts, and sleeping loops wake up to end."""
        with self._idle:
            self.stopping.set()
            wakes = list(self._wakes)
        for wake in wakes:
            wake()

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds in all for the loops and the short work under way to end."""
        deadline = time.monotonic() + timeout
        with self._idle:
            loops = list(self._loops)
        for thread in loops:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, max(0.0, deadline - time.monotonic())):
                log.info("stopped with %d pieces of background work still under way", self._running)

    @property
    def running(self) -> int:
        """Short pieces of work under way now."""
        return self._running

    def _counted(self, work: Callable, args: tuple) -> None:
        try:
            self._guarded(work, args)
        finally:
            with self._idle:
                self._running -= 1
                if self._running == 0:
                    self._idle.notify_all()

    @staticmethod
    def _guarded(work: Callable, args: tuple) -> None:
        try:
            work(*args)
        except Exception:
            log.exception("background work %s failed", getattr(work, "__qualname__", work))
