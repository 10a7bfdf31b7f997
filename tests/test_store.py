"""The in-memory store: history ordering, forgetting, bounds."""

from __future__ import annotations

import threading

import pytest

from store import TASK_TTL, MemoryStore, TaskRecord


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> MemoryStore:
    return MemoryStore(history_ttl=3600, max_users=3, clock=clock)


def new_task(store: MemoryStore, task_id: str, user_id: str | None = "alice") -> TaskRecord:
    return store.add_task(TaskRecord(task_id, 1, user_id, "text-to-image", (), False, store.clock()))


def image(store: MemoryStore, user_id: str = "alice") -> str | None:
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


def test_image_expires_after_ttl(store, clock):
    new_task(store, "t1")
    store.complete_task("t1", "success", ("https://f.test/1.png",))
    clock.now += 3599
    assert image(store) == "https://f.test/1.png"
    clock.now += 1
    assert image(store) is None


def test_least_recently_used_users_are_dropped_first(store):
    for user in ("a", "b", "c"):
        new_task(store, user, user)
        store.complete_task(user, "success", (f"https://f.test/{user}.png",))
    image(store, "a")  # a is used again, so b is now the oldest
    new_task(store, "d", "d")
    store.complete_task("d", "success", ("https://f.test/d.png",))
    assert [image(store, u) is not None for u in ("a", "b", "c", "d")] == [True, False, True, True]


def test_tasks_are_kept_a_day(store, clock):
    new_task(store, "old")
    clock.now += TASK_TTL + 1
    new_task(store, "new")
    assert store.task("old") is None
    assert store.task("new") is not None


def test_claim_poll_once_per_interval(store, clock):
    new_task(store, "t1")
    assert store.claim_poll("t1", 2.0)
    assert not store.claim_poll("t1", 2.0)
    clock.now += 2.0
    assert store.claim_poll("t1", 2.0)


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
