"""Where the service keeps users' last images and the tasks it created.

`MemoryStore` keeps them in this process; `RedisStore` keeps them in Redis, shared by every
worker and instance. The store knows nothing of HTTP or of the upstream's wire format.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

TASK_TTL = 24 * 3600
MAX_TASKS = 100_000


class StoreUnavailable(Exception):
    """The shared store cannot be reached right now."""


@dataclass(frozen=True)
class TaskRecord:
    """A task this service created, and what became of it."""

    task_id: str
    key_number: int
    user_id: str | None  # as the caller named it
    mode: str
    source_image_urls: tuple[str, ...]
    used_previous_image: bool
    created_at: float
    callback_secret: str | None = None  # carried in the callback URL; only the upstream knows it
    owner: str = ""  # the access token's scope ("" without tokens): only its holder sees the task
    conversation: str | None = None  # the history key: the user id within the owner's scope
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

    def remembered_image(self, conversation: str) -> Remembered | None: ...
    def forget(self, conversation: str) -> None: ...
    def add_task(self, record: TaskRecord) -> TaskRecord: ...
    def task(self, task_id: str) -> TaskRecord | None: ...
    def complete_task(
        self, task_id: str, state: str, image_urls: tuple[str, ...], error_message: str | None
    ) -> TaskRecord | None: ...
    def claim_poll(self, task_id: str, interval: float) -> bool: ...
    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]: ...
    def notify(self, task_id: str) -> None: ...


class Waiters:
    """Requests in this process waiting for a task; `wake` sets their events."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}

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
        self._waiters = Waiters()

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
            if state == "success" and record.conversation is not None:
                entry = self._live_entry(record.conversation)
                if entry is None or entry.sequence < record.sequence:
                    self._remember(record.conversation, _HistoryEntry(image_urls[0], record.sequence, self.clock()))
            return record

    def claim_poll(self, task_id: str, interval: float) -> bool:
        """True at most once per `interval` seconds for a task: whoever gets it may ask the upstream."""
        with self._lock:
            now = self.clock()
            if now - self._last_poll.get(task_id, float("-inf")) < interval:
                return False
            self._last_poll[task_id] = now
            return True

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when `notify(task_id)` is called, while the block runs."""
        return self._waiters.listen(task_id)

    def notify(self, task_id: str) -> None:
        """Wake whoever waits for this task (a callback completed it)."""
        self._waiters.wake(task_id)

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


class RedisStore:
    """The same store in Redis: every worker and instance sees the same users and tasks.

    Completing a task and forgetting a user are Lua scripts, so the ordering rule holds
    even when two processes race.
    """

    name = "redis"

    # KEYS: task; ARGV: state, image_urls (JSON), error_message, completed_at, first image, history TTL, user prefix
    _COMPLETE = """
    if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'image_urls', ARGV[2], 'error_message', ARGV[3],
               'completed_at', ARGV[4])
    local user = redis.call('HGET', KEYS[1], 'conversation')
    if ARGV[1] == 'success' and user and user ~= '' then
        local sequence = tonumber(redis.call('HGET', KEYS[1], 'sequence'))
        local user_key = ARGV[7] .. user
        local current = tonumber(redis.call('HGET', user_key, 'sequence')) or -1
        if current < sequence then
            redis.call('HSET', user_key, 'image_url', ARGV[5], 'sequence', sequence, 'updated_at', ARGV[4])
            redis.call('EXPIRE', user_key, ARGV[6])
        end
    end
    return 1
    """
    # KEYS: user, sequence counter; ARGV: now, history TTL
    _FORGET = """
    local sequence = tonumber(redis.call('GET', KEYS[2])) or 0
    redis.call('HSET', KEYS[1], 'image_url', '', 'sequence', sequence, 'updated_at', ARGV[1])
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    """

    def __init__(self, url: str, history_ttl: int, prefix: str = "nanobanana:", clock: Callable[[], float] = time.time):
        self.history_ttl = history_ttl
        self.prefix = prefix
        self.clock = clock
        self.redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        self._complete = self.redis.register_script(self._COMPLETE)
        self._forget = self.redis.register_script(self._FORGET)
        self._waiters = Waiters()
        self._subscriber: threading.Thread | None = None
        self._subscriber_lock = threading.Lock()
        self._closed = threading.Event()

    def remembered_image(self, user_id: str) -> Remembered | None:
        entry = self._call(self.redis.hgetall, self._user_key(user_id))
        if not entry.get("image_url"):
            return None
        return Remembered(entry["image_url"], float(entry["updated_at"]))

    def forget(self, user_id: str) -> None:
        self._call(
            self._forget, keys=[self._user_key(user_id), self._sequence_key], args=[self.clock(), self.history_ttl]
        )

    def add_task(self, record: TaskRecord) -> TaskRecord:
        record = replace(record, sequence=self._call(self.redis.incr, self._sequence_key))
        with self.redis.pipeline() as pipe:
            pipe.hset(self._task_key(record.task_id), mapping=_task_fields(record))
            pipe.expire(self._task_key(record.task_id), TASK_TTL)
            self._call(pipe.execute)
        return record

    def task(self, task_id: str) -> TaskRecord | None:
        fields = self._call(self.redis.hgetall, self._task_key(task_id))
        return _task_record(fields) if fields else None

    def complete_task(
        self, task_id: str, state: str, image_urls: tuple[str, ...] = (), error_message: str | None = None
    ) -> TaskRecord | None:
        args = [state, json.dumps(list(image_urls)), error_message or "", self.clock()]
        args += [image_urls[0] if image_urls else "", self.history_ttl, self.prefix + "user:"]
        self._call(self._complete, keys=[self._task_key(task_id)], args=args)
        return self.task(task_id)

    def claim_poll(self, task_id: str, interval: float) -> bool:
        key = self.prefix + "polled:" + task_id
        return bool(self._call(self.redis.set, key, 1, px=max(1, int(interval * 1000)), nx=True))

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when any process calls `notify(task_id)`, while the block runs."""
        self._start_subscriber()
        return self._waiters.listen(task_id)

    def notify(self, task_id: str) -> None:
        """Wake whoever waits for this task, in every worker and instance (Redis pub/sub)."""
        self._call(self.redis.publish, self._wake_channel, task_id)

    def close(self) -> None:
        self._closed.set()
        if self._subscriber:
            self._subscriber.join(timeout=5)
        self.redis.close()

    def _start_subscriber(self) -> None:
        with self._subscriber_lock:
            if self._subscriber is None:
                self._subscriber = threading.Thread(target=self._relay_wakes, name="redis-wakes", daemon=True)
                self._subscriber.start()

    def _relay_wakes(self) -> None:
        """Listen on the wake channel for the life of the process, reconnecting when Redis comes back."""
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._wake_channel)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message:
                        self._waiters.wake(message["data"])
            except (redis.ConnectionError, redis.TimeoutError):
                self._closed.wait(1.0)  # fallback polling covers the gap
            finally:
                pubsub.close()

    @property
    def _wake_channel(self) -> str:
        return self.prefix + "wake"

    @property
    def _sequence_key(self) -> str:
        return self.prefix + "sequence"

    def _user_key(self, user_id: str) -> str:
        return self.prefix + "user:" + user_id

    def _task_key(self, task_id: str) -> str:
        return self.prefix + "task:" + task_id

    @staticmethod
    def _call(function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(str(error)) from None


def _task_fields(record: TaskRecord) -> dict[str, str | int | float]:
    return {
        "task_id": record.task_id,
        "key_number": record.key_number,
        "user_id": record.user_id or "",
        "mode": record.mode,
        "source_image_urls": json.dumps(list(record.source_image_urls)),
        "used_previous_image": int(record.used_previous_image),
        "callback_secret": record.callback_secret or "",
        "owner": record.owner,
        "conversation": record.conversation or "",
        "created_at": record.created_at,
        "sequence": record.sequence,
        "state": record.state,
        "image_urls": json.dumps(list(record.image_urls)),
        "error_message": record.error_message or "",
        "completed_at": record.completed_at or "",
    }


def _task_record(fields: dict[str, str]) -> TaskRecord:
    return TaskRecord(
        task_id=fields["task_id"],
        key_number=int(fields["key_number"]),
        user_id=fields["user_id"] or None,
        mode=fields["mode"],
        source_image_urls=tuple(json.loads(fields["source_image_urls"])),
        used_previous_image=fields["used_previous_image"] == "1",
        callback_secret=fields["callback_secret"] or None,
        owner=fields["owner"],
        conversation=fields["conversation"] or None,
        created_at=float(fields["created_at"]),
        sequence=int(fields["sequence"]),
        state=fields["state"],
        image_urls=tuple(json.loads(fields["image_urls"])),
        error_message=fields["error_message"] or None,
        completed_at=float(fields["completed_at"]) if fields["completed_at"] else None,
    )
