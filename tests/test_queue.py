"""The queue as a caller sees it (CONTRACT §11): a burst beyond the upstream's limits waits its turn and succeeds,
fairly, saying where it stands; a queued task can be cancelled; a full queue and a long wait are clear errors.

The upstream is the in-process emulator, given the limits of the provider; the service is the test client.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import start_background, stop_background
from background import Background
from config import Pacing
from domain.queue import Dispatcher
from tools.processes import wait_until


@pytest.fixture
def make_app(make_app):
    """Apps whose callers may wait up to 30 s (POLL_INTERVAL × POLL_MAX_ATTEMPTS), the queue included."""
    return lambda **changes: make_app(poll_max_attempts=3000, **changes)


def generate(app, **params):
    return app.test_client().get("/nanobanana", query_string=params)


def submitted_prompts(upstream) -> list[str]:
    return [task.params["prompt"] for task in upstream.tasks.values()]


@pytest.fixture
def limited(upstream):
    """The emulator refusing (429) more than 3 submissions per key in any second."""
    upstream.rate = (3, 1.0)
    return upstream


def test_a_burst_beyond_the_upstreams_rate_waits_its_turn_and_every_picture_is_made(make_app, limited):
    app = make_app(upstream_rate=(3, 1.0), api_keys=("key-one",))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: generate(app, prompt=f"picture {n}", wait="30"), range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8
    assert limited.refused == 0  # the upstream never had to say no
    assert sorted(submitted_prompts(limited)) == sorted(f"picture {n}" for n in range(8))


def test_without_pacing_the_upstreams_refusals_are_waited_out(make_app, limited):
    app = make_app(api_keys=("key-one",))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda n: generate(app, prompt=f"picture {n}", wait="30"), range(6)))
    assert [answer.status_code for answer in answers] == [200] * 6
    assert limited.refused > 0
    assert len(submitted_prompts(limited)) == 6  # each made once


def test_a_queued_task_says_where_it_stands_and_can_be_cancelled(make_app, upstream):
    app = make_app(upstream_rate=(1, 60.0), api_keys=("key-one",))
    assert generate(app, prompt="first").status_code == 200
    waiting = [generate(app, prompt=f"waiting {n}", wait="0").json for n in range(2)]
    assert [body["queue_position"] for body in waiting] == [1, 2]
    assert waiting[1]["status"] == "pending" and waiting[1]["upstream_task_id"] is None
    assert "2nd in line" in waiting[1]["message"]
    client = app.test_client()
    assert client.delete(f"/nanobanana/tasks/{waiting[0]['task_id']}").json == {
        "status": "cancelled",
        "task_id": waiting[0]["task_id"],
    }
    assert client.get(waiting[1]["status_url"]).json["queue_position"] == 1
    gone = client.get(f"/nanobanana/tasks/{waiting[0]['task_id']}")
    assert gone.status_code == 410
    assert gone.json["status"] == "cancelled" and gone.json["error"]["code"] == "cancelled"
    assert submitted_prompts(upstream) == ["first"]  # never submitted


def test_a_caller_waiting_on_a_cancelled_task_hears_so(make_app):
    app = make_app(upstream_rate=(1, 60.0), api_keys=("key-one",))
    generate(app, prompt="first")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(generate, app, prompt="second", wait="20")
        queued = app.extensions["nanobanana"].store
        wait_until(lambda: queued.queue_depth() == 1, timeout=5)
        task_id = queued.queued_before(float("inf"), 1)[0].task_id
        assert app.test_client().delete(f"/nanobanana/tasks/{task_id}").status_code == 200
        answer = waiting.result(timeout=5)
    assert answer.status_code == 410 and answer.json["task_id"] == task_id


def test_only_a_queued_task_can_be_cancelled(make_app):
    app = make_app()
    made = generate(app, prompt="a cat").json
    client = app.test_client()
    refused = client.delete(f"/nanobanana/tasks/{made['task_id']}")
    assert refused.status_code == 409 and refused.json["error"]["code"] == "already_submitted"
    assert client.delete("/nanobanana/tasks/no-such-task").status_code == 404


def test_one_user_with_many_queued_holds_another_back_by_one_turn_at_most(make_app, upstream):
    app = make_app(upstream_rate=(1, 0.3), api_keys=("key-one",))
    for n in range(5):
        assert generate(app, prompt=f"alice {n}", user_id="alice", wait="0").status_code in (200, 202)
    bob = generate(app, prompt="bob 0", user_id="bob", wait="30")
    assert bob.status_code == 200
    assert submitted_prompts(upstream).index("bob 0") <= 2  # after alice 0, and alice 1 if it was under way


def test_a_full_queue_is_a_clear_503_and_nothing_is_recorded(make_app, upstream):
    app = make_app(upstream_rate=(1, 60.0), api_keys=("key-one",), queue_max=2)
    generate(app, prompt="first")
    for n in range(2):
        assert generate(app, prompt=f"waiting {n}", wait="0").status_code == 202
    full = generate(app, prompt="one too many", wait="0")
    assert full.status_code == 503 and full.json["error"]["code"] == "upstream_unavailable"
    assert int(full.headers["Retry-After"]) > 0 and "Nothing was started" in full.json["error"]["message"]
    metrics = app.test_client().get("/metrics").text
    assert "nanobanana_queue_depth 2.0" in metrics
    assert "nanobanana_queued_seconds_count 1.0" in metrics  # only the first has had its turn


def test_a_task_queued_too_long_fails_saying_nothing_was_paid(make_app, upstream):
    app = make_app(upstream_rate=(1, 60.0), api_keys=("key-one",), queue_max_wait=1.0)
    generate(app, prompt="first")
    late = generate(app, prompt="too late", wait="20")
    assert late.status_code == 502
    assert (
        late.json["error"]["code"] == "upstream_unavailable" and "nothing was charged" in late.json["error"]["message"]
    )
    assert submitted_prompts(upstream) == ["first"]


def test_a_busy_key_rests_longer_each_time_in_a_row_and_as_long_as_the_upstream_asks(clock):
    dispatcher = Dispatcher(None, Pacing(), "me", list, print, print, print, 900, Background(), clock=clock)
    start = clock()
    assert dispatcher.hold_after_busy("k", None) == start + 1
    assert dispatcher.hold_after_busy("k", None) == start + 1  # sent together: one rest
    clock.now += 1
    assert dispatcher.hold_after_busy("k", None) == clock() + 2
    clock.now += 2
    dispatcher.went_through("k")
    assert dispatcher.hold_after_busy("k", None) == clock() + 1
    clock.now += 1
    assert dispatcher.hold_after_busy("k", 7.0) == clock() + 7  # Retry-After


def test_a_caller_whose_task_this_process_took_at_once_still_gets_the_picture(make_app, upstream):
    """The dispatcher may take a turn between the recording and the caller's starting to wait."""
    app = make_app()
    lifecycle = app.extensions["nanobanana"].lifecycle
    record_task = lifecycle.store.record_task

    def record_then_take(*args, **kwargs):
        recorded = record_task(*args, **kwargs)
        lifecycle.queue.look()  # the turn is taken, and its submission started, before the caller waits
        return recorded

    lifecycle.store.record_task = record_then_take
    answer = generate(app, prompt="taken at once", wait="20")
    assert answer.status_code == 200 and submitted_prompts(upstream) == ["taken at once"]
    assert answer.json["elapsed_seconds"] < 10  # when the picture was ready, not when the wait ran out


