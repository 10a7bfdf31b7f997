"""The in-memory store: history ordering, forgetting, bounds."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from store import TASK_TTL, MemoryStore, RedisStore, Store, StoreUnavailable, TaskRecord
from tests.helpers import wait_until


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory_store(clock) -> MemoryStore:
    return MemoryStore(history_ttl=3600, max_users=3, clock=clock)


@pytest.fixture
def redis_store(redis_server):
    store = RedisStore(redis_server.url, history_ttl=3600)
    store.redis.flushdb()
    yield store
    store.close()


@pytest.fixture(params=["memory", "redis"])
def store(request) -> Store:
    """The behaviour every store shares, checked on each of them."""
    return request.getfixturevalue(f"{request.param}_store")


def new_task(store: Store, task_id: str, user_id: str | None = "alice") -> TaskRecord:
    record = TaskRecord(task_id, 2, user_id, "image-to-image", ("https://x.test/src.png",), True, store.clock())
    return store.add_task(replace(record, conversation=user_id, owner="scope"))


def image(store: Store, user_id: str = "alice") -> str | None:
    remembered = store.remembered_image(user_id)
    return remembered.image_url if remembered else None


def test_success_becomes_the_users_image(store):
    new_task(store, "t1")
    store.complete_task("t1", "success", ("https://f.test/1.png", "https://f.test/2.png"))
    assert image(store) == "https://f.test/1.png"


def test_failure_and_pending_leave_the_image_alone(store):
    new_task(store, "t1")
    store.complete_task("t1", "success", ("https://f.test/1.png",))
    new_task(store, "t2")
    new_task(store, "t3")
    store.complete_task("t2", "failed", error_message="no")
    assert image(store) == "https://f.test/1.png"


def test_late_result_never_replaces_a_later_tasks_result(store):
    new_task(store, "early")
    new_task(store, "later")
    store.complete_task("later", "success", ("https://f.test/later.png",))
    store.complete_task("early", "success", ("https://f.test/early.png",))
    assert image(store) == "https://f.test/later.png"
    assert store.task("early").image_urls == ("https://f.test/early.png",)


def test_late_result_updates_the_image_when_nothing_newer_came(store):
    new_task(store, "t1")
    store.complete_task("t1", "success", ("https://f.test/1.png",))
    new_task(store, "t2")
    store.complete_task("t2", "success", ("https://f.test/2.png",))
    assert image(store) == "https://f.test/2.png"


def test_a_task_completes_once(store):
    new_task(store, "t1")
    store.complete_task("t1", "success", ("https://f.test/1.png",))
    again = store.complete_task("t1", "success", ("https://f.test/forged.png",))
    assert again.image_urls == ("https://f.test/1.png",)
    assert image(store) == "https://f.test/1.png"


def test_forget_also_bars_results_of_tasks_submitted_before(store):
    new_task(store, "before")
    store.forget("alice")
    store.complete_task("before", "success", ("https://f.test/old.png",))
    assert image(store) is None
    new_task(store, "after")
    store.complete_task("after", "success", ("https://f.test/new.png",))
    assert image(store) == "https://f.test/new.png"


def test_image_expires_after_ttl(memory_store, clock):
    new_task(memory_store, "t1")
    memory_store.complete_task("t1", "success", ("https://f.test/1.png",))
    clock.now += 3599
    assert image(memory_store) == "https://f.test/1.png"
    clock.now += 1
    assert image(memory_store) is None


def test_least_recently_used_users_are_dropped_first(memory_store):
    for user in ("a", "b", "c"):
        new_task(memory_store, user, user)
        memory_store.complete_task(user, "success", (f"https://f.test/{user}.png",))
    image(memory_store, "a")  # a is used again, so b is now the oldest
    new_task(memory_store, "d", "d")
    memory_store.complete_task("d", "success", ("https://f.test/d.png",))
    assert [image(memory_store, u) is not None for u in ("a", "b", "c", "d")] == [True, False, True, True]


def test_tasks_are_kept_a_day(memory_store, clock):
    new_task(memory_store, "old")
    clock.now += TASK_TTL + 1
    new_task(memory_store, "new")
    assert memory_store.task("old") is None
    assert memory_store.task("new") is not None


def test_claim_poll_once_per_interval(memory_store, clock):
    new_task(memory_store, "t1")
    assert memory_store.claim_poll("t1", 2.0)
    assert not memory_store.claim_poll("t1", 2.0)
    clock.now += 2.0
    assert memory_store.claim_poll("t1", 2.0)


def test_concurrent_completions_update_once(store):
    new_task(store, "t1")
    barrier = threading.Barrier(8)
    results = []

    def complete(n: int) -> None:
        barrier.wait()
        results.append(store.complete_task("t1", "success", (f"https://f.test/{n}.png",)).image_urls)

    threads = [threading.Thread(target=complete, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert image(store) == results[0][0]


def test_task_record_round_trips(store):
    added = new_task(store, "t1")
    assert added.sequence > 0
    assert store.task("t1") == added
    done = store.complete_task("t1", "failed", error_message="no picture")
    assert (done.state, done.error_message, done.image_urls) == ("failed", "no picture", ())
    assert done.completed_at is not None
    assert store.task("unknown") is None


def test_redis_history_expires_with_its_ttl(redis_store):
    new_task(redis_store, "t1")
    redis_store.complete_task("t1", "success", ("https://f.test/1.png",))
    assert 3590 < redis_store.redis.ttl(redis_store._user_key("alice")) <= 3600
    assert 0 < redis_store.redis.ttl(redis_store._task_key("t1")) <= TASK_TTL


def test_redis_claim_poll_once_per_interval(redis_store):
    new_task(redis_store, "t1")
    assert redis_store.claim_poll("t1", 0.2)
    assert not redis_store.claim_poll("t1", 0.2)
    wait_until(lambda: redis_store.claim_poll("t1", 0.2), timeout=2)


def test_two_processes_share_one_redis(redis_server, redis_store):
    other = RedisStore(redis_server.url, history_ttl=3600)  # as another worker or instance would
    new_task(redis_store, "early")
    new_task(other, "later")
    other.complete_task("later", "success", ("https://f.test/later.png",))
    redis_store.complete_task("early", "success", ("https://f.test/early.png",))
    assert image(redis_store) == image(other) == "https://f.test/later.png"
    other.close()


def test_redis_away_is_store_unavailable_then_recovers(redis_server):
    store = RedisStore(redis_server.url, history_ttl=3600)
    new_task(store, "t1")
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            store.task("t1")
    finally:
        redis_server.start()
    assert store.task("t1") is None  # the server came back empty (no persistence), and the store works again
    store.close()
