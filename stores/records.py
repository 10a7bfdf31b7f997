"""What every store keeps, and the interface both stores implement.

The store holds the ledger of generations (one `TaskRecord` each, recorded before anything is
spent), users' remembered pictures, idempotency keys, and who follows which pending task.
`SqliteStore` (store_sqlite.py, the default, one process) and `RedisStore` (store_redis.py, several
workers and instances) keep the same things by the same rules, and pass the same tests.
The store knows nothing of HTTP or of the upstream's wire format.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

TASK_TTL = 24 * 3600  # how long the ledger keeps a task
IDEMPOTENCY_TTL = 24 * 3600
# A follower (a process) that has not renewed its lease for this long is gone, and its tasks are
# taken over. Recording a task counts as a renewal for a follower the store does not know yet.
FOLLOWER_LEASE = 10.0
CHAIN_LENGTH = 50  # pictures kept in a user's chain, the latest


class StoreUnavailable(Exception):
    """The store cannot be reached right now."""


class IdempotencyConflict(Exception):
    """An idempotency key was used before with other parameters."""


@dataclass(frozen=True)
class TaskRecord:
    """One generation in the ledger: what was asked, who follows it, and what became of it.

    `state` is pending, success, failed, or unconfirmed: the submission's answer was lost, so
    nobody knows whether the upstream made the picture; a late success may still end it.
    """

    task_id: str  # the service's own id, given before the upstream is called
    owner: str  # the access token's scope ("" without tokens): only its holder sees the task
    conversation: str | None  # the history key: the user id within the owner's scope
    user_id: str | None  # as the caller named it
    mode: str
    source_image_urls: tuple[str, ...]
    used_previous_image: bool
    created_at: float
    callback_secret: str | None = None  # carried in the callback URL; only the upstream knows it
    follower: str = ""  # the process that follows the task to its end
    sequence: int = 0  # order of recording, given by the store
    upstream_task_id: str | None = None
    key_id: str | None = None  # which API key made it (a fingerprint, never the key)
    submitted_at: float | None = None
    state: str = "pending"
    image_urls: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    completed_at: float | None = None
    prompt: str | None = None
    upstream_image_urls: tuple[str, ...] = ()  # the upstream's own addresses, when image_urls are lasting copies
    callback_url: str | None = None  # the caller's webhook (CONTRACT §8), checked before it was recorded
    webhook_id: str | None = None  # of the event being delivered: the same on every attempt
    webhook_state: str | None = None  # pending, delivered or failed
    webhook_attempts: int = 0
    webhook_due: float | None = None  # when the next attempt may start (or the lease of one under way ends)

    @property
    def settled(self) -> bool:
        """Its end is known for sure: success or failed."""
        return self.state in ("success", "failed")


@dataclass(frozen=True)
class Picture:
    """One picture of a user's chain (CONTRACT §9)."""

    task_id: str
    image_url: str
    prompt: str | None
    created_at: float  # when it joined the chain
    upstream_image_url: str | None = None  # the upstream's address, while it lives

    @classmethod
    def of(cls, record: TaskRecord, now: float) -> Picture:
        original = record.upstream_image_urls[0] if record.upstream_image_urls else None
        return cls(record.task_id, record.image_urls[0], record.prompt, now, original)


@dataclass(frozen=True)
class IdempotencyKey:
    """A caller's idempotency key, scoped to its access token, and the request it stands for."""

    scope: str  # a digest of the owner and the key
    fingerprint: str  # a digest of the request's parameters