def left_in_line(make_app, database: str, prompt: str) -> dict:
    """A task left queued in `database` by a process that has stopped (it took the minute's only turn first)."""
    paced = make_app(database_path=database, upstream_rate=(1, 60.0), api_keys=("key-one",))
    generate(paced, prompt="the only turn of the minute")
    waiting = generate(paced, prompt=prompt, wait="0").json
    stop_background(paced)
    return waiting


def test_a_turn_taken_by_a_process_that_died_before_sending_goes_back_and_is_sent_once(make_app, upstream, tmp_path):
    database = str(tmp_path / "shared.sqlite3")
    waiting = left_in_line(make_app, database, "taken by a process that died")
    heir = make_app(database_path=database, api_keys=("key-one",))
    parts = heir.extensions["nanobanana"]
    unpaced = Pacing(rate=None, max_running=None)
    [taken] = parts.store.take_turns("ghost", time.time(), unpaced, [parts.client.keys.key_id(1)], 1).taken
    parts.store.retire("ghost")  # it died before sending: its lease is over
    start_background(heir)
    done = wait_until(lambda: (a := heir.test_client().get(waiting["status_url"])).status_code == 200 and a, 10)
    assert done.json["task_id"] == taken.task_id == waiting["task_id"]
    assert submitted_prompts(upstream).count("taken by a process that died") == 1


def test_an_idempotency_key_is_free_again_once_its_task_gave_up_waiting_in_line(make_app, upstream):
    app = make_app(upstream_rate=(1, 60.0), api_keys=("key-one",), queue_max_wait=1.0)
    key = {"Idempotency-Key": "order-7"}
    generate(app, prompt="the only turn of the minute")
    client = app.test_client()
    late = client.get("/nanobanana", query_string={"prompt": "a cat", "wait": "20"}, headers=key)
    assert late.status_code == 502 and late.json["error"]["code"] == "upstream_unavailable"
    again = client.get("/nanobanana", query_string={"prompt": "a cat", "wait": "0"}, headers=key)
    assert again.status_code == 202 and again.json["task_id"] != late.json["task_id"]


def test_a_turn_taken_here_whose_work_was_lost_goes_back_and_is_sent_once(make_app, upstream, tmp_path):
    database = str(tmp_path / "shared.sqlite3")
    waiting = left_in_line(make_app, database, "its turn was taken and forgotten")
    lifecycle = make_app(database_path=database, api_keys=("key-one",)).extensions["nanobanana"].lifecycle
    unpaced, key_id = Pacing(rate=None, max_running=None), lifecycle.client.keys.key_id(1)
    lost = lifecycle.store.take_turns(lifecycle.follower_id, time.time() - 60, unpaced, [key_id], 1).taken
    assert [record.task_id for record in lost] == [waiting["task_id"]]  # taken here a minute ago, handed to nobody
    lifecycle.queue.sweep(time.time())
    done = wait_until(lambda: lifecycle.store.task(waiting["task_id"]).state == "success", 10)
    assert done and submitted_prompts(upstream).count("its turn was taken and forgotten") == 1
