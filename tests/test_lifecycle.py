"""The life of a generation, in process: ids, waiting, lost answers, refusals, callbacks, hand-over."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace

import pytest

from app import start_background, stop_background
from background import Background
from domain import waiting
from domain.params import parse_generation
from stores.records import TaskRecord, TaskState
from tests.helpers import emulated_upstream
from tools.processes import wait_until


def generate(client, headers=None, **params):
    return client.get("/nanobanana", query_string=params, headers=headers or {})


@pytest.fixture
def make_client(make_app):
    return lambda **changes: make_app(**changes).test_client()


def test_the_task_id_is_ours_and_the_upstreams_id_is_told_too(client, emulated):
    body = generate(client, prompt="a cat").json
    assert body["task_id"] != body["upstream_task_id"]
    assert body["upstream_task_id"] in emulated.tasks
    by_upstream_id = client.get(f"/nanobanana/tasks/{body['upstream_task_id']}").json
    assert by_upstream_id["task_id"] == body["task_id"] and by_upstream_id["image_url"] == body["image_url"]


def test_wait_zero_answers_at_once_and_the_task_ends_anyway(client, emulated):
    pending = generate(client, prompt="[delay=0.3] a cat", user_id="patient", wait="0")
    assert pending.status_code == 202 and pending.json["status"] == "pending"
    done = wait_until(lambda: (r := client.get(pending.json["status_url"])).status_code == 200 and r)
    assert client.get("/nanobanana/history/patient").json["last_image_url"] == done.json["image_url"]


@pytest.fixture
def served():
    """The emulator on a real port (the in-process transport knows no time-outs)."""
    with emulated_upstream(delay=0.0, keys={"key-one": 100.0, "key-two": 100.0}) as upstream:
        yield upstream


def test_a_submission_whose_answer_is_lost_ends_unconfirmed(make_client, served):
    client = make_client(api_base=served.url, submit_read_timeout=0.2)
    answer = generate(client, prompt="[submit-hang=1] a cat", user_id="unlucky")
    assert answer.status_code == 502
    assert answer.json["status"] == "failed" and answer.json["error"]["code"] == "upstream_error"
    assert "not retried" in answer.json["error"]["message"]
    assert len(served.tasks) == 1  # the upstream did make it: that is why it was not sent again
    assert client.get(f"/nanobanana/tasks/{answer.json['task_id']}").json["error"]["code"] == "upstream_error"
    assert client.get("/nanobanana/history/unlucky").json["last_image_url"] is None


def test_with_callbacks_a_lost_submission_answer_is_ended_by_the_callback(make_client, served):
    client = make_client(api_base=served.url, submit_read_timeout=0.2, public_base_url="http://service.invalid")
    pending = generate(client, prompt="[submit-hang=1] a cat", user_id="rescued", wait="0.5")
    assert pending.status_code == 202 and pending.json["upstream_task_id"] is None
    task_id = pending.json["task_id"]
    [upstream_task] = served.tasks.values()
    callback_url = upstream_task.params["callBackUrl"]
    assert f"task={task_id}" in callback_url
    body = {"code": 200, "msg": "success", "data": {"taskId": upstream_task.task_id, "info": {"resultImageUrl": ""}}}
    body["data"]["info"]["resultImageUrl"] = "https://files.test/rescued.png"
    assert client.post(callback_url.removeprefix("http://service.invalid"), json=body).status_code == 200
    done = client.get(f"/nanobanana/tasks/{task_id}").json
    assert (done["status"], done["image_url"], done["upstream_task_id"]) == (
        "success",
        "https://files.test/rescued.png",
        upstream_task.task_id,
    )
    assert client.get("/nanobanana/history/rescued").json["last_image_url"] == "https://files.test/rescued.png"


def test_a_callback_with_another_tasks_secret_is_ignored(make_client, emulated):
    client = make_client(public_base_url="http://service.invalid")
    first = generate(client, prompt="[delay=5] a cat", wait="0.3").json
    second = generate(client, prompt="[delay=5] a dog", wait="0.3").json
    stolen = emulated.tasks[first["upstream_task_id"]].params["callBackUrl"].removeprefix("http://service.invalid")
    forged = {"code": 200, "data": {"taskId": second["upstream_task_id"], "info": {"resultImageUrl": "https://x/y"}}}
    assert client.post(stolen, json=forged).status_code == 200
    assert client.get(f"/nanobanana/tasks/{first['task_id']}").status_code == 202
    assert client.get(f"/nanobanana/tasks/{second['task_id']}").status_code == 202


def test_a_refused_submission_answers_at_once_even_with_callbacks_on(make_client, emulated):
    client = make_client(poll_interval=1.0, public_base_url="http://service.invalid")  # a 30 s window
    emulated.keys.update({"key-one": 0, "key-two": 0})
    started = time.monotonic()
    answer = generate(client, prompt="a cat")
    assert answer.status_code == 503 and answer.json["error"]["code"] == "upstream_unavailable"
    assert time.monotonic() - started < 10  # not held for the window, waiting for a callback that cannot come


def test_a_refused_submission_frees_its_idempotency_key(make_app, emulated, tmp_path):
    shared_path = str(tmp_path / "shared.sqlite3")
    key = {"Idempotency-Key": "order-42"}
    emulated.keys.update({"key-one": 0, "key-two": 0})
    assert generate(make_app(database_path=shared_path).test_client(), key, prompt="a cat").status_code == 503
    emulated.keys["key-two"] = 10  # the owner buys credits and restarts the service
    assert generate(make_app(database_path=shared_path).test_client(), key, prompt="a cat").status_code == 200
    assert len(emulated.tasks) == 1


def test_a_stopped_process_hands_its_pending_tasks_over_at_once(make_app, emulated, tmp_path):
    shared_path = str(tmp_path / "shared.sqlite3")
    leaving = make_app(database_path=shared_path)
    pending = generate(leaving.test_client(), prompt="[delay=0.5] a cat", user_id="handed", wait="0.2").json
    assert pending["upstream_task_id"] is not None
    stop_background(leaving)  # as gunicorn's worker_exit does
    staying = make_app(database_path=shared_path)
    start_background(staying)
    client = staying.test_client()
    done = wait_until(lambda: (r := client.get("/nanobanana/history/handed")).json["last_image_url"] and r)
    assert done.json["last_image_url"] == emulated.tasks[pending["upstream_task_id"]].image_urls[0]


def test_stopping_answers_whoever_waits_with_the_task_as_it_stands(make_app, emulated, caplog):
    """Like a chat's generation, which waits inside background work: stopping answers it before it waits for it."""
    app = make_app(poll_max_attempts=10_000)  # a window of 100 s: only the stop can end this wait
    start_background(app)
    parts, answers = app.extensions["nanobanana"], []
    wanted = parse_generation({"prompt": ["[delay=60] a cat"]}, parts.settings.polling_window)
    parts.background.spawn(lambda: answers.append(parts.lifecycle.generate(wanted)))
    wait_until(lambda: emulated.submissions())
    with caplog.at_level(logging.INFO, logger="background"):
        stop_background(app)  # as gunicorn's worker_exit does
    assert [answer.state for answer in answers] == ["pending"]
    assert "still under way" not in caplog.text  # answered first, so the stop did not wait its time out for it


# -- waiting for a task another process follows ---------------------------------------------------------------


class QuietStore:
    """A store whose notifications never arrive (lost while Redis or PostgreSQL reconnected): an end is only in
    its records."""

    def __init__(self, record):
        self.record = record

    def on_notify(self, callback) -> None:
        pass

    @contextlib.contextmanager
    def listen(self, task_id):
        yield threading.Event()

    def task(self, task_id):
        return self.record


def test_a_long_poll_sees_an_end_whose_notification_was_lost(monkeypatch):
    monkeypatch.setattr(waiting, "WATCH_EVERY", 0.05)
    pending = TaskRecord("t-quiet", "", None, None, "text-to-image", (), False, time.time(), state=TaskState.PENDING)
    store = QuietStore(pending)
    watcher = waiting.Waiting(store, Background(), lambda watch, when: None)
    threading.Timer(0.3, lambda: setattr(store, "record", replace(pending, state=TaskState.SUCCESS))).start()
    ended = watcher.until_ended(pending, time.monotonic() + 5)
    assert ended.state == TaskState.SUCCESS  # seen in the records, before the wait ran out
