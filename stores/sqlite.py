"""The default store: one SQLite file (the standard library's sqlite3), used when REDIS_URL is not set.

WAL journal with synchronous=NORMAL: a commit is safe when the process is killed (not against
power loss), and costs no fsync. One connection per process behind a lock: every statement takes
microseconds, so callers queue for it briefly instead of opening connections. Several processes
(a reload's overlap) share the file safely; the busy time-out covers their brief write locks.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace

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

# Each entry brings the schema from the version before it to the next; PRAGMA user_version says
# which ones a database has had. Append, never edit: a release that changes the schema adds one.
MIGRATIONS = (
    """
    CREATE TABLE tasks (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of recording, never reused
        task_id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        conversation TEXT,
        user_id TEXT,
        mode TEXT NOT NULL,
        source_image_urls TEXT NOT NULL,
        used_previous_image INTEGER NOT NULL,
        created_at REAL NOT NULL,
        callback_secret TEXT,
        follower TEXT NOT NULL,
        upstream_task_id TEXT UNIQUE,
        key_id TEXT,
        submitted_at REAL,
        state TEXT NOT NULL,
        image_urls TEXT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        completed_at REAL,
        last_poll REAL
    );
    CREATE INDEX tasks_pending ON tasks (follower) WHERE state = 'pending';
    CREATE INDEX tasks_created ON tasks (created_at);
    CREATE TABLE history (
        conversation TEXT PRIMARY KEY,
        image_url TEXT,  -- NULL after the user asked to forget: the sequence still bars older results
        sequence INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX history_updated ON history (updated_at);
    CREATE TABLE idempotency (
        scope TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        task_id TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE followers (
        follower TEXT PRIMARY KEY,
        alive_until REAL NOT NULL
    );
    """,
    """
    ALTER TABLE tasks ADD COLUMN callback_url TEXT;
    ALTER TABLE tasks ADD COLUMN webhook_id TEXT;
    ALTER TABLE tasks ADD COLUMN webhook_state TEXT;
    ALTER TABLE tasks ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN webhook_due REAL;
    CREATE INDEX tasks_webhooks_due ON tasks (webhook_due) WHERE webhook_state = 'pending';
    """,
    """
    ALTER TABLE tasks ADD COLUMN prompt TEXT;
    ALTER TABLE tasks ADD COLUMN upstream_image_urls TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE pictures (
        conversation TEXT NOT NULL,
        sequence INTEGER NOT NULL,  -- of the task that made it: the chain's order
        task_id TEXT NOT NULL,
        image_url TEXT NOT NULL,
        upstream_image_url TEXT,
        prompt TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (conversation, sequence)
    );
    INSERT INTO pictures SELECT conversation, sequence, '', image_url, image_url, NULL, updated_at
        FROM history WHERE image_url IS NOT NULL;
    UPDATE history SET sequence = -1 WHERE image_url IS NOT NULL;
    ALTER TABLE history DROP COLUMN image_url;
    ALTER TABLE history RENAME COLUMN sequence TO forgotten_before;  -- results of older tasks stay out
    """,
    """
    CREATE TABLE seen (key TEXT PRIMARY KEY, until REAL NOT NULL);
    """,
    """
    ALTER TABLE tasks RENAME COLUMN callback_url TO deliver_to;  -- "callback" is the upstream's call to us
    """,
    """
    ALTER TABLE tasks ADD COLUMN model TEXT NOT NULL DEFAULT 'nano-banana';
    ALTER TABLE tasks ADD COLUMN aspect_ratio TEXT;
    ALTER TABLE tasks ADD COLUMN resolution TEXT;
    ALTER TABLE tasks ADD COLUMN num_images INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN lane TEXT;
    ALTER TABLE tasks ADD COLUMN turn INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN taken_at REAL;
    ALTER TABLE tasks ADD COLUMN sending_at REAL;
    CREATE INDEX tasks_queue ON tasks (turn, sequence) WHERE state = 'queued';
    CREATE INDEX tasks_lanes ON tasks (lane, turn) WHERE state = 'queued';
    CREATE INDEX tasks_running ON tasks (key_id) WHERE state = 'pending';
    CREATE TABLE turns (current INTEGER NOT NULL);  -- one row: the turn of the last task taken from the queue
    INSERT INTO turns VALUES (0);
    -- recent submissions per key: when each reached the upstream, at the latest (Pacing.longest_submission)
    CREATE TABLE submissions (key_id TEXT NOT NULL, task_id TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX submissions_key ON submissions (key_id, at);
    CREATE INDEX submissions_task ON submissions (task_id);
    CREATE TABLE key_holds (key_id TEXT PRIMARY KEY, until REAL NOT NULL);  -- a key the upstream found busy
    """,
    """
    UPDATE tasks SET owner = char(31) || owner, conversation = char(31) || conversation WHERE owner = 'telegram';
    UPDATE tasks SET lane = char(31) || lane WHERE lane LIKE 'telegram/telegram:%';
    UPDATE pictures SET conversation = char(31) || conversation WHERE conversation LIKE 'telegram/telegram:%';
    UPDATE history SET conversation = char(31) || conversation WHERE conversation LIKE 'telegram/telegram:%';
    """,
    """
    CREATE TABLE health (writes INTEGER NOT NULL);  -- one row, written by each health check
    INSERT INTO health VALUES (0);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 5000

_FOLLOWED = f"('{TaskState.QUEUED}', '{TaskState.PENDING}')"  # states kept until they end
_COLUMNS = ", ".join(TASK_FIELDS)
_PLACEHOLDERS = ", ".join(f":{name}" for name in TASK_FIELDS)
_SETTLE = ", ".join(f"{name} = excluded.{name}" for name in TASK_FIELDS if name not in ("task_id", "sequence"))


class SqliteStore:
    """Conversations, the ledger, idempotency keys and followers in one SQLite file."""

    def __init__(self, path: str, history_ttl: float, max_users: int, clock: Callable[[], float] = time.time):
        self.path = path
        self.history_ttl = history_ttl
        self.max_users = max_users
        self.clock = clock
        self._lock = threading.Lock()
        self._waiters = Waiters()
        self._db = open_database(path)

    # -- conversations ---------------------------------------------------------------------

    def last_picture(self, conversation: str) -> Picture | None:
        pictures = self._pictures(conversation, "DESC LIMIT 1")
        return pictures[0] if pictures else None

    def chain(self, conversation: str) -> list[Picture]:
        return self._pictures(conversation, "ASC")

    def undo(self, conversation: str) -> Picture | None:
        with self._transaction() as db:
            last = self._live(db, conversation, "DESC LIMIT 1")
            if not last:
                return None
            db.execute("DELETE FROM pictures WHERE conversation = ? AND task_id = ?", (conversation, last[0].task_id))
            db.execute("UPDATE history SET updated_at = ? WHERE conversation = ?", (self.clock(), conversation))
        return last[0]

    def forget(self, conversation: str) -> list[Picture]:
        with self._transaction() as db:
            dropped = self._live(db, conversation, "ASC")
            db.execute("DELETE FROM pictures WHERE conversation = ?", (conversation,))
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO history (conversation, forgotten_before, updated_at) VALUES (?, ?, ?)",
                (conversation, row["seq"] if row else 0, self.clock()),
            )
        return dropped

    def _pictures(self, conversation: str, order: str) -> list[Picture]:
        with self._lock, _unavailable_on_error():
            return self._live(self._db, conversation, order)

    def _live(self, db: sqlite3.Connection, conversation: str, order: str) -> list[Picture]:
        """The chain's pictures in `order` (an ORDER BY tail), unless the conversation expired."""
        rows = db.execute(
            "SELECT p.task_id, p.image_url, p.prompt, p.created_at, p.upstream_image_url FROM pictures p "
            "JOIN history h ON h.conversation = p.conversation "
            f"WHERE p.conversation = ? AND h.updated_at > ? ORDER BY p.sequence {order}",
            (conversation, self.clock() - self.history_ttl),
        ).fetchall()
        return [Picture(**row) for row in rows]

    def _add_picture(self, db: sqlite3.Connection, record: TaskRecord) -> None:
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
            "INSERT OR IGNORE INTO pictures VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        with self._transaction() as db:
            if key is not None:
                existing = self._keyed_task(db, key)
                if existing is not None:
                    return existing, False
            if queue_max is not None and self._queue_depth(db) >= queue_max:
                raise QueueFull()
            if key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                    (key.scope, key.fingerprint, record.task_id, record.created_at),
                )
            values = task_fields(record)
            del values["sequence"]
            if record.state == TaskState.QUEUED:
                values["turn"] = self._next_turn(db, record.lane)
            columns = ", ".join(values)
            placeholders = ", ".join(f":{name}" for name in values)
            sequence = db.execute(f"INSERT INTO tasks ({columns}) VALUES ({placeholders})", values).lastrowid
            db.execute(
                "INSERT OR IGNORE INTO followers VALUES (?, ?)", (record.follower, self.clock() + FOLLOWER_LEASE)
            )
        return replace(record, sequence=sequence, turn=values["turn"]), True

    def keyed_task(self, key: IdempotencyKey) -> TaskRecord | None:
        with self._lock, _unavailable_on_error():
            return self._keyed_task(self._db, key)

    def task(self, task_id: str) -> TaskRecord | None:
        row = self._one(
            f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ? UNION ALL "
            f"SELECT {_COLUMNS} FROM tasks WHERE upstream_task_id = ? LIMIT 1",
            (task_id, task_id),
        )
        return task_record(row) if row else None

    def submitted(self, task_id: str, upstream_task_id: str, key_id: str, submitted_at: float) -> None:
        self._run(
            "UPDATE tasks SET upstream_task_id = ?, key_id = ?, submitted_at = ? WHERE task_id = ?",
            (upstream_task_id, key_id, submitted_at, task_id),
        )

    def complete_task(self, record: TaskRecord) -> TaskRecord:
        with self._transaction() as db:
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
        self._run("DELETE FROM idempotency WHERE scope = ? AND task_id = ?", (key.scope, task_id))

    def claim_poll(self, task_id: str, interval: float) -> bool:
        now = self.clock()
        return bool(
            self._run(
                "UPDATE tasks SET last_poll = ? WHERE task_id = ? AND (last_poll IS NULL OR last_poll <= ?)",
                (now, task_id, now - interval),
            )
        )

    def first_time(self, key: str, ttl: float) -> bool:
        now = self.clock()
        with self._transaction() as db:
            db.execute("DELETE FROM seen WHERE key = ? AND until <= ?", (key, now))
            return db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (key, now + ttl)).rowcount == 1

    # -- the queue ---------------------------------------------------------------------------

    def take_turns(self, follower: str, now: float, pacing: Pacing, key_ids: list[str], limit: int) -> Turns:
        with self._transaction() as db:
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
                db.execute("UPDATE turns SET current = max(current, ?)", (max(record.turn for record in taken),))
                db.execute("INSERT OR IGNORE INTO followers VALUES (?, ?)", (follower, now + FOLLOWER_LEASE))
                next_chance = self._allowances(db, now, pacing, key_ids, limit)[1]
        return Turns(taken, next_chance, left)

    def sending(self, task_id: str, follower: str, at: float) -> bool:
        return bool(
            self._run(
                f"UPDATE tasks SET sending_at = ? WHERE task_id = ? AND state = '{TaskState.PENDING}' "
                "AND follower = ? AND upstream_task_id IS NULL",
                (at, task_id, follower),
            )
        )

    def unsent(self, follower: str, taken_before: float, limit: int) -> list[TaskRecord]:
        with self._lock, _unavailable_on_error():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.PENDING}' AND follower = ? "
                "AND upstream_task_id IS NULL AND sending_at IS NULL AND taken_at < ? LIMIT ?",
                (follower, taken_before, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def sent(self, task_id: str, key_id: str, at: float) -> None:
        self._run(
            "UPDATE submissions SET at = ? WHERE task_id = ? AND key_id = ? AND at > ?", (at, task_id, key_id, at)
        )

    def requeue(self, task_id: str, follower: str, hold_key_until: float | None = None) -> bool:
        with self._transaction() as db:
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
                db.execute("INSERT OR REPLACE INTO key_holds VALUES (?, ?)", (taken["key_id"], hold_key_until))
        return True

    def end_queued(self, record: TaskRecord) -> TaskRecord | None:
        values = task_fields(record)
        del values["sequence"], values["turn"]
        settings = ", ".join(f"{name} = :{name}" for name in values if name != "task_id")
        row = self._one(
            f"UPDATE tasks SET {settings} WHERE task_id = :task_id AND state = '{TaskState.QUEUED}' "
            f"RETURNING {_COLUMNS}",
            values,
        )
        return task_record(row) if row else None

    def queued_before(self, created_before: float, limit: int) -> list[TaskRecord]:
        with self._lock, _unavailable_on_error():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.QUEUED}' AND created_at < ? "
                "ORDER BY turn, sequence LIMIT ?",
                (created_before, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def queue_position(self, record: TaskRecord) -> int | None:
        row = self._one(
            f"SELECT (SELECT count(*) FROM tasks WHERE state = '{TaskState.QUEUED}' AND "
            "(turn < t.turn OR (turn = t.turn AND sequence < t.sequence))) + 1 AS position "
            f"FROM tasks t WHERE t.task_id = ? AND t.state = '{TaskState.QUEUED}'",
            (record.task_id,),
        )
        return row["position"] if row else None

    def queue_depth(self) -> int:
        with self._lock, _unavailable_on_error():
            return self._queue_depth(self._db)

    @staticmethod
    def _queue_depth(db: sqlite3.Connection) -> int:
        return db.execute(f"SELECT count(*) AS depth FROM tasks WHERE state = '{TaskState.QUEUED}'").fetchone()["depth"]

    def _next_turn(self, db: sqlite3.Connection, lane: str | None) -> int:
        """The lane's next turn: right after its last one still queued, never before the turn the queue has reached."""
        turns = db.execute(
            "SELECT (SELECT current FROM turns) AS current, "
            f"(SELECT max(turn) FROM tasks WHERE state = '{TaskState.QUEUED}' AND lane = ?) AS last",
            (lane,),
        ).fetchone()
        return turns["current"] if turns["last"] is None else max(turns["current"], turns["last"] + 1)

    def _allowances(
        self, db: sqlite3.Connection, now: float, pacing: Pacing, key_ids: list[str], limit: int
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
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE tasks SET webhook_due = ? WHERE task_id IN (SELECT task_id FROM tasks "
                f"WHERE webhook_state = '{DeliveryState.PENDING}' AND webhook_due <= ? ORDER BY webhook_due LIMIT ?) "
                f"RETURNING {_COLUMNS}",
                (lease_until, now, limit),
            ).fetchall()
        return [task_record(row) for row in rows]

    def delivery_attempted(self, task_id: str, webhook_id: str, state: str, attempts: int, due: float | None) -> None:
        self._run(
            "UPDATE tasks SET webhook_state = ?, webhook_attempts = ?, webhook_due = ? "
            "WHERE task_id = ? AND webhook_id = ?",
            (state, attempts, due, task_id, webhook_id),
        )

    # -- followers -------------------------------------------------------------------------

    def heartbeat(self, follower: str, alive_until: float) -> None:
        self._run(
            "INSERT INTO followers VALUES (?, ?) "
            "ON CONFLICT (follower) DO UPDATE SET alive_until = excluded.alive_until",
            (follower, alive_until),
        )

    def take_over(self, follower: str, now: float, limit: int) -> list[TaskRecord]:
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = '{TaskState.PENDING}' AND follower != ? "
                "AND follower NOT IN (SELECT follower FROM followers WHERE alive_until >= ?) LIMIT ?",
                (follower, now, limit),
            ).fetchall()
            db.executemany("UPDATE tasks SET follower = ? WHERE task_id = ?", [(follower, r["task_id"]) for r in rows])
        return [task_record({**row, "follower": follower}) for row in rows]

    def retire(self, follower: str) -> None:
        self._run("UPDATE followers SET alive_until = 0 WHERE follower = ?", (follower,))

    # -- wake-ups, health, housekeeping -----------------------------------------------------

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when `notify(task_id)` is called in this process, while the block runs."""
        return self._waiters.listen(task_id)

    def notify(self, task_id: str) -> None:
        self._waiters.wake(task_id)

    def on_notify(self, callback: Callable[[str], None]) -> None:
        self._waiters.subscribe(callback)

    def ping(self) -> bool:
        try:
            # a write that changes a value (SQLite skips writing an unchanged row): a full disk or a read-only file
            # fails it
            with self._transaction() as db:
                db.execute("UPDATE health SET writes = writes + 1")
        except StoreUnavailable:
            return False
        return True

    def purge(self, now: float) -> list[Picture]:
        """Drop what has outlived its time, and the least recently updated users beyond the limit."""
        with self._transaction() as db:
            db.execute(f"DELETE FROM tasks WHERE created_at < ? AND state NOT IN {_FOLLOWED}", (now - TASK_TTL,))
            db.execute("DELETE FROM key_holds WHERE until <= ?", (now,))
            db.execute("DELETE FROM tasks WHERE created_at < ?", (now - 2 * TASK_TTL,))
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEMPOTENCY_TTL,))
            db.execute("DELETE FROM seen WHERE until <= ?", (now,))
            db.execute("DELETE FROM history WHERE updated_at <= ?", (now - self.history_ttl,))
            db.execute(
                "DELETE FROM history WHERE conversation IN "
                "(SELECT conversation FROM history ORDER BY updated_at DESC LIMIT -1 OFFSET ?)",
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
        with self._lock:
            self._db.close()

    # -- plumbing --------------------------------------------------------------------------

    def _keyed_task(self, db: sqlite3.Connection, key: IdempotencyKey) -> TaskRecord | None:
        row = db.execute("SELECT fingerprint, task_id FROM idempotency WHERE scope = ?", (key.scope,)).fetchone()
        if row is None:
            return None
        task = db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (row["task_id"],)).fetchone()
        if task is None:
            return None  # the task is gone: the key is free again
        if row["fingerprint"] != key.fingerprint:
            raise IdempotencyConflict()
        return task_record(task)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so it never has to be retried."""
        with self._lock, _unavailable_on_error():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _run(self, sql: str, parameters: tuple) -> int:
        with self._lock, _unavailable_on_error():
            return self._db.execute(sql, parameters).rowcount

    def _one(self, sql: str, parameters: tuple) -> sqlite3.Row | None:
        with self._lock, _unavailable_on_error():
            return self._db.execute(sql, parameters).fetchone()


def _turns_of_keys(allowance: dict[str, int]):
    """Keys for successive turns, taking the keys in rotation, each as often as its allowance says."""
    left = dict(allowance)
    while left:
        for key_id in list(left):
            yield key_id
            left[key_id] -= 1
            if not left[key_id]:
                del left[key_id]


def open_database(path: str) -> sqlite3.Connection:
    """Open (creating if need be) the database at `path` and bring its schema up to date."""
    if path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = _row_as_dict
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA journal_size_limit = 16777216")  # a WAL grown by a burst shrinks back to 16 MB
    migrate(db)
    return db


def check_database(path: str) -> str | None:
    """At start-up: raise DatabaseError if the file is damaged (SQLite's quick check); say so if an existing file
    was empty (its records are gone: a truncated or replaced file). None when all is well."""
    if path == ":memory:" or not os.path.exists(path):
        return None
    if os.path.getsize(path) == 0:
        return f"DATABASE_PATH={path!r} is an empty file: the service starts with no tasks and no conversations"
    db = sqlite3.connect(path)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    finally:
        db.close()
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"the file is damaged ({problems[0]}); restore it from a backup, or move it away")
    return None


def migrate(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()["user_version"]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the database has schema version {version}, newer than this release knows ({SCHEMA_VERSION})"
            )
        for script in MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _row_as_dict(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as error:  # locked past the busy time-out, disk full, file gone
        raise StoreUnavailable(str(error)) from None
    except sqlite3.ProgrammingError as error:  # closed while the worker stops: work still under way gives up
        raise StoreUnavailable(str(error)) from None
