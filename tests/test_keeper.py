"""The keeper on a fake clock, with a real SQLite store: the lease, the take-over, purging, the store away."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from background import Background
from domain.keeper import PURGE_EVERY, Keeper
from errors import StoreUnavailable
from stores.records import FOLLOWER_LEASE, TaskRecord
from stores.sqlite import SqliteStore


@pytest.fixture
def store(clock):
    store = SqliteStore(":memory:", history_ttl=3600, max_users=10, clock=clock)
    yield store
    store.close()


def keeper_of(store, clock, follower: str, adopted: list) -> Keeper:
    return Keeper(store, follower, adopted.append, Background(), clock=clock)


def pending(store, clock, task_id: str, follower: str) -> None:
    draft = TaskRecord(task_id, "", None, None, "text-to-image", (), False, clock(), follower=follower)
    store.record_task(draft)


def test_a_living_followers_tasks_stay_with_it(store, clock):
    adopted_by_a, adopted_by_b = [], []
    a, b = keeper_of(store, clock, "a", adopted_by_a), keeper_of(store, clock, "b", adopted_by_b)
    pending(store, clock, "t1", "a")
    for _ in range(30):  # half a minute of ticks, each renewing the lease
        clock.now += 1
        a.tick()
        b.tick()
    assert adopted_by_a == adopted_by_b == []


def test_the_tasks_of_a_follower_that_stopped_renewing_are_taken_over_once(store, clock):
    adopted = []
    taker = keeper_of(store, clock, "b", adopted)
    pending(store, clock, "t1", "gone")
    clock.now += FOLLOWER_LEASE - 1
    taker.tick()
    assert adopted == []  # its lease has not run out yet
    clock.now += 2
    taker.tick()
    taker.tick()
    assert [record.task_id for record in adopted] == ["t1"] and adopted[0].follower == "b"


def test_a_retired_follower_is_taken_over_at_once(store, clock):
    adopted = []
    leaving, staying = keeper_of(store, clock, "a", []), keeper_of(store, clock, "b", adopted)
    pending(store, clock, "t1", "a")
    leaving.tick()
    leaving.retire()
    staying.tick()
    assert [record.task_id for record in adopted] == ["t1"]


def test_purging_comes_once_a_minute(store, clock, monkeypatch):
    purges = []
    monkeypatch.setattr(store, "purge", purges.append)
    keeper = keeper_of(store, clock, "a", [])
    for _ in range(121):
        keeper.tick()
        clock.now += 1
    assert len(purges) == 3 and purges[1] - purges[0] == PURGE_EVERY


def test_the_store_away_is_said_once_and_back_once(store, clock, monkeypatch, caplog):
    keeper = keeper_of(store, clock, "a", [])

    def away(*args):
        raise StoreUnavailable("connection refused")

    with caplog.at_level(logging.INFO, logger="domain.keeper"):
        monkeypatch.setattr(store, "heartbeat", away)
        keeper.tick()
        keeper.tick()
        monkeypatch.undo()
        keeper.tick()
    said = [record.getMessage() for record in caplog.records]
    assert len([line for line in said if "unavailable" in line]) == 1
    assert said[-1] == "the store is back"


def test_the_pictures_of_expired_conversations_are_handed_on(store, clock):
    dropped = []
    keeper = Keeper(store, "a", [].append, Background(), dropped.extend, clock=clock)
    draft = TaskRecord("t1", "", "alice", "alice", "text-to-image", (), False, clock(), follower="a")
    record, _ = store.record_task(draft)
    store.complete_task(replace(record, state="success", image_urls=("https://copies.test/a.png",)))
    keeper.tick()
    assert dropped == []
    clock.now += 3600 + PURGE_EVERY
    keeper.tick()
    assert [picture.image_url for picture in dropped] == ["https://copies.test/a.png"]
