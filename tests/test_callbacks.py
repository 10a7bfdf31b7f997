"""Callbacks over real HTTP: the emulator calls the service back, and only genuine callbacks count."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import emulated_upstream
from tools.processes import Service, free_port, wait_until

pytestmark = pytest.mark.slow

KEY = "callback-key"


@pytest.fixture(scope="module")
def upstream():
    with emulated_upstream(delay=0.3, keys={KEY: 1000}) as state:
        yield state


def start(upstream, log_path, **extra) -> Service:
    port = free_port()
    environ = {
        "API_KEYS_1": KEY,
        "NANOBANANA_API_BASE": upstream.url,
        # a 3 s window: with callbacks on, fallback polls come at 1, 2 and 3 s
        "POLL_INTERVAL": "0.1",
        "POLL_MAX_ATTEMPTS": "30",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        **extra,
    }
    return Service(environ, log_path, port=port).wait_ready()


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory):
    running = start(upstream, tmp_path_factory.mktemp("callbacks") / "service.log")
    yield running
    running.stop()


def generate(service: Service, **params) -> requests.Response:
    return service.get("/nanobanana", params=params)


def history(service: Service, user_id: str) -> str | None:
    return service.get(f"/nanobanana/history/{user_id}").json()["last_image_url"]


def test_callback_delivers_the_picture_without_status_polls(service, upstream):
    answer = generate(service, prompt="a cat", user_id="quick")
    assert answer.status_code == 200
    body = answer.json()
    assert upstream.polls_of(body["upstream_task_id"]) == 0
    assert body["elapsed_seconds"] < 0.9  # generation takes 0.3 s; the first fallback poll would come at 1 s
    assert history(service, "quick") == body["image_url"]


def test_callback_url_carries_a_per_task_secret(service, upstream):
    cat = generate(service, prompt="a cat").json()
    callback_url = upstream.tasks[cat["upstream_task_id"]].params["callBackUrl"]
    assert callback_url.startswith(f"{service.url}/nanobanana/callback?task={cat['task_id']}&secret=")
    dog = generate(service, prompt="a dog").json()
    other = upstream.tasks[dog["upstream_task_id"]].params["callBackUrl"]
    assert other.split("secret=")[1] != callback_url.split("secret=")[1]


def test_repeated_callback_changes_nothing(service, upstream):
    body = generate(service, prompt="[callback=twice] a cat", user_id="twice").json()
    assert upstream.polls_of(body["upstream_task_id"]) == 0
    edit = generate(service, prompt="make it blue", user_id="twice").json()
    assert edit["source_image_urls"] == [body["image_url"]]
    assert history(service, "twice") == edit["image_url"]


def test_lost_callback_is_recovered_by_polling(service, upstream):
    body = generate(service, prompt="[callback=never] a cat", user_id="lost").json()
    assert body["status"] == "success"
    assert upstream.polls_of(body["upstream_task_id"]) == 1  # the first fallback poll found it
    assert history(service, "lost") == body["image_url"]


def test_failure_reported_by_callback(service, upstream):
    answer = generate(service, prompt="[fail] a cat", user_id="sad")
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "generation_failed"
    assert upstream.polls_of(answer.json()["upstream_task_id"]) == 0
    assert history(service, "sad") is None


def test_late_callback_is_recorded_after_the_caller_left(service, upstream):
    pending = generate(service, prompt="[callback-delay=0.5] a cat", user_id="late", wait="0")
    assert pending.status_code == 202
    task_id = pending.json()["task_id"]
    wait_until(lambda: history(service, "late") is not None, timeout=5)
    assert service.get(f"/nanobanana/tasks/{task_id}").json()["status"] == "success"


def test_forged_callbacks_change_nothing(service, upstream):
    callback = f"{service.url}/nanobanana/callback"
    real = generate(service, prompt="a cat", user_id="victim").json()["image_url"]
    pending = generate(service, prompt="[delay=1.5] make it blue", user_id="victim", wait="0").json()
    forged = {
        "code": 200,
        "msg": "success",
        "data": {"taskId": pending["task_id"], "info": {"resultImageUrl": "https://evil.test/x.png"}},
    }
    for url in (callback, f"{callback}?secret=guess"):
        assert requests.post(url, json=forged, timeout=5).status_code == 200
    unknown = {**forged, "data": {"taskId": "not-ours", "info": {"resultImageUrl": "https://evil.test/y.png"}}}
    assert requests.post(callback, json=unknown, timeout=5).status_code == 200

    assert service.get(f"/nanobanana/tasks/{pending['task_id']}").status_code == 202
    assert history(service, "victim") == real
    done = wait_until(lambda: (r := service.get(f"/nanobanana/tasks/{pending['task_id']}")).status_code == 200 and r)
    assert "evil" not in done.json()["image_url"]
    assert history(service, "victim") == done.json()["image_url"]


def test_callback_without_a_task_id_is_400(service):
    answer = requests.post(f"{service.url}/nanobanana/callback", json={"code": 200}, timeout=5)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"


def test_callback_reaches_a_request_waiting_in_another_instance(upstream, redis_server, tmp_path):
    shared = {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "2"}
    receiving = start(upstream, tmp_path / "receiving.log", **shared)
    # the waiting instance tells the upstream to call the receiving one back
    waiting = start(upstream, tmp_path / "waiting.log", **shared, PUBLIC_BASE_URL=receiving.url)
    try:
        body = generate(waiting, prompt="a cat", user_id="roamer").json()
        assert body["status"] == "success"
        assert upstream.polls_of(body["upstream_task_id"]) == 0
        assert history(receiving, "roamer") == body["image_url"]
    finally:
        waiting.stop()
        receiving.stop()
