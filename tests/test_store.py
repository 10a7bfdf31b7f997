"""The stores: the same rules on SQLite and on a real Redis (conversations, the ledger, idempotency, followers)."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import replace

import pytest

from errors import IdempotencyConflict, StoreUnavailable
from stores.interface import Store
from stores.records import CHAIN_LENGTH, FOLLOWER_LEASE, IdempotencyKey, TaskRecord
from stores.redis import RedisStore
from stores.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore, open_database
from tools.processes import wait_until


def new_task(store: Store, task_id: str, user_id: str | None = "alice", follower: str = "worker-a") -> TaskRecord:
    record, created = store.record_task(draft(store, task_id, user_id, follower))
    assert created
    return record


def draft(store: Store, task_id: str, user_id: str | None = "alice", follower: str = "worker-a") -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        owner="scope",
        conversation=user_id,
        user_id=user_id,
        mode="image-to-image",
        source_image_urls=("https://x.test/src.png",),
        used_previous_image=True,
        created_at=store.clock(),
        follower=follower,
        prompt="a prompt",
    )


def complete(store: Store, task_id: str, state: str = "success", *urls: str, message: str | None = None):
    record = store.task(task_id)
    code = None if state == "success" else "generation_failed"
    ended = replace(record, state=state, image_urls=urls, error_code=code, error_message=message, completed_at=1.0)
    return store.complete_task(ended)


def image(store: Store, user_id: str = "alice") -> str | None:
    remembered = store.last_picture(user_id)
    return remembered.image_url if remembered else None


# -- conversations and the ordering rule -------------------------------------------------------


def test_success_becomes_the_users_image(store):
    new_task(store, "t1")
    complete(store, "t1", "success", "https://f.test/1.png", "https://f.test/2.png")
    assert image(store) == "https://f.test/1.png"


def test_failure_and_pending_leave_the_image_alone(store):
    new_task(store, "t1")
    complete(store, "t1", "success", "https://f.test/1.png")
    new_task(store, "t2")
    new_task(store, "t3")
    complete(store, "t2", "failed", message="no")
    assert image(store) == "https://f.test/1.png"


def test_late_result_never_replaces_a_later_tasks_result(store):
    new_task(store, "early")
    new_task(store, "later")
    complete(store, "later", "success", "https://f.test/later.png")
    complete(store, "early", "success", "https://f.test/early.png")
    assert image(store) == "https://f.test/later.png"
    assert store.task("early").image_urls == ("https://f.test/early.png",)


def test_a_task_settles_once(store):
    new_task(store, "t1")
    complete(store, "t1", "success", "https://f.test/1.png")
    again = complete(store, "t1", "success", "https://f.test/forged.png")
    assert again.image_urls == ("https://f.test/1.png",)
    assert image(store) == "https://f.test/1.png"


def test_an_unconfirmed_task_may_still_succeed(store):
    new_task(store, "t1")
    unconfirmed = replace(store.task("t1"), state="unconfirmed", error_code="upstream_error", error_message="?")
    assert store.complete_task(unconfirmed).state == "unconfirmed"
    assert complete(store, "t1", "success", "https://f.test/late.png").state == "success"
    assert image(store) == "https://f.test/late.png"


def test_forget_also_bars_results_of_tasks_recorded_before(store):
    new_task(store, "before")
    store.forget("alice")
    complete(store, "before", "success", "https://f.test/old.png")
    assert image(store) is None
    new_task(store, "after")
    complete(store, "after", "success", "https://f.test/new.png")
    assert image(store) == "https://f.test/new.png"


def test_concurrent_completions_update_once(store):
    new_task(store, "t1")
    barrier = threading.Barrier(8)
    results = []

    def settle(n: int) -> None:
        barrier.wait()
        results.append(complete(store, "t1", "success", f"https://f.test/{n}.png").image_urls)

    threads = [threading.Thread(target=settle, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert image(store) == results[0][0]


# -- the chain --------------------------------------------------------------------------------------


def chain_of(store: Store, user_id: str = "alice") -> list[str]:
    return [picture.task_id for picture in store.chain(user_id)]


def test_a_chain_keeps_pictures_in_the_order_their_tasks_were_recorded(store):
    for task_id in ("first", "second", "third"):
        new_task(store, task_id)
    complete(store, "third", "success", "https://f.test/3.png")
    complete(store, "first", "success", "https://f.test/1.png")  # late, so it takes its place, not the last
    complete(store, "second", "failed", message="no")
    assert chain_of(store) == ["first", "third"]
    assert image(store) == "https://f.test/3.png"
    first = store.chain("alice")[0]
    assert (first.prompt, first.image_url) == ("a prompt", "https://f.test/1.png")


def test_undo_steps_back_until_the_chain_is_empty(store):
    for task_id in ("first", "second"):
        new_task(store, task_id)
        complete(store, task_id, "success", f"https://f.test/{task_id}.png")
    assert store.undo("alice").task_id == "second"
    assert image(store) == "https://f.test/first.png"
    assert store.undo("alice").task_id == "first"
    assert store.undo("alice") is None and image(store) is None and chain_of(store) == []


def test_a_chain_keeps_the_last_fifty(store):
    for n in range(CHAIN_LENGTH + 3):
        new_task(store, f"t{n}")
        complete(store, f"t{n}", "success", f"https://f.test/{n}.png")
    assert chain_of(store) == [f"t{n}" for n in range(3, CHAIN_LENGTH + 3)]


def test_forget_drops_the_chain_and_says_what_it_dropped(store):
    new_task(store, "t1")
    complete(store, "t1", "success", "https://f.test/1.png")
    assert [picture.image_url for picture in store.forget("alice")] == ["https://f.test/1.png"]
    assert chain_of(store) == [] and store.forget("alice") == []


def test_chains_are_kept_apart(store):
    new_task(store, "a1", "alice")
    new_task(store, "b1", "bob")
    complete(store, "a1", "success", "https://f.test/a.png")
    complete(store, "b1", "success", "https://f.test/b.png")
    store.undo("bob")
    assert (chain_of(store, "alice"), chain_of(store, "bob")) == (["a1"], [])


# -- the ledger ---------------------------------------------------------------------------------


def test_task_record_round_trips(store):
    added = new_task(store, "t1")
    assert added.sequence > 0
    assert store.task("t1") == added
    done = complete(store, "t1", "failed", message="no picture")
    assert (done.state, done.error_message, done.image_urls) == ("failed", "no picture", ())
    assert done.completed_at is not None
    assert store.task("unknown") is None


def test_a_task_answers_to_the_upstreams_id_once_submitted(store):
    new_task(store, "ours")
    store.submitted("ours", "theirs", "key-fingerprint", 123.0)
    found = store.task("theirs")
    assert (found.task_id, found.upstream_task_id, found.key_id, found.submitted_at) == (
        "ours",
        "theirs",
        "key-fingerprint",
        123.0,
    )


def test_an_end_recorded_after_the_record_was_lost_writes_it_whole(store):
    lost = replace(draft(store, "lost"), sequence=7, upstream_task_id="up-lost")
    ended = replace(lost, state="success", image_urls=("https://f.test/kept.png",), completed_at=2.0)
    assert store.complete_task(ended) == ended
    assert store.task("up-lost") == ended
    assert image(store) == "https://f.test/kept.png"


def test_idempotency_key_returns_the_earlier_task(store):
    key = IdempotencyKey("scope-1", "fingerprint-1")
    first, created = store.record_task(draft(store, "first"), key)
    again, created_again = store.record_task(draft(store, "second"), key)
    assert (created, created_again) == (True, False)
    assert again == first
    assert store.keyed_task(key) == first
    assert store.task("second") is None


def test_idempotency_key_with_other_parameters_is_a_conflict(store):
    store.record_task(draft(store, "first"), IdempotencyKey("scope-1", "fingerprint-1"))
    other = IdempotencyKey("scope-1", "fingerprint-2")
    with pytest.raises(IdempotencyConflict):
        store.keyed_task(other)
    with pytest.raises(IdempotencyConflict):
        store.record_task(draft(store, "second"), other)


def test_a_released_key_makes_a_new_task(store):
    key = IdempotencyKey("scope-1", "fingerprint-1")
    store.record_task(draft(store, "refused"), key)
    store.release_key(key, "refused")
    assert store.keyed_task(key) is None
    assert store.record_task(draft(store, "retry"), key)[1] is True


def test_concurrent_records_with_one_key_make_one_task(store):
    key = IdempotencyKey("scope-1", "fingerprint-1")
    barrier = threading.Barrier(8)
    results = []

    def record(n: int) -> None:
        barrier.wait()
        results.append(store.record_task(draft(store, f"t{n}"), key))

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(created for _, created in results) == 1
    assert len({record.task_id for record, _ in results}) == 1


# -- followers and take-over ----------------------------------------------------------------------


def test_tasks_of_a_follower_whose_lease_ran_out_are_taken_over_once(store, clock):
    store.heartbeat("worker-a", clock.now + 10)
    new_task(store, "t1", follower="worker-a")
    new_task(store, "t2", follower="worker-a")
    new_task(store, "done", follower="worker-a")
    complete(store, "done", "success", "https://f.test/1.png")
    store.heartbeat("worker-b", clock.now + 100)
    assert store.take_over("worker-b", clock.now + 5, 100) == []  # worker-a is alive
    taken = store.take_over("worker-b", clock.now + 11, 100)
    assert sorted(record.task_id for record in taken) == ["t1", "t2"]
    assert all(record.follower == "worker-b" for record in taken)
    assert store.task("t1").follower == "worker-b"
    assert store.take_over("worker-c", clock.now + 11, 100) == []  # worker-b's lease still runs


def test_a_follower_that_records_but_never_renews_is_gone_after_one_lease(store, clock):
    new_task(store, "t1", follower="crashed-at-start")
    assert store.take_over("worker-b", clock.now + FOLLOWER_LEASE - 1, 100) == []
    assert [r.task_id for r in store.take_over("worker-b", clock.now + FOLLOWER_LEASE + 1, 100)] == ["t1"]


def test_take_over_comes_in_batches(store, clock):
    for n in range(5):
        new_task(store, f"t{n}", follower="worker-a")
    later = clock.now + FOLLOWER_LEASE + 1
    first = store.take_over("worker-b", later, 3)
    second = store.take_over("worker-b", later, 3)
    assert len(first) == 3 and len(second) == 2
    assert {r.task_id for r in first} | {r.task_id for r in second} == {f"t{n}" for n in range(5)}


def test_a_retired_followers_tasks_are_taken_over_at_once(store, clock):
    store.heartbeat("worker-a", clock.now + 10)
    new_task(store, "t1", follower="worker-a")
    store.retire("worker-a")
    assert [r.task_id for r in store.take_over("worker-b", clock.now, 100)] == ["t1"]


def test_a_follower_does_not_take_over_its_own_tasks(store, clock):
    new_task(store, "t1", follower="worker-a")
    assert store.take_over("worker-a", clock.now + 60, 100) == []


def test_claim_poll_once_per_interval(sqlite_store, clock):
    new_task(sqlite_store, "t1")
    assert sqlite_store.claim_poll("t1", 2.0)
    assert not sqlite_store.claim_poll("t1", 2.0)
    clock.now += 2.0
    assert sqlite_store.claim_poll("t1", 2.0)


@pytest.mark.slow
def test_redis_claim_poll_once_per_interval(redis_store):
    new_task(redis_store, "t1")
    assert redis_store.claim_poll("t1", 0.2)
    assert not redis_store.claim_poll("t1", 0.2)
    wait_until(lambda: redis_store.claim_poll("t1", 0.2), timeout=2)


def test_notify_wakes_a_listener(store):
    with store.listen("t1") as woken:
        store.notify("t1")
        assert woken.wait(5)


# -- SQLite: a file that lasts, a schema with a version, limits ------------------------------------


def test_sqlite_keeps_everything_across_a_restart(tmp_path, clock):
    path = str(tmp_path / "kept.sqlite3")
    first = SqliteStore(path, history_ttl=3600, max_users=10, clock=clock)
    new_task(first, "t1")
    complete(first, "t1", "success", "https://f.test/1.png")
    new_task(first, "t2")
    first.close()
    again = SqliteStore(path, history_ttl=3600, max_users=10, clock=clock)
    assert image(again) == "https://f.test/1.png"
    assert again.task("t2").state == "pending"
    assert new_task(again, "t3").sequence > again.task("t2").sequence
    again.close()


def test_sqlite_schema_has_a_version_and_refuses_a_newer_one(tmp_path):
    path = str(tmp_path / "versioned.sqlite3")
    open_database(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(sqlite3.DatabaseError, match="newer than this release"):
        open_database(path)


def test_a_first_release_database_is_migrated_with_its_pictures(tmp_path, clock):
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as db:  # as the first release left it: one remembered picture per user
        db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
        db.execute("INSERT INTO history VALUES ('alice', 'https://f.test/old.png', 7, ?)", (clock.now,))
        db.execute("INSERT INTO sqlite_sequence VALUES ('tasks', 7)")  # seven tasks were recorded
    migrated = SqliteStore(path, history_ttl=3600, max_users=10, clock=clock)
    assert image(migrated) == "https://f.test/old.png"
    new_task(migrated, "t1")
    complete(migrated, "t1", "success", "https://f.test/new.png")
    assert [p.image_url for p in migrated.chain("alice")] == ["https://f.test/old.png", "https://f.test/new.png"]
    migrated.close()


def test_sqlite_memory_keeps_nothing(clock):
    first = SqliteStore(":memory:", history_ttl=3600, max_users=10, clock=clock)
    new_task(first, "t1")
    assert SqliteStore(":memory:", history_ttl=3600, max_users=10, clock=clock).task("t1") is None


def test_image_expires_after_ttl(sqlite_store, clock):
    new_task(sqlite_store, "t1")
    complete(sqlite_store, "t1", "success", "https://f.test/1.png")
    clock.now += 3599
    assert image(sqlite_store) == "https://f.test/1.png"
    clock.now += 1
    assert image(sqlite_store) is None


def test_purge_names_the_pictures_of_conversations_that_expired(store, clock):
    new_task(store, "t1", "alice")
    complete(store, "t1", "success", "https://f.test/alice.png")
    clock.now += 1800
    new_task(store, "t2", "bob")
    complete(store, "t2", "success", "https://f.test/bob.png")
    clock.now += 1800 + 121  # alice's conversation is past HISTORY_TTL (3600 s here); bob's is not
    assert [picture.image_url for picture in store.purge(clock.now)] == ["https://f.test/alice.png"]
    assert store.chain("alice") == [] and [p.image_url for p in store.chain("bob")] == ["https://f.test/bob.png"]
    assert store.purge(clock.now) == []  # named once


def test_a_forgotten_conversation_is_not_named_again_when_it_expires(store, clock):
    new_task(store, "t1", "alice")
    complete(store, "t1", "success", "https://f.test/alice.png")
    assert [picture.image_url for picture in store.forget("alice")] == ["https://f.test/alice.png"]
    clock.now += 3600 + 121
    assert store.purge(clock.now) == []


def test_least_recently_updated_users_are_dropped_beyond_the_limit(sqlite_store, clock):
    for user in ("a", "b", "c", "d"):
        clock.now += 1
        new_task(sqlite_store, user, user)
        complete(sqlite_store, user, "success", f"https://f.test/{user}.png")
    sqlite_store.purge(clock.now)
    assert [image(sqlite_store, u) is not None for u in ("a", "b", "c", "d")] == [False, True, True, True]


def test_tasks_and_keys_are_kept_a_day(sqlite_store, clock):
    key = IdempotencyKey("scope-1", "fingerprint-1")
    sqlite_store.record_task(draft(sqlite_store, "old"), key)
    complete(sqlite_store, "old", "success", "https://f.test/1.png")
    clock.now += 24 * 3600 + 1
    new_task(sqlite_store, "new")
    sqlite_store.purge(clock.now)
    assert sqlite_store.task("old") is None
    assert sqlite_store.keyed_task(key) is None
    assert sqlite_store.task("new") is not None


def test_the_sqlite_file_stops_growing_once_the_purge_has_freed_its_pages(tmp_path, clock):
    path = str(tmp_path / "busy.sqlite3")
    store = SqliteStore(path, history_ttl=3600, max_users=100_000, clock=clock)
    sizes = []
    for day in range(3):
        for n in range(1000):
            key = IdempotencyKey(f"scope-{day}-{n}", "fingerprint")
            store.record_task(draft(store, f"t{day}-{n}", f"user-{day}-{n}"), key)
            complete(store, f"t{day}-{n}", "success", f"https://f.test/{day}/{n}.png")
        store.close()
        sizes.append(os.path.getsize(path))  # checkpointed whole when the last connection closes
        store = SqliteStore(path, history_ttl=3600, max_users=100_000, clock=clock)
        clock.now += 2 * 24 * 3600 + 1
        store.purge(clock.now)
    store.close()
    assert sizes[2] <= sizes[0] * 1.1, sizes  # each day's records reuse the pages of the one before


@pytest.mark.slow
def test_redis_keys_expire_by_themselves(redis_store):
    new_task(redis_store, "t1")
    complete(redis_store, "t1", "success", "https://f.test/1.png")
    assert 3590 < redis_store.redis.ttl(redis_store._key("user:", "alice")) <= 3600
    assert 0 < redis_store.redis.ttl(redis_store._key("task:", "t1")) <= 24 * 3600


@pytest.mark.slow
def test_redis_away_is_store_unavailable_then_recovers(redis_server):
    store = RedisStore(redis_server.url, history_ttl=3600)
    new_task(store, "t1")
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            store.task("t1")
        assert store.ping() is False
    finally:
        redis_server.start()
    assert store.task("t1") is None  # the server came back empty (no persistence), and the store works again
    assert store.ping() is True
    store.close()


@pytest.mark.slow
def test_redis_pool_waits_for_a_free_connection_instead_of_failing(redis_server):
    store = RedisStore(redis_server.url, history_ttl=3600)
    held = [store.pool.get_connection() for _ in range(store.pool.max_connections)]
    answers = []
    reader = threading.Thread(target=lambda: answers.append(store.task("t1")))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and answers == []  # waiting for a connection, not failing
    store.pool.release(held.pop())
    reader.join(5)
    assert answers == [None]
    for connection in held:
        store.pool.release(connection)
    store.close()


def test_a_chats_conversation_moves_out_of_reach_of_http_user_ids(tmp_path, clock):
    path = str(tmp_path / "v6.sqlite3")
    with sqlite3.connect(path) as db:  # as release 6 left it: a chat's conversation under the owner "telegram"
        db.executescript(";".join(MIGRATIONS[:6]) + "; PRAGMA user_version = 6;")
        db.execute("INSERT INTO history VALUES ('telegram/telegram:5', -1, ?)", (clock.now,))
        db.execute(
            "INSERT INTO pictures VALUES ('telegram/telegram:5', 1, 't1', 'https://f.test/chat.png', NULL, 'a cat', ?)",
            (clock.now,),
        )
    migrated = SqliteStore(path, history_ttl=3600, max_users=10, clock=clock)
    assert [p.image_url for p in migrated.chain("\x1ftelegram/telegram:5")] == ["https://f.test/chat.png"]
    assert migrated.chain("telegram/telegram:5") == []
    migrated.close()


@pytest.mark.slow
def test_a_chats_conversation_in_redis_moves_out_of_reach_of_http_user_ids(redis_server, redis_store, clock):
    chat = "telegram/telegram:5"  # as release 6 wrote them: a chat's tasks under the owner "telegram"
    for task_id in ("ended", "pending"):
        redis_store.record_task(replace(draft(redis_store, task_id, chat), owner="telegram", used_previous_image=False))
    complete(redis_store, "ended", "success", "https://f.test/chat.png")
    assert [p.image_url for p in redis_store.chain(chat)] == ["https://f.test/chat.png"]
    upgraded = RedisStore(redis_server.url, history_ttl=3600, clock=clock)
    upgraded.purge(clock.now)  # the keeper's first round
    complete(upgraded, "pending", "success", "https://f.test/later.png")
    assert upgraded.chain(chat) == []
    assert [p.image_url for p in upgraded.chain("\x1f" + chat)] == [
        "https://f.test/chat.png",
        "https://f.test/later.png",
    ]
    assert upgraded.purge(clock.now + 3600) and upgraded.chain("\x1f" + chat) == []  # it still expires
    upgraded.close()


@pytest.mark.slow
def test_a_redis_that_refuses_writes_is_unavailable_not_broken(redis_store):
    new_task(redis_store, "t1")
    redis_store.redis.config_set("min-replicas-to-write", 1)  # writes are refused (NOREPLICAS), reads still work
    try:
        assert redis_store.ping() is False
        assert redis_store.task("t1").task_id == "t1"
        with pytest.raises(StoreUnavailable):
            new_task(redis_store, "t2")
    finally:
        redis_store.redis.config_set("min-replicas-to-write", 0)
    assert redis_store.ping() is True


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def test_rate_limit_counters_count_within_their_window_then_start_afresh(kind, request, clock):
    store = request.getfixturevalue(f"{kind}_store")
    assert [store.count("user:alice", 60) for _ in range(3)] == [1, 2, 3]
    assert store.counter("user:alice") == (3, clock.now + 60) and store.counter("user:bob") == (0, clock.now)
    clock.now += 60
    assert store.count("user:alice", 60, amount=2) == 2  # a new window
    store.clear_counter("user:alice")
    assert store.counter("user:alice")[0] == 0
