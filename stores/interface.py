"""What a store does, in small parts, and `Store`, all of them: the one interface both stores implement.

`SqliteStore` (sqlite.py, the default) and `RedisStore` (redis.py, for several instances) keep the
same things by the same rules and pass the same tests. A part asks only for what it uses: the outbox
only for `Outbox`, a chat channel only for `Seen`. The backends stay single classes, because
`complete_task` is atomic across the ledger, the chain and the outbox. Nothing here knows HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from config import Pacing
from stores.records import IdempotencyKey, Picture, TaskRecord, Turns


class Chains(Protocol):
    """Conversations: each a chain of pictures, the last one remembered."""

    def last_picture(self, conversation: str) -> Picture | None:
        """The user's remembered picture: the last of the chain, unless it expired or was forgotten."""

    def chain(self, conversation: str) -> list[Picture]:
        """The user's pictures, oldest first, at most CHAIN_LENGTH."""

    def undo(self, conversation: str) -> Picture | None:
        """Drop the last picture of the chain (the one before it is remembered again); None if there is none."""

    def forget(self, conversation: str) -> list[Picture]:
        """Drop the chain, and bar results of tasks recorded before now from it; the pictures dropped."""


class Ledger(Protocol):
    """Every generation, recorded before anything is spent, with its idempotency key."""

    def record_task(
        self, record: TaskRecord, key: IdempotencyKey | None = None, queue_max: int | None = None
    ) -> tuple[TaskRecord, bool]:
        """Record a new task (True), or return the task an earlier request with this key made (False).

        A queued one is not recorded when `queue_max` tasks are queued already: QueueFull.

        A follower the store does not know yet gets a lease of FOLLOWER_LEASE seconds with it.
        """

    def keyed_task(self, key: IdempotencyKey) -> TaskRecord | None:
        """The task an earlier request with this key made; IdempotencyConflict if it asked for something else."""

    def task(self, task_id: str) -> TaskRecord | None:
        """A task by the service's id or by the upstream's."""

    def submitted(self, task_id: str, upstream_task_id: str, key_id: str, submitted_at: float) -> None:
        """The upstream accepted the task: its id there, the key that made it, and when."""

    def complete_task(self, record: TaskRecord) -> TaskRecord:
        """Record a task's end (written whole, so a record lost with the store comes back), once.

        A success joins the user's chain in the order the tasks were recorded, so a late one never
        replaces the picture of a task recorded after it. Its delivery, if it has one, joins the outbox.
        An unconfirmed task may still end; a settled one never changes.
        """

    def release_key(self, key: IdempotencyKey, task_id: str) -> None:
        """Let the key be used again: its task was refused before anything was made."""

    def claim_poll(self, task_id: str, interval: float) -> bool:
        """True at most once per `interval` seconds for a task: whoever gets it may ask the upstream."""


class Queue(Protocol):
    """Generations waiting for their turn at the upstream, paid nothing yet (CONTRACT §11). A task recorded as
    QUEUED gets its turn from the store: the lanes (conversations) take turns, a lane's own tasks keep their order."""

    def take_turns(self, follower: str, now: float, pacing: Pacing, key_ids: list[str], limit: int) -> Turns:
        """Up to `limit` queued tasks, in their turns, each given a key whose pacing allows a submission now;
        from here on they are pending and followed by `follower`. Also when a key may allow one again, and
        whether tasks are left in the queue."""

    def sent(self, task_id: str, key_id: str, at: float) -> None:
        """The submission of a task whose turn was taken with this key was answered at `at`: it reached the
        upstream by then, and counts in the key's window as sent then (until now, as late as it could)."""

    def sending(self, task_id: str, follower: str, at: float) -> bool:
        """The task's submission is about to go: from now on nobody can tell, without its answer, whether it went.
        False, and it must not go, unless the task is pending, unsubmitted and followed by `follower`. A task
        taken and never marked so was not sent, and may go back to the queue (`requeue`)."""

    def unsent(self, follower: str, taken_before: float, limit: int) -> list[TaskRecord]:
        """Tasks whose turn `follower` took before that moment and never marked as sending (stranded there)."""

    def requeue(self, task_id: str, follower: str, hold_key_until: float | None = None) -> bool:
        """A taken turn that was not used (the upstream was busy, or refused the key, or it was never sent): the
        task is queued again at its turn, and its key allows nothing until `hold_key_until`. False unless it is
        pending, unsubmitted and followed by `follower`."""

    def end_queued(self, record: TaskRecord) -> TaskRecord | None:
        """End a task that is still queued (cancelled, or queued too long), with its delivery; None if it has
        left the queue meanwhile."""

    def queued_before(self, created_before: float, limit: int) -> list[TaskRecord]:
        """Queued tasks recorded before that moment."""

    def queue_position(self, record: TaskRecord) -> int | None:
        """Where the task stands in the queue: 1 goes next; None when it is not queued."""

    def queue_depth(self) -> int:
        """How many tasks are queued."""


class Outbox(Protocol):
    """Deliveries of ended tasks to where they asked (a webhook, a chat), at least once."""

    def due_deliveries(self, now: float, lease_until: float, limit: int) -> list[TaskRecord]:
        """Tasks whose delivery is due, each now leased to the caller until `lease_until` (nobody else sends it)."""

    def delivery_attempted(self, task_id: str, webhook_id: str, state: str, attempts: int, due: float | None) -> None:
        """Record how an attempt went, unless a newer event of the task has replaced this one."""


class Followers(Protocol):
    """Which process follows which pending task, by leases that run out when a process is gone."""

    def heartbeat(self, follower: str, alive_until: float) -> None:
        """Renew the lease on every task this follower follows."""

    def take_over(self, follower: str, now: float, limit: int) -> list[TaskRecord]:
        """Pending tasks whose follower's lease ran out, now followed by `follower`."""

    def retire(self, follower: str) -> None:
        """End this follower's lease at once, so others take over its tasks without waiting."""


class WakeUps(Protocol):
    """Telling every process that a task ended."""

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when some process calls notify(task_id), while the block runs."""

    def notify(self, task_id: str) -> None:
        """Say, to every process, that the task ended."""

    def on_notify(self, callback: Callable[[str], None]) -> None:
        """Call `callback(task_id)` on every notify, from any process (it must return quickly)."""


class Seen(Protocol):
    def first_time(self, key: str, ttl: float) -> bool:
        """True the first time `key` is seen within `ttl` seconds (a Telegram update id, say), False after."""


class Uploads(Protocol):
    def keep_upload(self, url: str, until: float) -> None:
        """Keep an uploaded picture until `until`."""

    def renew_upload(self, url: str, until: float) -> None:
        """Keep an upload longer (it is used); nothing if `url` is no upload (a lasting copy, say)."""

    def expired_uploads(self, now: float, limit: int) -> list[str]:
        """The addresses of up to `limit` uploads whose time ran out, each named once, and forgotten."""


class Store(Chains, Ledger, Queue, Outbox, Followers, WakeUps, Seen, Uploads, Protocol):
    def ping(self) -> bool:
        """Whether the store answers, and takes writes, now."""

    def purge(self, now: float) -> list[Picture]:
        """Drop what has outlived its time; the pictures of the conversations that expired."""

    def close(self) -> None:
        """Let go of connections and threads; the store is not used after this."""
