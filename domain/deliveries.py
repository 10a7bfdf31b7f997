"""The outbox: each ended task goes where it asked, at least once, through the channel its target names.

A task's `deliver_to` is a target: a web address (a signed webhook, domain/webhooks.py) or a chat
(`telegram:<chat>:<message>`, channels/telegram.py; Discord and Slack next). Its channel is found by
the target's scheme, the part before the first colon. When the task ends, the store marks its
delivery due (`delivery_due`); every process runs a `Deliveries` loop that leases the due ones from
the store (so no two processes send the same one at once), hands each to its channel in short work
of its own (a slow receiver holds up nobody), and records how it went: delivered, due again after the
next delay, or failed after the last. The store holds them, so a restart or a crash loses none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from background import Background
from config import Settings
from errors import InvalidRequest, StoreUnavailable
from stores.interface import Store
from stores.records import DeliveryState, TaskRecord

log = logging.getLogger(__name__)

LOOK_EVERY = 1.0  # seconds between two looks at the store for due deliveries, when nothing wakes the loop
BATCH = 100
LEASE_MARGIN = 10.0  # seconds beyond an attempt's own time-outs before another process may try it again
NO_WEBHOOKS = (
    "This service does not send webhooks: its owner has not set WEBHOOK_SECRET. "
    "Leave callback_url out, and ask for the picture at status_url instead."
)


class Undeliverable(Exception):
    """The target will never take this delivery (an address inside, say): it fails without more attempts."""


class Channel(Protocol):
    """Where ended tasks can go: a kind of target, by its scheme."""

    attempt_time: float  # the longest an attempt may take, in seconds

    def check(self, target: str) -> None:
        """Refuse, with InvalidRequest, a target this channel will not deliver to (when the request comes)."""

    def deliver(self, record: TaskRecord) -> bool:
        """Deliver the ended task; False: try again later; Undeliverable: give up."""


def scheme(target: str) -> str:
    return target.split(":", 1)[0].lower()


def delivery_due(task_id: str, state: str, now: float) -> dict:
    """The fields that make the delivery of a task that just ended (in `state`) due now."""
    return {
        "webhook_id": f"msg_{task_id}_{state}",
        "webhook_state": DeliveryState.PENDING,
        "webhook_attempts": 0,
        "webhook_due": now,
    }


class Deliveries:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        background: Background,
        channels: Mapping[str, Channel],
        on_outcome: Callable[[str], None] | None = None,
    ):
        """`channels` by scheme (https, telegram, ...); `on_outcome(outcome)` counts delivered, retry, failed."""
        self.retry_delays = settings.webhook_retry_delays
        self.store = store
        self.background = background
        self.channels = dict(channels)
        self.on_outcome = on_outcome
        self._wake = threading.Event()
        self._next_retry = float("inf")  # the soonest retry this process set: the loop looks then, not later
        store.on_notify(lambda task_id: self._wake.set())  # a task ended somewhere: a delivery may be due

    def add_channel(self, target_scheme: str, channel: Channel) -> None:
        """Deliver targets of this scheme through `channel` too (a chat channel, built after the outbox)."""
        self.channels[target_scheme] = channel

    def check_target(self, target: str) -> None:
        """Refuse a target no channel here delivers to, or that its channel refuses."""
        channel = self.channels.get(scheme(target))
        if channel is None:
            raise InvalidRequest(NO_WEBHOOKS)
        channel.check(target)

    def start(self) -> None:
        if self.channels:
            self.background.loop("deliveries", self._run, wake=self._wake.set)

    def _run(self) -> None:
        lease = max((channel.attempt_time for channel in self.channels.values()), default=0.0) + LEASE_MARGIN
        while True:
            self._wake.clear()
            if self.background.stopping.is_set():  # checked after clear(): a wake to stop is never lost
                return
            now = time.time()
            try:
                due = self.store.due_deliveries(now, now + lease, BATCH)
            except StoreUnavailable:
                due = []  # they wait in the store
            for record in due:
                self.background.spawn(self._attempt, record)
            if len(due) < BATCH:
                self._wake.wait(self._pause(now))

    def _pause(self, now: float) -> float:
        """Until the next look: LOOK_EVERY, or sooner when a retry set here falls due sooner."""
        if self._next_retry <= now:
            self._next_retry = float("inf")
        return min(LOOK_EVERY, max(0.0, self._next_retry - now))

    def _attempt(self, record: TaskRecord) -> None:
        """One attempt; anything but a delivery is retried later, until the delays run out."""
        attempts = record.webhook_attempts + 1
        try:
            delivered = self._deliver(record)
        except Undeliverable as refused:
            log.warning("delivery of task %s given up: %s", record.task_id, refused)
            self._record(record, DeliveryState.FAILED, attempts, None)
            return
        except Exception:
            log.exception("delivery of task %s: the attempt broke off", record.task_id)
            delivered = False
        if delivered:
            self._record(record, DeliveryState.DELIVERED, attempts, None)
        elif attempts <= len(self.retry_delays):
            retry_at = time.time() + self.retry_delays[attempts - 1]
            self._record(record, DeliveryState.PENDING, attempts, retry_at)
            self._next_retry = min(self._next_retry, retry_at)
            self._wake.set()  # the loop may be asleep for longer than that
        else:
            self._record(record, DeliveryState.FAILED, attempts, None)

    def _deliver(self, record: TaskRecord) -> bool:
        channel = self.channels.get(scheme(record.deliver_to))
        if channel is None:  # its channel was turned off since (a setting removed): keep it for when it is back
            return False
        return channel.deliver(record)

    def _record(self, record: TaskRecord, state: DeliveryState, attempts: int, due: float | None) -> None:
        try:
            self.store.delivery_attempted(record.task_id, record.webhook_id, state, attempts, due)
        except StoreUnavailable:
            log.warning("delivery of task %s: could not record the attempt; it will be made again", record.task_id)
        if self.on_outcome:
            self.on_outcome("retry" if state == DeliveryState.PENDING else state)
