"""What only PostgreSQL has to prove: several processes' stores at once on one real server (the store suite
in test_store.py and test_queue_store.py runs on it too), wake-ups across them, migrations, outages."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import psycopg
import pytest

from config import Pacing
from errors import StoreUnavailable
from stores.postgres import SCHEMA_VERSION, PostgresStore
from stores.records import TaskState
from tests.helpers import served_environ
from tests.test_store import draft, new_task
from tools.processes import Service, wait_until

pytestmark = pytest.mark.slow

NO_PACING = Pacing(rate=None, window=10.0, max_running=None, longest_submission=30.0)


@pytest.fixture
def stores(postgres_server, clock):
    """Four stores on one database, as four workers or instances have."""
    postgres_server.reset()
    opened = [PostgresStore(postgres_server.url, history_ttl=3600, max_users=100, clock=clock) for _ in range(4)]
    yield opened
    for store in opened:
        store.close()


def test_stores_starting_at_once_make_the_schema_once(stores, postgres_server):
    with ThreadPoolExecutor(len(stores)) as starting:  # each one's first connection migrates
        assert list(starting.map(lambda store: store.ping(), stores)) == [True] * len(stores)
    with psycopg.connect(postgres_server.url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(postgres_server, clock):
    postgres_server.reset()
    with psycopg.connect(postgres_server.url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    newer = PostgresStore(postgres_server.url, history_ttl=3600, max_users=10, clock=clock)
    try:
        assert newer.ping() is False  # no connection is handed out: the store is away, and says why in the log
    finally:
        newer.close()


def test_each_queued_task_is_taken_by_one_process_only(stores, clock):
    for n in range(200):
        stores[0].record_task(replace(draft(stores[0], f"q{n}", f"user-{n % 7}"), state=TaskState.QUEUED))

    def take(store: PostgresStore) -> list[str]:
        taken = []
        while turns := store.take_turns(f"worker-{id(store)}", clock.now, NO_PACING, ["key-1"], 7).taken:
            taken += [record.task_id for record in turns]
        return taken

    with ThreadPoolExecutor(len(stores)) as takers:
        taken = [task_id for batch in takers.map(take, stores) for task_id in batch]
    assert sorted(taken) == sorted(f"q{n}" for n in range(200))  # every one, none twice


def test_each_orphan_is_taken_over_by_one_process_only(stores, clock):
    for n in range(100):
        new_task(stores[0], f"o{n}", follower="gone")
    clock.now += 60  # the lease of "gone" ran out long ago

    def take_over(store: PostgresStore) -> list[str]:
        store.heartbeat(f"w-{id(store)}", clock.now + 10)  # as each keeper does before it takes over
        return [record.task_id for record in store.take_over(f"w-{id(store)}", clock.now, 30)]

    with ThreadPoolExecutor(len(stores)) as takers:
        taken = [task_id for batch in takers.map(take_over, stores) for task_id in batch]
    assert sorted(taken) == sorted(f"o{n}" for n in range(100))  # every one, none twice


def test_a_wake_up_crosses_processes(stores):
    waiting, ending = stores[0], stores[1]
    with waiting.listen("t-cross") as woken:
        wait_until(lambda: waiting._relay is not None)
        wait_until(lambda: _notified(ending, "t-cross", woken), timeout=5)


def _notified(store: PostgresStore, task_id: str, event: threading.Event) -> bool:
    """Notify, and see the event set within 0.2 s (the LISTEN connection may still be starting)."""
    store.notify(task_id)
    return event.wait(0.2)


def test_a_server_away_is_store_unavailable_without_the_password_then_recovers(postgres_server, clock):
    postgres_server.reset()
    store = PostgresStore(postgres_server.url, history_ttl=3600, max_users=10, clock=clock)
    try:
        new_task(store, "before")
        postgres_server.stop()
        try:
            with pytest.raises(StoreUnavailable) as away:
                new_task(store, "during")
            assert postgres_server.PASSWORD not in str(away.value)
            assert store.ping() is False
        finally:
            postgres_server.start()
        wait_until(store.ping, timeout=15)
        assert store.task("before").task_id == "before" and store.task("during") is None
    finally:
        store.close()


# -- the service on PostgreSQL, under gunicorn ------------------------------------------------------------


def test_two_instances_share_conversations_and_one_killed_mid_flight_is_taken_over(
    served_upstream, postgres_server, tmp_path
):
    """Two instances of two workers on one database: a conversation crosses them; one is killed with tasks in
    flight and queued, and the other ends every one of them, each submitted once, within 30 s."""
    postgres_server.reset()
    environ = served_environ(served_upstream, DATABASE_URL=postgres_server.url, WEB_CONCURRENCY="2")
    environ["UPSTREAM_RATE"] = "4/1s"  # some of the burst waits in the queue
    first, second = (Service(environ, tmp_path / f"{name}.log").wait_ready() for name in ("first", "second"))
    run = uuid.uuid4().hex[:6]
    try:
        assert first.get("/healthz").json()["store"] == "postgres"
        assert first.get("/nanobanana", params={"prompt": f"{run} a cat", "user_id": run}).status_code == 200
        blue = second.get("/nanobanana", params={"prompt": f"{run} make it blue", "user_id": run}).json()
        assert blue["used_previous_image"] is True
        burst = [
            first.get("/nanobanana", params={"prompt": f"[delay=2] {run} burst {n}", "wait": "0"}).json()
            for n in range(12)
        ]
        assert any(task["queue_position"] for task in burst)  # the rate held some back
        first.kill()
        killed_at = time.monotonic()
        for task in burst:
            ended = wait_until(
                lambda t=task: (s := second.get(f"/nanobanana/tasks/{t['task_id']}")).status_code != 202 and s, 30
            )
            assert ended.json()["status"] == "success"
        assert time.monotonic() - killed_at < 30
    finally:
        first.kill()
        log = second.stop()
    burst_prompts = [p for p in prompts_of(served_upstream, run) if "burst" in p]
    assert sorted(burst_prompts) == sorted(f"[delay=2] {run} burst {n}" for n in range(12))  # each exactly once
    assert postgres_server.PASSWORD not in log + (tmp_path / "first.log").read_text()


def prompts_of(upstream, run: str) -> list[str]:
    with upstream.lock:
        return [task.params["prompt"] for task in upstream.tasks.values() if run in task.params["prompt"]]
