"""The Slack command over real HTTP: slash commands signed with the signing secret as Slack signs them, posted
to the service (served in this process; under gunicorn for the restart), a fake response_url receiver that
records what the service posts to each, and the emulator as the upstream."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import threading
import time
from dataclasses import replace
from urllib.parse import urlencode

import pytest
import requests
from flask import Flask, request

from channels.chat import LIMITED, STARTING_OVER
from channels.slack import HELP, RESPONSE_URL_LIFETIME
from domain.deliveries import Undeliverable
from tests.helpers import served_environ
from tools.processes import Service, free_port, serving, wait_until

SIGNING_SECRET = "slack-signing-secret-never-to-be-seen"
users = (f"U{n}" for n in itertools.count(1000))
hooks = itertools.count(1)


class FakeResponseUrls:
    """Slack's response_url addresses: what the service posts to each."""

    def __init__(self):
        self.posts: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        self.app = Flask("slack-response-urls")
        self.app.add_url_rule("/commands/<hook>", view_func=self.take, methods=["POST"])

    def take(self, hook: str):
        with self.lock:
            self.posts.setdefault(hook, []).append(request.get_json())
        return "ok"

    def new(self) -> str:
        return f"{self.url}/commands/T{next(hooks)}"

    def received(self, response_url: str, count: int = 1) -> list[dict]:
        hook = response_url.rsplit("/", 1)[1]
        return wait_until(lambda: len(found := self.posts.get(hook, [])) >= count and list(found), timeout=15)


@pytest.fixture(scope="module")
def response_urls():
    fake = FakeResponseUrls()
    with serving(fake.app) as url:
        fake.url = url
        yield fake


def slack_settings() -> dict:
    return {"slack_signing_secret": SIGNING_SECRET, "webhook_allow_private": True}  # the receiver is on loopback


@pytest.fixture
def service(serve_app, caplog):
    served = serve_app(**slack_settings())
    yield served
    assert SIGNING_SECRET not in caplog.text


def command(service, user: str, text: str, response_url: str, secret=SIGNING_SECRET, timestamp=None, body=None):
    body = body or urlencode(
        {"team_id": "T0TEAM", "user_id": user, "command": "/banana", "text": text, "response_url": response_url}
    )
    timestamp = timestamp or str(int(time.time()))
    signature = "v0=" + hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature,
    }
    return requests.post(f"{service.url}/slack/commands", data=body, headers=headers, timeout=10)


def task_with(served_upstream, words: str):
    with served_upstream.lock:
        return next((task for task in served_upstream.tasks.values() if words in task.params["prompt"]), None)


def test_wrong_old_or_repeated_signatures_are_401_and_do_nothing(service, response_urls, served_upstream):
    user, url = next(users), response_urls.new()
    wrong = command(service, user, "an unsigned cat", url, secret="a-guess")
    old = command(service, user, "an unsigned cat", url, timestamp=str(int(time.time()) - 600))
    assert (wrong.status_code, old.status_code) == (401, 401) and wrong.json()["error"]["code"] == "unauthorized"
    assert not task_with(served_upstream, "unsigned cat")
    timestamp = str(int(time.time()))
    first = command(service, user, "a replayed cat", url, timestamp=timestamp)
    replayed = command(service, user, "a replayed cat", url, timestamp=timestamp)  # the same signed request again
    assert (first.status_code, replayed.status_code) == (200, 401)
    response_urls.received(url)
    assert len([t for t in served_upstream.tasks.values() if "a replayed cat" in t.params["prompt"]]) == 1


def test_banana_answers_at_once_then_posts_the_picture_and_the_next_one_edits_it(
    service, response_urls, served_upstream
):
    user, first_url, second_url = next(users), response_urls.new(), response_urls.new()
    answer = command(service, user, "a red kite", first_url)
    assert answer.json() == {"response_type": "ephemeral", "text": "Making it: a red kite"}
    [posted] = response_urls.received(first_url)
    [block] = posted["blocks"]
    assert posted["response_type"] == "in_channel" and block["type"] == "image" and block["alt_text"] == "a red kite"
    command(service, user, "make it blue", second_url)
    response_urls.received(second_url)
    assert task_with(served_upstream, "make it blue").params["imageUrls"] == [block["image_url"]]


