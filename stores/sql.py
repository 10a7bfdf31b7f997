"""The SQL store: every rule of the ledger, the queue, conversations and deliveries, written once in the SQL
that SQLite and PostgreSQL both speak (`?` and `:name` parameters; PostgreSQL's side translates them).

A `Database` says how to reach the tables. Its writes take turns, one at a time across every process (SQLite's
BEGIN IMMEDIATE, a PostgreSQL advisory lock), so each transaction here reads what it will change with no
other writer in between: that is how a task is never taken, followed or submitted twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from config import IDEMPOTENCY_TTL, TASK_TTL, Pacing
from errors import IdempotencyConflict, QueueFull, StoreUnavailable
from stores.records import (
    CHAIN_LENGTH,
    FOLLOWER_LEASE,
    TASK_FIELDS,
    DeliveryState,
    IdempotencyKey,
    Picture,
    TaskRecord,
    TaskState,
    Turns,
    task_fields,
    task_record,
)
from stores.wakeups import Waiters


class Connection(Protocol):
    """What the store asks of a connection: sqlite3's, or PostgreSQL's behind its translation."""

    def execute(self, sql: str, parameters: Any = ()) -> Any: ...

    def executemany(self, sql: str, parameters: Any) -> Any: ...


class Database(Protocol):
    """Where the tables are. Each call raises StoreUnavailable when the database cannot be reached or written."""

    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction, the only one at this moment; rolled back if the block raises."""

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads."""

    def run(self, sql: str, parameters: Any) -> int:
        """One writing statement, whole by itself (it needs no turn); the number of rows it changed."""

    def one(self, sql: str, parameters: Any) -> dict | None:
        """The first row of one statement (a read, or a write that RETURNs), or None."""

    def close(self) -> None: ...


_FOLLOWED = f"('{TaskState.QUEUED}', '{TaskState.PENDING}')"  # states kept until they end
_COLUMNS = ", ".join(TASK_FIELDS)
_PLACEHOLDERS = ", ".join(f":{name}" for name in TASK_FIELDS)
_SETTLE = ", ".join(f"{name} = excluded.{name}" for name in TASK_FIELDS if name not in ("task_id", "sequence"))


class SqlStore:
    """Conversations, the ledger, idempotency keys and followers in SQL tables; `database` says where."""

    def __init__(self, database: Database, history_ttl: float, max_users: int, clock: Callable[[], float] = time.time):
        self.database = database
        self.history_ttl = history_ttl
        self.max_users = max_users
        self.clock = clock
        self._waiters = Waiters()

    # -- conversations ---------------------------------------------------------------------

    def last_picture(self, conversation: str) -> Picture | None:
        pictures = self._pictures(conversation, "DESC LIMIT 1")
        return pictures[0] if pictures else None

    def chain(self, conversation: str) -> list[Picture]:
        return self._pictures(conversation, "ASC")

    def undo(self, conversation: str) -> Picture | None:
        with self.database.transaction() as db:
            last = self._live(db, conversation, "DESC LIMIT 1")
            if not last:
                return None
            db.execute("DELETE FROM pictures WHERE conversation = ? AND task_id = ?", (conversation, last[0].task_id))
            db.execute("UPDATE history SET updated_at = ? WHERE conversation = ?", (self.clock(), conversation))
        return last[0]

    def forget(self, conversation: str) -> list[Picture]:
        with self.database.transaction() as db:
            dropped = self._live(db, conversation, "ASC")
            db.execute("DELETE FROM pictures WHERE conversation = ?", (conversation,))
            # every task recorded so far, its picture included, is before the forgetting; later ones are after it
            recorded = db.execute("SELECT coalesce(max(sequence), 0) AS last FROM tasks").fetchone()["last"]
            db.execute(
                "INSERT INTO history (conversation, forgotten_before, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (conversation) DO UPDATE SET forgotten_before = excluded.forgotten_before, "
                "updated_at = excluded.updated_at",
                (conversation, recorded, self.clock()),
            )
        return dropped

    def _pictures(self, conversation: str, order: str) -> list[Picture]:
        with self.database.reading() as db:
            return self._live(db, conversation, order)

    def _live(self, db: Connection, conversation: str, order: str) -> list[Picture]:
        """The chain's pictures in `order` (an ORDER BY tail), unless the conversation expired."""
        rows = db.execute(
            "SELECT p.task_id, p.image_url, p.prompt, p.created_at, p.upstream_image_url FROM pictures p "
            "JOIN history h ON h.conversation = p.conversation "
            f"WHERE p.conversation = ? AND h.updated_at > ? ORDER BY p.sequence {order}",
            (conversation, self.clock() - self.history_ttl),
        ).fetchall()
        return [Picture(**row) for row in rows]

    def _add_picture(self, db: Connection, record: TaskRecord) -> None:
        """A success joins its user's chain, in the order of recording, unless the user forgot since."""
        now = self.clock()
        history = db.execute(
            "SELECT forgotten_before, updated_at FROM history WHERE conversation = ?", (record.conversation,)
        ).fetchone()
        if history and record.sequence <= history["forgotten_before"]:
            return
        if history and history["updated_at"] <= now - self.history_ttl:  # expired: start a new chain
            db.execute("DELETE FROM pictures WHERE conversation = ?", (record.conversation,))
        picture = Picture.of(record, now)
        db.execute(
            "INSERT INTO pictures VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                record.conversation,
                record.sequence,
                picture.task_id,
                picture.image_url,
                picture.upstream_image_url,
                picture.prompt,
                now,
            ),
        )
        db.execute(
            "INSERT INTO history (conversation, forgotten_before, updated_at) VALUES (?, -1, ?) "
            "ON CONFLICT (conversation) DO UPDATE SET updated_at = excluded.updated_at",
            (record.conversation, now),
        )
        db.execute(
            "DELETE FROM pictures WHERE conversation = ? AND sequence NOT IN "
            "(SELECT sequence FROM pictures WHERE conversation = ? ORDER BY sequence DESC LIMIT ?)",
            (record.conversation, record.conversation, CHAIN_LENGTH),
        )

    # -- the ledger ------------------------------------------------------------------------

    def record_task(
        self, record: TaskRecord, key: IdempotencyKey | None = None, queue_max: int | None = None
    ) -> tuple[TaskRecord, bool]:
        with self.database.transaction() as db:
            if key is not None:
                existing = self._keyed_task(db, key)
                if existing is not None:
                    return existing, False
            if queue_max is not None and self._queue_depth(db) >= queue_max:
                raise QueueFull()
            if key is not None:
                db.execute(
                    "INSERT INTO idempotency VALUES (?, ?, ?, ?) ON CONFLICT (scope) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, task_id = excluded.task_id, created_at = excluded.created_at",
                    (key.scope, key.fingerprint, record.task_id, record.created_at),
                )
            values = task_fields(record)
            del values["sequence"]
            if record.state == TaskState.QUEUED:
                values["turn"] = self._next_turn(db, record.lane)
            columns = ", ".join(values)
            placeholders = ", ".join(f":{name}" for name in values)
            sequence = db.execute(
                f"INSERT INTO tasks ({columns}) VALUES ({placeholders}) RETURNING sequence", values
            ).fetchone()["sequence"]
            db.execute(
                "INSERT INTO followers VALUES (?, ?) ON CONFLICT DO NOTHING",
                (record.follower, self.clock() + FOLLOWER_LEASE),
            )
        return replace(record, sequence=sequence, turn=values["turn"]), True

    def keyed_task(self, key: IdempotencyKey) -> TaskRecord | None:
        with self.database.reading() as db:
            return self._keyed_task(db, key)

    def task(self, task_id: str) -> TaskRecord | None:
        row = self.database.one(
            f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ? UNION ALL "
            f"SELECT {_COLUMNS} FROM tasks WHERE upstream_task_id = ? LIMIT 1",
            (task_id, task_id),
        )
        return task_record(row) if row else None

    def submitted(self, task_id: str, upstream_task_id: str, key_id: str, submitted_at: float) -> None:
        self.database.run(
            "UPDATE tasks SET upstream_task_id = ?, key_id = ?, submitted_at = ? WHERE task_id = ?",
            (upstream_task_id, key_id, submitted_at, task_id),
        )

    def complete_task(self, record: TaskRecord) -> TaskRecord:
        with self.database.transaction() as db:
            changed = db.execute(
                f"INSERT INTO tasks ({_COLUMNS}) VALUES ({_PLACEHOLDERS}) "
                f"ON CONFLICT (task_id) DO UPDATE SET {_SETTLE} "
                f"WHERE tasks.state IN ('{TaskState.PENDING}', '{TaskState.UNCONFIRMED}')",
                task_fields(record),
            ).rowcount
            if changed and record.state == TaskState.SUCCESS and record.conversation is not None:
                self._add_picture(db, record)
            row = db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (record.task_id,)).fetchone()
        return task_record(row)

    def release_key(self, key: IdempotencyKey, task_id: str) -> None:
        self.database.run("DELETE FROM idempotency WHERE scope = ? AND task_id = ?", (key.scope, task_id))

    def claim_poll(self, task_id: str, interval: float) -> bool:
        now = self.clock()
        return bool(
            self.database.run(
                "UPDATE tasks SET last_poll = ? WHERE task_id = ? AND (last_poll IS NULL OR last_poll <= ?)",
                (now, task_id, now - interval),
            )
        )

    def first_time(self, key: str, ttl: float) -> bool:
        now = self.clock()
        with self.database.transaction() as db:
            db.execute("DELETE FROM seen WHERE key = ? AND until <= ?", (key, now))
            return db.execute("INSERT INTO seen VALUES (?, ?) ON CONFLICT DO NOTHING", (key, now + ttl)).rowcount == 1

    def keep_upload(self, url: str, until: float) -> None:
        self.database.run("INSERT INTO uploads (url, until) VALUES (?, ?)", (url, until))

    def renew_upload(self, url: str, until: float) -> None:
        self.database.run("UPDATE uploads SET until = ? WHERE url = ?", (until, url))

    def expired_uploads(self, now: float, limit: int) -> list[str]:
        with self.database.transaction() as db:
            rows = db.execute(
                "DELETE FROM uploads WHERE url IN (SELECT url FROM uploads WHERE until <= ? ORDER BY until LIMIT ?) "
                "RETURNING url",
                (now, limit),
            ).fetchall()
        return [row["url"] for row in rows]

    # -- the queue ---------------------------------------------------------------------------

    def take_turns(self, follower: str, now: float, pacing: Pacing, key_ids: list[str], limit: int) -> Turns:
        with self.database.transaction() as db:
            allowance, next_chance = self._allowances(db, now, pacing, key_ids, limit)
            wanted = min(limit, sum(allowance.values()))
            rows = db.execute(  # one more than wanted: is any left?
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.QUEUED}' ORDER BY turn, sequence LIMIT ?",
                (wanted + 1,),
            ).fetchall()
            left, rows = len(rows) > wanted, rows[:wanted]
            taken = [
                task_record(
                    {**row, "state": TaskState.PENDING, "follower": follower, "key_id": key_id, "taken_at": now}
                )
                for row, key_id in zip(rows, _turns_of_keys(allowance), strict=False)
            ]
            db.executemany(
                f"UPDATE tasks SET state = '{TaskState.PENDING}', follower = ?, key_id = ?, taken_at = ? "
                "WHERE task_id = ?",
                [(follower, record.key_id, now, record.task_id) for record in taken],
            )
            if pacing.rate is not None:
                latest = now + pacing.longest_submission
                db.executemany(  # a task taken again with the same key: its earlier attempt was answered busy
                    "DELETE FROM submissions WHERE task_id = ? AND key_id = ?", [(r.task_id, r.key_id) for r in taken]
                )
                db.executemany(
                    "INSERT INTO submissions VALUES (?, ?, ?)", [(r.key_id, r.task_id, latest) for r in taken]
                )
            if taken:
                reached = max(record.turn for record in taken)
                db.execute("UPDATE turns SET current = ? WHERE current < ?", (reached, reached))
                db.execute(
                    "INSERT INTO followers VALUES (?, ?) ON CONFLICT DO NOTHING", (follower, now + FOLLOWER_LEASE)
                )
                next_chance = self._allowances(db, now, pacing, key_ids, limit)[1]
        return Turns(taken, next_chance, left)

    def sending(self, task_id: str, follower: str, at: float) -> bool:
        return bool(
            self.database.run(
                f"UPDATE tasks SET sending_at = ? WHERE task_id = ? AND state = '{TaskState.PENDING}' "
                "AND follower = ? AND upstream_task_id IS NULL",
                (at, task_id, follower),
            )
        )

    def unsent(self, follower: str, taken_before: float, limit: int) -> list[TaskRecord]:
        with self.database.reading() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.PENDING}' AND follower = ? "
                "AND upstream_task_id IS NULL AND sending_at IS NULL AND taken_at < ? LIMIT ?",
                (follower, taken_before, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def sent(self, task_id: str, key_id: str, at: float) -> None:
        self.database.run(
            "UPDATE submissions SET at = ? WHERE task_id = ? AND key_id = ? AND at > ?", (at, task_id, key_id, at)
        )

    def requeue(self, task_id: str, follower: str, hold_key_until: float | None = None) -> bool:
        with self.database.transaction() as db:
            taken = db.execute(
                f"SELECT key_id FROM tasks WHERE task_id = ? AND state = '{TaskState.PENDING}' "
                "AND upstream_task_id IS NULL AND follower = ?",
                (task_id, follower),
            ).fetchone()
            if taken is None:
                return False
            db.execute(
                f"UPDATE tasks SET state = '{TaskState.QUEUED}', key_id = NULL, follower = '', sending_at = NULL "
                "WHERE task_id = ?",
                (task_id,),
            )
            if taken["key_id"] is not None and hold_key_until is not None:
                db.execute(
                    "INSERT INTO key_holds VALUES (?, ?) ON CONFLICT (key_id) DO UPDATE SET until = excluded.until",
                    (taken["key_id"], hold_key_until),
                )
        return True

    def end_queued(self, record: TaskRecord) -> TaskRecord | None:
        values = task_fields(record)
        del values["sequence"], values["turn"]
        settings = ", ".join(f"{name} = :{name}" for name in values if name != "task_id")
        with self.database.transaction() as db:
            row = db.execute(
                f"UPDATE tasks SET {settings} WHERE task_id = :task_id AND state = '{TaskState.QUEUED}' "
                f"RETURNING {_COLUMNS}",
                values,
            ).fetchone()
        return task_record(row) if row else None

    def queued_before(self, created_before: float, limit: int) -> list[TaskRecord]:
        with self.database.reading() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.QUEUED}' AND created_at < ? "
                "ORDER BY turn, sequence LIMIT ?",
                (created_before, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def queue_position(self, record: TaskRecord) -> int | None:
        row = self.database.one(
            f"SELECT (SELECT count(*) FROM tasks WHERE state = '{TaskState.QUEUED}' AND "
            "(turn < t.turn OR (turn = t.turn AND sequence < t.sequence))) + 1 AS position "
            f"FROM tasks t WHERE t.task_id = ? AND t.state = '{TaskState.QUEUED}'",
            (record.task_id,),
        )
        return row["position"] if row else None

    def queue_depth(self) -> int:
        with self.database.reading() as db:
            return self._queue_depth(db)

    @staticmethod
    def _queue_depth(db: Connection) -> int:
        return db.execute(f"SELECT count(*) AS depth FROM tasks WHERE state = '{TaskState.QUEUED}'").fetchone()["depth"]

    def _next_turn(self, db: Connection, lane: str | None) -> int:
        """The lane's next turn: right after its last one still queued, never before the turn the queue has reached."""
        turns = db.execute(
            "SELECT (SELECT current FROM turns) AS current, "
            f"(SELECT max(turn) FROM tasks WHERE state = '{TaskState.QUEUED}' AND lane = ?) AS last",
            (lane,),
        ).fetchone()
        return turns["current"] if turns["last"] is None else max(turns["current"], turns["last"] + 1)

    def _allowances(
        self, db: Connection, now: float, pacing: Pacing, key_ids: list[str], limit: int
    ) -> tuple[dict[str, int], float | None]:
        """How many turns each key allows now, and the earliest moment a key that allows none may allow one."""
        holds = {row["key_id"]: row["until"] for row in db.execute("SELECT * FROM key_holds WHERE until > ?", (now,))}
        allowance, chances = {}, []
        db.execute("DELETE FROM submissions WHERE at <= ?", (now - pacing.spacing,))
        for key_id in key_ids:
            if key_id in holds:
                chances.append(holds[key_id])
                continue
            left = limit
            if pacing.rate is not None:
                recent = [
                    row["at"]
                    for row in db.execute("SELECT at FROM submissions WHERE key_id = ? ORDER BY at", (key_id,))
                ]
                left = min(left, pacing.rate - len(recent))
                if left <= 0:
                    chances.append(recent[len(recent) - pacing.rate] + pacing.spacing)
            if pacing.max_running is not None:
                running = db.execute(
                    f"SELECT count(*) AS n FROM tasks WHERE state = '{TaskState.PENDING}' AND key_id = ?", (key_id,)
                ).fetchone()["n"]
                left = min(left, pacing.max_running - running)
            if left > 0:
                allowance[key_id] = left
        return allowance, min(chances, default=None)

    # -- webhooks to callers ------------------------------------------------------------------

    def due_deliveries(self, now: float, lease_until: float, limit: int) -> list[TaskRecord]:
        with self.database.transaction() as db:
            rows = db.execute(
                f"UPDATE tasks SET webhook_due = ? WHERE task_id IN (SELECT task_id FROM tasks "
                f"WHERE webhook_state = '{DeliveryState.PENDING}' AND webhook_due <= ? ORDER BY webhook_due LIMIT ?) "
                f"RETURNING {_COLUMNS}",
                (lease_until, now, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def delivery_attempted(self, task_id: str, webhook_id: str, state: str, attempts: int, due: float | None) -> None:
        self.database.run(
            "UPDATE tasks SET webhook_state = ?, webhook_attempts = ?, webhook_due = ? "
            "WHERE task_id = ? AND webhook_id = ?",
            (state, attempts, due, task_id, webhook_id),
        )

    # -- followers -------------------------------------------------------------------------

    def heartbeat(self, follower: str, alive_until: float) -> None:
        self.database.run(
            "INSERT INTO followers VALUES (?, ?) "
            "ON CONFLICT (follower) DO UPDATE SET alive_until = excluded.alive_until",
            (follower, alive_until),
        )

    def take_over(self, follower: str, now: float, limit: int) -> list[TaskRecord]:
        with self.database.transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.PENDING}' AND follower != ? "
                "AND follower NOT IN (SELECT follower FROM followers WHERE alive_until >= ?) LIMIT ?",
                (follower, now, limit),
            ).fetchall()
            db.executemany("UPDATE tasks SET follower = ? WHERE task_id = ?", [(follower, r["task_id"]) for r in rows])
        return [task_record({**row, "follower": follower}) for row in rows]

    def retire(self, follower: str) -> None:
        self.database.run("UPDATE followers SET alive_until = 0 WHERE follower = ?", (follower,))

    # -- wake-ups, health, housekeeping -----------------------------------------------------

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when `notify(task_id)` is called in this process, while the block runs."""
        return self._waiters.listen(task_id)

    def notify(self, task_id: str) -> None:
        self._waiters.wake(task_id)

    def on_notify(self, callback: Callable[[str], None]) -> None:
        self._waiters.subscribe(callback)

    # -- RATE_LIMIT's counters, when several processes count together ---------------------------

    def count(self, key: str, window: float, amount: int = 1) -> int:
        """Add `amount` to the counter, which starts afresh `window` seconds after its first count; its total."""
        now = self.clock()
        return self.database.one(  # one statement, whole by itself: it needs no turn among the writers
            "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
            "hits = CASE WHEN counters.expires_at <= ? THEN excluded.hits ELSE counters.hits + excluded.hits END, "
            "expires_at = CASE WHEN counters.expires_at <= ? THEN excluded.expires_at ELSE counters.expires_at END "
            "RETURNING hits",
            (key, amount, now + window, now, now),
        )["hits"]

    def counter(self, key: str) -> tuple[int, float]:
        """The counter's total, and when it starts afresh (now, for a counter with no count)."""
        now = self.clock()
        row = self.database.one("SELECT hits, expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, now))
        return (row["hits"], row["expires_at"]) if row else (0, now)

    def clear_counter(self, key: str) -> None:
        self.database.run("DELETE FROM counters WHERE key = ?", (key,))

    def ping(self) -> bool:
        try:
            # a write that changes a value (SQLite skips writing an unchanged row): a full disk or a read-only file
            # fails it
            with self.database.transaction() as db:
                db.execute("UPDATE health SET writes = writes + 1")
        except StoreUnavailable:
            return False
        return True

    def purge(self, now: float) -> list[Picture]:
        """Drop what has outlived its time, and the least recently updated users beyond the limit."""
        with self.database.transaction() as db:
            db.execute(f"DELETE FROM tasks WHERE created_at < ? AND state NOT IN {_FOLLOWED}", (now - TASK_TTL,))
            db.execute("DELETE FROM key_holds WHERE until <= ?", (now,))
            db.execute("DELETE FROM tasks WHERE created_at < ?", (now - 2 * TASK_TTL,))
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEMPOTENCY_TTL,))
            db.execute("DELETE FROM seen WHERE until <= ?", (now,))
            db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            db.execute("DELETE FROM history WHERE updated_at <= ?", (now - self.history_ttl,))
            db.execute(
                "DELETE FROM history WHERE conversation NOT IN "
                "(SELECT conversation FROM history ORDER BY updated_at DESC LIMIT ?)",
                (self.max_users,),
            )
            dropped = db.execute(
                "DELETE FROM pictures WHERE conversation NOT IN (SELECT conversation FROM history) "
                "RETURNING task_id, image_url, prompt, created_at, upstream_image_url"
            ).fetchall()
            db.execute(
                "DELETE FROM followers WHERE alive_until < ? AND follower NOT IN "
                f"(SELECT follower FROM tasks WHERE state = '{TaskState.PENDING}')",
                (now - TASK_TTL,),
            )
        return [Picture(**row) for row in dropped]

    def close(self) -> None:
        self.database.close()

    # -- plumbing --------------------------------------------------------------------------

    def _keyed_task(self, db: Connection, key: IdempotencyKey) -> TaskRecord | None:
        row = db.execute("SELECT fingerprint, task_id FROM idempotency WHERE scope = ?", (key.scope,)).fetchone()
        if row is None:
            return None
        task = db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (row["task_id"],)).fetchone()
        if task is None:
            return None  # the task is gone: the key is free again
        if row["fingerprint"] != key.fingerprint:
            raise IdempotencyConflict()
        return task_record(task)


def _turns_of_keys(allowance: dict[str, int]):
    """Keys for successive turns, taking the keys in rotation, each as often as its allowance says."""
    left = dict(allowance)
    while left:
        for key_id in list(left):
            yield key_id
            left[key_id] -= 1
            if not left[key_id]:
                del left[key_id]
