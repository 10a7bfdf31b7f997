"""The queue in the stores: fair turns, pacing per key, holding a busy key, ending a queued task (CONTRACT §11).

The same rules on SQLite and on a real Redis, on a clock that moves only when the test moves it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from config import Pacing
from errors import QueueFull
from stores.interface import Store
from stores.records import TaskRecord, TaskState

UNPACED = Pacing(rate=None, max_running=None)


def queue(store: Store, task_id: str, user: str | None = "alice", lane: str | None = None) -> TaskRecord:
    record = TaskRecord(
        task_id=task_id,
        owner="scope",
        conversation=user,
        user_id=user,
        mode="text-to-image",
        source_image_urls=(),
        used_previous_image=False,
        created_at=store.clock(),
        follower="worker-a",
        prompt=f"picture {task_id}",
        state=TaskState.QUEUED,
        lane=lane or user,
        model="nano-banana-pro",
        resolution="2K",
    )
    stored, created = store.record_task(record)
    assert created
    return stored


def take(store: Store, pacing: Pacing = UNPACED, keys=("key-a",), limit: int = 100, follower="worker-b"):
    turns = store.take_turns(follower, store.clock(), pacing, list(keys), limit)
    return [record.task_id for record in turns.taken], turns.next_chance


def test_queued_tasks_wait_and_are_taken_once_with_what_they_asked_for(store):
    queue(store, "t1")
    assert store.task("t1").state == TaskState.QUEUED
    assert store.queue_depth() == 1
    taken = store.take_turns("worker-b", store.clock(), UNPACED, ["key-a"], 10).taken
    assert [(r.task_id, r.state, r.follower, r.key_id) for r in taken] == [("t1", "pending", "worker-b", "key-a")]
    assert (taken[0].model, taken[0].resolution, taken[0].prompt) == ("nano-banana-pro", "2K", "picture t1")
    assert store.task("t1").state == TaskState.PENDING and store.task("t1").key_id == "key-a"
    assert take(store) == ([], None)
    assert store.queue_depth() == 0


def test_lanes_take_turns_and_a_lane_keeps_its_order(store):
    for n in range(1, 6):
        queue(store, f"alice-{n}", "alice")
    queue(store, "bob-1", "bob")
    queue(store, "carol-1", "carol")
    taken, _ = take(store, limit=3)
    assert taken == ["alice-1", "bob-1", "carol-1"]
    queue(store, "dave-1", "dave")  # comes later, yet waits one turn at most
    assert take(store)[0] == ["dave-1", "alice-2", "alice-3", "alice-4", "alice-5"]


def test_queue_position_counts_the_tasks_that_go_before(store):
    alice = [queue(store, f"alice-{n}", "alice") for n in range(1, 4)]
    bob = queue(store, "bob-1", "bob")
    assert [store.queue_position(r) for r in [*alice, bob]] == [1, 3, 4, 2]
    take(store, limit=1)
    assert store.queue_position(alice[0]) is None
    assert store.queue_position(bob) == 1


def test_the_rate_allows_so_many_per_window_and_says_when_the_next_may_go(store):
    for n in range(5):
        queue(store, f"t{n}")
    pacing = Pacing(rate=2, window=10.0, max_running=None, longest_submission=60.0)
    start = store.clock()
    assert take(store, pacing) == (["t0", "t1"], start + 60 + pacing.spacing)  # unanswered: as late as can be
    store.clock.now += 1
    store.sent("t0", "key-a", store.clock())
    store.sent("t1", "key-a", store.clock())
    store.sent("t1", "key-a", store.clock() + 30)  # never later than it was said to be
    assert take(store, pacing) == ([], start + 1 + pacing.spacing)
    store.clock.now = start + 1 + pacing.spacing + 0.001
    assert take(store, pacing)[0] == ["t2", "t3"]


def test_a_submission_never_answered_counts_until_it_could_no_longer_arrive(store):
    for n in range(3):
        queue(store, f"t{n}")
    pacing = Pacing(rate=1, window=10.0, max_running=None, longest_submission=60.0)
    assert take(store, pacing)[0] == ["t0"]  # and its process died before the answer came
    store.clock.now += 60 + pacing.spacing + 0.001
    assert take(store, pacing)[0] == ["t1"]


def test_keys_add_up_their_allowances_taking_turns(store):
    for n in range(5):
        queue(store, f"t{n}")
    taken = store.take_turns("w", store.clock(), Pacing(rate=2, max_running=None), ["k1", "k2"], 10).taken
    assert [r.key_id for r in taken] == ["k1", "k2", "k1", "k2"]


def test_running_tasks_count_until_they_end(store):
    for n in range(3):
        queue(store, f"t{n}")
    pacing = Pacing(rate=None, max_running=1)
    assert take(store, pacing) == (["t0"], None)
    assert take(store, pacing) == ([], None)
    store.complete_task(replace(store.task("t0"), state=TaskState.SUCCESS, image_urls=("https://x.test/0.png",)))
    assert take(store, pacing)[0] == ["t1"]


def test_a_busy_answer_puts_the_task_back_at_its_turn_and_holds_the_key(store):
    queue(store, "alice-1", "alice")
    queue(store, "alice-2", "alice")
    queue(store, "bob-1", "bob")
    assert take(store, limit=1)[0] == ["alice-1"]
    assert not store.requeue("alice-1", "worker-c")  # only by the process that took it
    assert store.requeue("alice-1", "worker-b", hold_key_until=store.clock() + 5)
    assert store.task("alice-1").state == TaskState.QUEUED and store.task("alice-1").key_id is None
    assert take(store) == ([], store.clock() + 5)
    assert take(store, keys=("key-b",))[0] == ["alice-1", "bob-1", "alice-2"]  # another key is not held


def test_a_submitted_task_is_never_queued_again(store):
    queue(store, "t1")
    take(store)
    store.submitted("t1", "up-1", "key-a", store.clock())
    assert not store.requeue("t1", "worker-b")
    assert take(store) == ([], None)


def test_a_queued_task_ends_without_being_taken(store):
    record = queue(store, "t1")
    queue(store, "t2")
    ended = store.end_queued(replace(record, state=TaskState.CANCELLED, error_code="cancelled", completed_at=1.0))
    assert ended.state == TaskState.CANCELLED and ended.error_code == "cancelled"
    assert store.task("t1").state == TaskState.CANCELLED
    assert take(store)[0] == ["t2"]
    assert store.end_queued(replace(store.task("t2"), state=TaskState.CANCELLED)) is None  # already taken
    assert store.task("t2").state == TaskState.PENDING


def test_a_queued_task_ending_with_a_delivery_joins_the_outbox(store):
    record = replace(queue(store, "t1"), deliver_to="https://hooks.test/x")
    due = store.clock()
    store.end_queued(
        replace(record, state=TaskState.FAILED, webhook_id="msg_1", webhook_state="pending", webhook_due=due)
    )
    assert [r.task_id for r in store.due_deliveries(due, due + 30, 10)] == ["t1"]


def test_tasks_queued_too_long_are_found(store):
    queue(store, "old")
    store.clock.now += 100
    queue(store, "new")
    assert [r.task_id for r in store.queued_before(store.clock() - 50, 10)] == ["old"]


def test_without_a_usable_key_nothing_is_taken(store):
    queue(store, "t1")
    assert take(store, keys=()) == ([], None)
    assert store.task("t1").state == TaskState.QUEUED


def test_a_submission_about_to_go_is_marked_only_by_the_process_that_took_its_turn(store):
    queue(store, "t1")
    take(store)
    assert not store.sending("t1", "worker-c", 123.0)
    assert store.sending("t1", "worker-b", 123.0)
    assert store.task("t1").sending_at == 123.0
    assert store.requeue("t1", "worker-b")  # a busy answer: not sent after all
    assert store.task("t1").sending_at is None
    assert not store.sending("t1", "worker-b", 124.0)  # back in the queue: it must not go now


def test_turns_taken_and_never_marked_are_found_for_their_process(store):
    for n in range(3):
        queue(store, f"t{n}")
    take(store)
    store.sending("t0", "worker-b", store.clock())
    store.requeue("t1", "worker-b")
    store.clock.now += 60
    assert [r.task_id for r in store.unsent("worker-b", store.clock() - 30, 10)] == ["t2"]
    assert store.unsent("worker-b", store.clock() - 90, 10) == []  # taken too recently to count as lost
    assert store.unsent("worker-c", store.clock(), 10) == []


def test_a_lane_whose_tasks_left_the_queue_starts_again_at_the_current_turn(store):
    alice = [queue(store, f"alice-{n}", "alice") for n in range(3)]
    queue(store, "bob-1", "bob")
    queue(store, "bob-2", "bob")
    for record in alice:
        store.end_queued(replace(record, state=TaskState.CANCELLED))
    queue(store, "alice-again", "alice")
    assert take(store)[0] == ["bob-1", "alice-again", "bob-2"]


def test_a_full_queue_records_nothing(store):
    queue(store, "t1")
    record = replace(store.task("t1"), task_id="t2")
    with pytest.raises(QueueFull):
        store.record_task(replace(record, sequence=0), queue_max=1)
    assert store.task("t2") is None and store.queue_depth() == 1
    assert store.record_task(replace(record, task_id="t3", sequence=0), queue_max=2)[1]