class Store(Protocol):
    name: str

    # -- conversations: each a chain of pictures, the last one remembered
    def last_picture(self, conversation: str) -> Picture | None:
        """The user's remembered picture: the last of the chain, unless it expired or was forgotten."""

    def chain(self, conversation: str) -> list[Picture]:
        """The user's pictures, oldest first, at most CHAIN_LENGTH."""

    def undo(self, conversation: str) -> Picture | None:
        """Drop the last picture of the chain (the one before it is remembered again); None if there is none."""

    def forget(self, conversation: str) -> list[Picture]:
        """Drop the chain, and bar results of tasks recorded before now from it; the pictures dropped."""

    # -- the ledger
    def record_task(self, record: TaskRecord, key: IdempotencyKey | None = None) -> tuple[TaskRecord, bool]:
        """Record a new task (True), or return the task an earlier request with this key made (False).

        A follower the store does not know yet gets a lease of FOLLOWER_LEASE seconds with it.
        """

    def keyed_task(self, key: IdempotencyKey) -> TaskRecord | None:
        """The task an earlier request with this key made; IdempotencyConflict if it asked for something else."""

    def task(self, task_id: str) -> TaskRecord | None:
        """A task by the service's id or by the upstream's."""

    def submitted(self, task_id: str, upstream_task_id: str, key_id: str, submitted_at: float) -> None: ...

    def complete_task(self, record: TaskRecord) -> TaskRecord:
        """Record a task's end (written whole, so a record lost with the store comes back), once.

        A success joins the user's chain in the order the tasks were recorded, so a late one never
        replaces the picture of a task recorded after it.
        An unconfirmed task may still end; a settled one never changes.
        """

    def release_key(self, key: IdempotencyKey, task_id: str) -> None:
        """Let the key be used again: its task was refused before anything was made."""

    def claim_poll(self, task_id: str, interval: float) -> bool:
        """True at most once per `interval` seconds for a task: whoever gets it may ask the upstream."""

    def first_time(self, key: str, ttl: float) -> bool:
        """True the first time `key` is seen within `ttl` seconds (a Telegram update id, say), False after."""

    # -- webhooks to callers
    def due_webhooks(self, now: float, lease_until: float, limit: int) -> list[TaskRecord]:
        """Tasks whose webhook is due, each now leased to the caller until `lease_until` (nobody else sends it)."""

    def webhook_attempted(self, task_id: str, webhook_id: str, state: str, attempts: int, due: float | None) -> None:
        """Record how an attempt went, unless a newer event of the task has replaced this one."""

    # -- followers
    def heartbeat(self, follower: str, alive_until: float) -> None:
        """Renew the lease on every task this follower follows."""

    def take_over(self, follower: str, now: float, limit: int) -> list[TaskRecord]:
        """Pending tasks whose follower's lease ran out, now followed by `follower`."""

    def retire(self, follower: str) -> None:
        """End this follower's lease at once, so others take over its tasks without waiting."""

    # -- wake-ups, health, housekeeping
    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when some process calls notify(task_id), while the block runs."""

    def notify(self, task_id: str) -> None:
        """Say, to every process, that the task ended."""

    def on_notify(self, callback: Callable[[str], None]) -> None:
        """Call `callback(task_id)` on every notify, from any process (it must return quickly)."""

    def ping(self) -> bool: ...
    def purge(self, now: float) -> None: ...
    def close(self) -> None: ...


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


# -- a task record as flat fields, for both stores --------------------------------------

TASK_FIELDS = tuple(field.name for field in fields(TaskRecord))
_TUPLES = {"source_image_urls", "image_urls", "upstream_image_urls"}
_FLOATS = {"created_at", "submitted_at", "completed_at", "webhook_due"}
_INTEGERS = {"sequence", "webhook_attempts"}


def task_fields(record: TaskRecord) -> dict[str, Any]:
    """The record as column values: tuples as JSON, booleans as 0/1, None kept."""
    values: dict[str, Any] = {}
    for name in TASK_FIELDS:
        value = getattr(record, name)
        if name in _TUPLES:
            value = json.dumps(list(value))
        elif isinstance(value, bool):
            value = int(value)
        values[name] = value
    return values


def task_record(values: Mapping[str, Any]) -> TaskRecord:
    """The record back from column values (Redis gives strings, and "" for None)."""
    decoded: dict[str, Any] = {}
    for name in TASK_FIELDS:
        value = values.get(name)
        if value is None or value == "":
            value = None
        elif name in _TUPLES:
            value = tuple(json.loads(value))
        elif name in _FLOATS:
            value = float(value)
        elif name in _INTEGERS:
            value = int(value)
        elif name == "used_previous_image":
            value = str(value) == "1"
        decoded[name] = value
    decoded["source_image_urls"] = decoded["source_image_urls"] or ()
    decoded["image_urls"] = decoded["image_urls"] or ()
    decoded["upstream_image_urls"] = decoded["upstream_image_urls"] or ()
    decoded["owner"] = decoded["owner"] or ""
    decoded["follower"] = decoded["follower"] or ""
    decoded["sequence"] = decoded["sequence"] or 0
    decoded["webhook_attempts"] = decoded["webhook_attempts"] or 0
    decoded["used_previous_image"] = bool(decoded["used_previous_image"])
    return TaskRecord(**decoded)
