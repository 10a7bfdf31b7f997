"""The default store: one SQLite file (the standard library's sqlite3), used when neither DATABASE_URL nor
REDIS_URL names another. The SQL store's rules (stores/sql.py) on SQLite's schema and connection.

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
from contextlib import contextmanager
from typing import Any

from errors import StoreUnavailable
from stores.records import Picture
from stores.sql import SqlStore

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
    """
    CREATE TABLE wakeups (  -- tasks that ended, for the waiters of the other processes on this file
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        source INTEGER NOT NULL,  -- the process that wrote it, which woke its own waiters at once
        at REAL NOT NULL
    );
    CREATE TABLE counters (key TEXT PRIMARY KEY, hits INTEGER NOT NULL, expires_at REAL NOT NULL);  -- RATE_LIMIT
    """,
    """
    CREATE TABLE uploads (url TEXT PRIMARY KEY, until REAL NOT NULL);  -- pictures people uploaded, kept until
    CREATE INDEX uploads_until ON uploads (until);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 5000
WAKE_LOOK_EVERY = 0.05  # seconds between two looks for the wake-ups of other processes (shared files only)
WAKEUPS_KEPT = 60.0  # seconds a wake-up is kept for the processes that have not looked yet


class SqliteStore(SqlStore):
    """Conversations, the ledger, idempotency keys and followers in one SQLite file.

    `shared`: several worker processes use the file (WEB_CONCURRENCY above 1). A task's end is then also written
    to `wakeups`, and each process looks for those of the others whenever the file changed (PRAGMA data_version,
    which reads no page), every WAKE_LOOK_EVERY seconds.
    """

    def __init__(
        self,
        path: str,
        history_ttl: float,
        max_users: int,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ):
        self.path = path
        self.shared = shared
        super().__init__(SqliteDatabase(path), history_ttl, max_users, clock)
        self._watcher: threading.Thread | None = None
        self._watcher_lock = threading.Lock()
        self._closed = threading.Event()

    def listen(self, task_id: str):
        self._start_watching()
        return super().listen(task_id)

    def notify(self, task_id: str) -> None:
        super().notify(task_id)
        if self.shared:
            self.database.run(
                "INSERT INTO wakeups (task_id, source, at) VALUES (?, ?, ?)", (task_id, os.getpid(), self.clock())
            )

    def on_notify(self, callback: Callable[[str], None]) -> None:
        super().on_notify(callback)
        self._start_watching()

    def purge(self, now: float) -> list[Picture]:
        dropped = super().purge(now)
        self.database.run("DELETE FROM wakeups WHERE at < ?", (now - WAKEUPS_KEPT,))
        return dropped

    def close(self) -> None:
        self._closed.set()
        if self._watcher:
            self._watcher.join(timeout=5)
        super().close()

    def _start_watching(self) -> None:
        if not self.shared or self._watcher is not None:  # every waiting request asks: no lock once it runs
            return
        with self._watcher_lock:
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._relay_wakes, name="sqlite-wakes", daemon=True)
                self._watcher.start()

    def _relay_wakes(self) -> None:
        """Wake this process's waiters for the ends other processes wrote, for the life of the process."""
        seen, version = None, None
        while not self._closed.wait(WAKE_LOOK_EVERY):
            try:
                with self.database.reading() as db:
                    if seen is None:
                        seen = db.execute("SELECT coalesce(max(id), 0) AS last FROM wakeups").fetchone()["last"]
                    now = db.execute("PRAGMA data_version").fetchone()["data_version"]
                    if now == version:
                        continue
                    version = now
                    rows = db.execute(
                        "SELECT id, task_id FROM wakeups WHERE id > ? AND source != ? ORDER BY id",
                        (seen, os.getpid()),
                    ).fetchall()
            except StoreUnavailable:
                continue  # the followers' polls cover the gap
            for row in rows:
                seen = row["id"]
                self._waiters.wake(row["task_id"])


class SqliteDatabase:
    """One connection per process behind a lock; a write transaction begins IMMEDIATE, so it never has to be
    retried. While another process writes, it waits its turn in short sleeps that let this process's other
    greenlets run: SQLite's own busy wait would hold the whole worker still."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._db = open_database(path)
        self._db.execute("PRAGMA busy_timeout = 0")  # _patiently waits instead

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _unavailable_on_error():
            _patiently(lambda: self._db.execute("BEGIN IMMEDIATE"))
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _unavailable_on_error():
            yield self._db

    def run(self, sql: str, parameters: Any) -> int:
        with self._lock, _unavailable_on_error():
            return _patiently(lambda: self._db.execute(sql, parameters).rowcount)

    def one(self, sql: str, parameters: Any) -> dict | None:
        with self._lock, _unavailable_on_error():
            return _patiently(lambda: self._db.execute(sql, parameters).fetchone())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _patiently(action: Callable[[], Any]) -> Any:
    """`action()`, again after a short sleep while another process holds the write lock, for BUSY_TIMEOUT_MS."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.0005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            if "database is locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


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
