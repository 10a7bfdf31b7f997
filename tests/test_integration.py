"""The whole service over real HTTP: gunicorn started as the Procfile says, the emulator as upstream."""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import threading
import time

import pytest
import requests

from tests.helpers import emulated_upstream
from tools.processes import Service, wait_until

pytestmark = pytest.mark.slow

EMPTY_KEY = secrets.token_hex(16)  # a key without credits, tried first
GOOD_KEY = secrets.token_hex(16)


@pytest.fixture(scope="module")
def upstream():
    with emulated_upstream(delay=0.1, keys={EMPTY_KEY: 0, GOOD_KEY: 1000}) as state:
        yield state


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory):
    environ = {
        "API_KEYS_1": EMPTY_KEY,
        "API_KEYS_2": GOOD_KEY,
        "NANOBANANA_API_BASE": upstream.url,
        "POLL_INTERVAL": "0.05",
        "POLL_MAX_ATTEMPTS": "20",
        "UPSTREAM_RATE": "off",  # this emulator has no limits (tests/test_queue*.py give it some)
    }
    running = Service(environ, tmp_path_factory.mktemp("logs") / "service.log").wait_ready()
    yield running
    output = running.stop()
    assert EMPTY_KEY not in output and GOOD_KEY not in output, "an API key reached the logs"


def generate(service: Service, **params) -> requests.Response:
    return service.get("/nanobanana", params=params)


def test_a_conversation(service, upstream):
    first = generate(service, prompt="a cat", user_id="me")
    assert first.status_code == 200, first.text
    picture = requests.get(first.json()["image_url"], timeout=5)
    assert picture.headers["Content-Type"].startswith("image/svg+xml") and "a cat" in picture.text

    edit = generate(service, prompt="make it blue", user_id="me").json()
    assert edit["mode"] == "image-to-image" and edit["used_previous_image"] is True
    assert edit["source_image_urls"] == [first.json()["image_url"]]
    assert "edited from 1 picture" in requests.get(edit["image_url"], timeout=5).text

    explicit = generate(service, prompt="add a hat", user_id="me", image_url="https://example.com/dog.png").json()
    assert explicit["source_image_urls"] == ["https://example.com/dog.png"]

    failed = generate(service, prompt="[fail] now in green", user_id="me")
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "generation_failed"
    assert service.get("/nanobanana/history/me").json()["last_image_url"] == explicit["image_url"]

    restarted = generate(service, prompt="a fresh start", user_id="me", reset="1").json()
    assert restarted["mode"] == "text-to-image"
    assert service.get("/nanobanana/history/me").json()["last_image_url"] == restarted["image_url"]


def test_a_wait_that_runs_out_completes_later(service):
    generate(service, prompt="a boat", user_id="late")
    pending = generate(service, prompt="[delay=2] make it red", user_id="late")
    assert pending.status_code == 202
    status_url = pending.json()["status_url"]
    assert pending.headers["Location"] == status_url and status_url.startswith(service.url)
    done = wait_until(lambda: (r := requests.get(status_url, timeout=5)).status_code == 200 and r, timeout=10)
    assert done.json()["used_previous_image"] is True
    assert service.get("/nanobanana/history/late").json()["last_image_url"] == done.json()["image_url"]


def test_a_hung_upstream_does_not_hold_the_request_past_its_wait(service):
    started = time.monotonic()
    answer = generate(service, prompt="[poll-hang=20] a slow cat", wait="1")
    assert answer.status_code == 202
    assert time.monotonic() - started < 1 + 2  # the wait, plus the shortest read time-out and some slack


def test_key_without_credits_is_rotated_to_the_next(service, upstream):
    body = generate(service, prompt="a tree").json()
    assert upstream.tasks[body["upstream_task_id"]].key == GOOD_KEY
    keys = service.get("/nanobanana/credits").json()["keys"]
    assert keys == [
        {"key": 1, "credits": 0, "usable": False},
        {"key": 2, "credits": keys[1]["credits"], "usable": True},
    ]


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/nanobanana", 400, "invalid_request"),
        ("GET", "/nanobanana?prompt=a&model=nope", 400, "invalid_request"),
        ("GET", "/nanobanana?prompt=a&image_url=file:///etc/passwd", 400, "invalid_request"),
        ("GET", "/nanobanana?prompt=a&num_images=9", 400, "invalid_request"),
        ("GET", "/nanobanana/tasks/unknown", 404, "not_found"),
        ("GET", "/no/such/page", 404, "not_found"),
        ("DELETE", "/nanobanana", 405, "method_not_allowed"),
    ],
)
def test_bad_input_over_http(service, method, path, status, code):
    answer = requests.request(method, service.url + path, timeout=10)
    assert answer.status_code == status
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"]["code"] == code


def test_large_body_is_413(service):
    answer = requests.post(f"{service.url}/nanobanana", data={"prompt": "x" * (2 * 1024 * 1024)}, timeout=10)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large"