def test_undo_new_and_help(service, response_urls, served_upstream):
    user = next(users)
    for prompt in ("a green hill", "add a castle"):
        url = response_urls.new()
        command(service, user, prompt, url)
        response_urls.received(url)
    back = command(service, user, "undo", response_urls.new()).json()
    assert back["response_type"] == "in_channel" and "a green hill" in back["blocks"][0]["alt_text"]
    assert command(service, user, "new", response_urls.new()).json()["text"] == STARTING_OVER
    assert command(service, user, "help", response_urls.new()).json()["text"] == HELP
    url = response_urls.new()
    command(service, user, "a quiet lake", url)
    response_urls.received(url)
    assert task_with(served_upstream, "a quiet lake").params["type"] == "TEXTTOIAMGE"


def test_failures_and_the_rate_limit_are_posted_in_words(serve_app, response_urls):
    strict = serve_app(rate_limit="1/minute", **slack_settings())
    user, failing, limited = next(users), response_urls.new(), response_urls.new()
    command(strict, user, "[fail] a doomed kite", failing)
    [failure] = response_urls.received(failing)
    assert failure["response_type"] == "ephemeral" and "could not be made" in failure["text"]
    command(strict, user, "one too many", limited)
    assert response_urls.received(limited) == [{"response_type": "ephemeral", "text": LIMITED}]


def test_a_response_url_inside_is_refused_without_permission(serve_app, response_urls, served_upstream):
    guarded = serve_app(slack_signing_secret=SIGNING_SECRET)  # WEBHOOK_ALLOW_PRIVATE off
    answer = command(guarded, next(users), "a sneaky cat", response_urls.new())
    assert answer.status_code == 400 and "response_url" in answer.json()["error"]["message"]
    assert not task_with(served_upstream, "a sneaky cat")


def test_a_response_url_past_its_thirty_minutes_is_given_up_and_said_in_the_log(
    service, response_urls, served_upstream, caplog
):
    url = response_urls.new()
    command(service, next(users), "a picture for later", url)
    response_urls.received(url)
    parts = service.app.extensions["nanobanana"]
    ended = parts.store.task(task_with(served_upstream, "a picture for later").task_id)  # by the upstream's id
    with pytest.raises(Undeliverable):
        parts.slack.deliver(replace(ended, created_at=time.time() - RESPONSE_URL_LIFETIME - 1))
    assert "response_url expired" in caplog.text and len(response_urls.received(url)) == 1


@pytest.mark.slow
def test_a_kill_9_between_the_answer_and_the_picture_still_delivers_it(served_upstream, response_urls, tmp_path):
    port = free_port()
    environ = {
        **served_environ(served_upstream),
        "DATABASE_PATH": str(tmp_path / "db.sqlite3"),
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "WEBHOOK_ALLOW_PRIVATE": "1",
        "WEBHOOK_RETRY_DELAYS": "0.5,0.5",
    }
    first = Service(environ, tmp_path / "first.log", port=port).wait_ready()
    url = response_urls.new()
    assert command(first, next(users), "[delay=3] a slow heron", url).status_code == 200
    wait_until(lambda: task_with(served_upstream, "a slow heron"), timeout=10)
    first.kill()
    assert url.rsplit("/", 1)[1] not in response_urls.posts  # nothing delivered before the crash
    second = Service(environ, tmp_path / "second.log", port=port).wait_ready()
    try:
        [posted] = response_urls.received(url)
        assert posted["blocks"][0]["alt_text"] == "[delay=3] a slow heron"
    finally:
        log = second.stop()
    assert SIGNING_SECRET not in log + (tmp_path / "first.log").read_text()