def test_many_requests_at_once_all_succeed(service):
    results: list[int] = []

    def one(n: int) -> None:
        results.append(generate(service, prompt=f"[delay=0.5] picture {n}", user_id=f"crowd-{n}").status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [200] * 40


def test_start_without_keys_is_demo_ready_but_not_configured(upstream, tmp_path):
    unconfigured = Service({"NANOBANANA_API_BASE": upstream.url}, tmp_path / "bare.log").wait_ready()
    try:
        assert unconfigured.get("/healthz").json()["configured"] is False
        answer = generate(unconfigured, prompt="a cat")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_configured"
    finally:
        output = unconfigured.stop()
    assert "No API key is configured" in output


@pytest.mark.parametrize(
    "environ, line",
    [
        ({"POLL_INTERVAL": "fast"}, "POLL_INTERVAL='fast' is not a number"),
        ({"DATABASE_URL": "mysql://user@db/banana"}, "DATABASE_URL must start with postgres://"),
    ],
)
def test_bad_setting_stops_start_up_with_one_clear_line(tmp_path, environ, line):
    bad = Service(environ, tmp_path / "bad.log")
    assert bad.process.wait(timeout=30) != 0
    output = bad.stop()
    assert line in output
    assert "Traceback" not in output


def test_logs_never_show_keys_tokens_or_prompts(upstream, tmp_path):
    token = secrets.token_urlsafe(24)
    environ = {
        "API_KEYS_1": EMPTY_KEY,
        "API_KEYS_2": GOOD_KEY,
        "NANOBANANA_API_BASE": upstream.url,
        "POLL_INTERVAL": "0.05",
        "ACCESS_TOKENS": token,
    }
    guarded = Service(environ, tmp_path / "guarded.log").wait_ready()
    try:
        by_header = {"Authorization": f"Bearer {token}"}
        first = guarded.get(
            "/nanobanana", params={"prompt": "a zanzibar lighthouse", "user_id": "u"}, headers=by_header
        )
        edit = guarded.get("/nanobanana", params={"prompt": "zanzibar at night", "user_id": "u", "token": token})
        refused = guarded.get("/nanobanana", params={"prompt": "zanzibar"})
        history = guarded.get("/nanobanana/history/u", headers=by_header)
        credits = guarded.get("/nanobanana/credits", headers=by_header)
        assert [first.status_code, edit.status_code, refused.status_code] == [200, 200, 401]
        assert history.json()["last_image_url"] == edit.json()["image_url"]
        answers = [first, edit, refused, history, credits]
    finally:
        output = guarded.stop()
    for secret in (EMPTY_KEY, GOOD_KEY, token, "zanzibar"):
        assert secret not in output
        assert all(secret not in answer.text for answer in answers if secret != "zanzibar")
    request_ids = [answer.headers["X-Request-ID"] for answer in answers]
    assert all(f"request_id={request_id}" in output for request_id in request_ids)
    assert f"task_id={first.json()['task_id']}" in output


@pytest.mark.parametrize("model, length", [("nano-banana", 5000), ("nano-banana-2", 20000)])
def test_longest_prompt_fits_in_a_get(service, model, length):
    answer = generate(service, prompt="é" * length, model=model)  # percent-encoded: six bytes a character
    assert answer.status_code == 200, answer.text


def test_metrics_whose_folder_was_taken_fail_no_request(upstream, tmp_path):
    """A /tmp cleaner removes the folder where the workers write their metrics: a paid picture is still answered."""
    environ = {"API_KEYS_1": GOOD_KEY, "NANOBANANA_API_BASE": upstream.url, "POLL_INTERVAL": "0.05"}
    service = Service(environ, tmp_path / "metrics.log").wait_ready()
    try:
        [folder] = service.tmp_dir.glob("nanobanana-metrics-*")
        shutil.rmtree(folder)
        answer = generate(service, prompt="a cat after the clean-up", user_id="tidy")
        assert answer.status_code == 200 and answer.json()["status"] == "success"
        assert service.get("/metrics").status_code == 200
    finally:
        output = service.stop()
    assert "Traceback" not in output


def test_a_damaged_database_stops_start_up_with_one_clear_line(tmp_path):
    path = tmp_path / "damaged.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE filler (n INTEGER, text TEXT)")
        db.executemany("INSERT INTO filler VALUES (?, ?)", [(n, "x" * 200) for n in range(2000)])
    with open(path, "r+b") as file:  # a bad sector in the middle of the file
        file.seek(4096 * 5)
        file.write(b"\xde\xad\xbe\xef" * 1024)
    damaged = Service({"DATABASE_PATH": str(path)}, tmp_path / "damaged.log")
    assert damaged.process.wait(timeout=30) != 0
    output = damaged.stop()
    assert f"DATABASE_PATH={str(path)!r} cannot be used" in output and "damaged" in output
    assert "Traceback" not in output


def test_an_empty_database_file_is_said_at_start_up(upstream, tmp_path):
    path = tmp_path / "empty.sqlite3"
    path.write_bytes(b"")
    started = Service({"DATABASE_PATH": str(path), "NANOBANANA_API_BASE": upstream.url}, tmp_path / "empty.log")
    started.wait_ready()
    assert "is an empty file" in started.stop()
