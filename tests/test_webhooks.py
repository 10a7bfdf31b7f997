"""Signed webhooks to the caller: targets, Prefer, and deliveries to a real receiver that checks every signature."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import replace

import pytest
import requests
from flask import Flask, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from domain.netguard import RefusedTarget, check_target, inside, public_session
from domain.params import preferred_wait
from domain.webhooks import event
from stores.records import TaskRecord
from tests.helpers import Served, served_environ
from tools.processes import Service, serving, wait_until

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- where webhooks may go -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://93.184.216.34/hook",
        "https:///no-host",
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[::7f00:1]/hook",  # IPv4-compatible (deprecated) loopback
        "http://[::127.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 to loopback
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 to the metadata address
        "http://[64:ff9b:1::1]/hook",  # local-use NAT64
        "http://[2002:7f00:1::]/hook",  # 6to4 of loopback
        "http://[::ffff:0:a00:1]/hook",  # SIIT (IPv4-translated) of 10.0.0.1
        "http://[fec0::1]/hook",  # site-local (deprecated)
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",  # Teredo
        "http://no-such-host.invalid/hook",
        "http://[x/hook",
    ],
)
def test_internal_and_unusable_targets_are_refused(url):
    with pytest.raises(RefusedTarget):
        check_target(url, allow_private=False)


def test_public_addresses_are_allowed_and_private_ones_when_allowed():
    check_target("https://93.184.216.34/hook", allow_private=False)
    check_target("http://[2606:4700::1111]/hook", allow_private=False)
    check_target("http://[64:ff9b::808:808]/hook", allow_private=False)  # NAT64 to a public address
    check_target("http://[2002:808:808::1]/hook", allow_private=False)  # 6to4 of a public address
    check_target("http://127.0.0.1:8080/hook", allow_private=True)
    assert inside("::ffff:192.168.0.1") and not inside("8.8.8.8")


def test_the_address_actually_reached_is_checked_too():
    """A name that resolved outside when it was checked may resolve inside later: the connection is refused."""
    with serving(Flask("target")) as url, pytest.raises(RefusedTarget):
        public_session(allow_private=False).post(f"{url}/hook", data=b"{}", timeout=5)


# -- in process: refusals and Prefer ----------------------------------------------------------------------


@pytest.fixture
def signed(make_app):
    return make_app(webhook_secret=SECRET).test_client()


@pytest.mark.parametrize(
    "url, words",
    [("http://127.0.0.1:9/hook", "private or local"), ("gopher://x.test/", "not a web address")],
)
def test_a_refused_callback_url_is_400_and_nothing_is_submitted(signed, emulated, url, words):
    answer = signed.get("/nanobanana", query_string={"prompt": "a cat", "callback_url": url})
    assert answer.status_code == 400 and words in answer.json["error"]["message"]
    assert emulated.submissions() == []


def test_without_a_webhook_secret_callback_url_is_400_saying_so(client, emulated):
    answer = client.get("/nanobanana", query_string={"prompt": "a cat", "webhook_url": "https://93.184.216.34/"})
    assert answer.status_code == 400 and "WEBHOOK_SECRET" in answer.json["error"]["message"]
    assert emulated.submissions() == []


@pytest.mark.parametrize(
    "header, expected", [("respond-async", 0.0), ("wait=7", 7.0), ("handling=lenient, wait=3", 3.0), ("", None)]
)
def test_prefer_header(header, expected):
    assert preferred_wait(header) == expected


def test_prefer_respond_async_and_wait(client):
    async_answer = client.get("/nanobanana?prompt=[delay=1]+a+cat", headers={"Prefer": "respond-async"})
    assert async_answer.status_code == 202 and async_answer.headers["Preference-Applied"] == "respond-async"
    waited = client.get("/nanobanana?prompt=[delay=0.1]+a+cat", headers={"Prefer": "wait=1"})
    assert waited.status_code == 200 and waited.headers["Preference-Applied"] == "wait=1"
    explicit = client.get("/nanobanana?prompt=[delay=0.1]+a+cat&wait=0", headers={"Prefer": "wait=1"})
    assert explicit.status_code == 202 and "Preference-Applied" not in explicit.headers


def test_the_event_carries_the_task_answer():
    made = ("https://files.test/cat.png",)
    record = TaskRecord("t1", "", None, None, "text-to-image", (), False, 0.0, state="success", completed_at=60.0)
    sent = event(replace(record, image_urls=made))
    assert (sent["type"], sent["timestamp"]) == ("generation.succeeded", "1970-01-01T00:01:00Z")
    assert (sent["data"]["status"], sent["data"]["task_id"], sent["data"]["image_url"]) == ("success", "t1", made[0])
    assert event(replace(record, state="failed"))["type"] == "generation.failed"


# -- over real HTTP, to a receiver that verifies every delivery ---------------------------------------------


class Receiver:
    """A caller's webhook endpoint. /ok answers 204; /down 500; /flaky 500 once, then 204; /slow sleeps past
    the service's time-out once, then 204; /hold waits until released. Every delivery is verified."""

    def __init__(self):
        self.deliveries: list[dict] = []
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.app = Flask("receiver")
        self.app.add_url_rule("/<behaviour>/<name>", view_func=self.receive, methods=["POST"])

    def receive(self, behaviour: str, name: str):
        with self.lock:
            self.calls[name] = attempt = self.calls.get(name, 0) + 1
        try:
            body = Webhook(SECRET).verify(request.get_data(), dict(request.headers))
        except WebhookVerificationError:
            return "bad signature", 400
        if behaviour == "hold":
            self.release.wait(10)
        if behaviour == "slow" and attempt == 1:
            time.sleep(0.8)
        with self.lock:
            self.deliveries.append({"name": name, "id": request.headers["webhook-id"], "body": body, "at": time.time()})
        if behaviour == "down" or (behaviour == "flaky" and attempt == 1):
            return "not now", 500
        return "", 204

    def of(self, name: str) -> list[dict]:
        with self.lock:
            return [d for d in self.deliveries if d["name"] == name]


@pytest.fixture(scope="module")
def receiver():
    receiving = Receiver()
    with serving(receiving.app) as url:
        receiving.url = url
        yield receiving


def settings_for(upstream, **extra) -> dict[str, str]:
    webhooks = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "1", "WEBHOOK_RETRY_DELAYS": "0.5,0.5"}
    return served_environ(upstream, **{**webhooks, "WEBHOOK_TIMEOUT": "2", **extra})


WEBHOOK_SETTINGS = {
    "webhook_secret": SECRET,
    "webhook_allow_private": True,
    "webhook_retry_delays": (0.2, 0.2),
    "webhook_timeout": 0.5,
    "rate_limit": None,
}


@pytest.fixture
def service(serve_app):
    return serve_app(**WEBHOOK_SETTINGS)


def start(service: Service | Served, receiver: Receiver, behaviour: str, name: str, prompt: str = "a cat") -> dict:
    url = f"{receiver.url}/{behaviour}/{name}"
    answer = service.get("/nanobanana", params={"prompt": prompt, "callback_url": url, "wait": "0"})
    assert answer.status_code == 202
    return answer.json()


def webhook_of(service: Service | Served, task_id: str) -> dict:
    return service.get(f"/nanobanana/tasks/{task_id}").json()["webhook"]


def test_a_finished_picture_is_pushed_signed(service, receiver):
    task = start(service, receiver, "ok", "success")
    [delivery] = wait_until(lambda: receiver.of("success"), timeout=10)
    assert delivery["body"]["type"] == "generation.succeeded"
    answer = service.get(f"/nanobanana/tasks/{task['task_id']}").json()
    assert delivery["body"]["data"]["image_url"] == answer["image_url"]
    assert delivery["body"]["data"]["task_id"] == task["task_id"]
    assert wait_until(lambda: webhook_of(service, task["task_id"]) == {"state": "delivered", "attempts": 1})


def test_a_failed_picture_is_pushed_as_failed(service, receiver):
    start(service, receiver, "ok", "failure", prompt="[fail] a cat")
    [delivery] = wait_until(lambda: receiver.of("failure"), timeout=10)
    assert delivery["body"]["type"] == "generation.failed"
    assert delivery["body"]["data"]["error"]["code"] == "generation_failed"


def test_a_cancelled_picture_is_pushed_as_cancelled(serve_app, receiver):
    paced = serve_app(upstream_rate=(1, 60.0), **WEBHOOK_SETTINGS)
    paced.get("/nanobanana", params={"prompt": "takes the only turn"})
    task = start(paced, receiver, "ok", "cancelled", prompt="waits its turn")
    assert task["queue_position"] == 1
    assert requests.delete(f"{paced.url}/nanobanana/tasks/{task['task_id']}", timeout=10).status_code == 200
    [delivery] = wait_until(lambda: receiver.of("cancelled"), timeout=10)
    assert delivery["body"]["type"] == "generation.cancelled"
    data = delivery["body"]["data"]
    assert data["status"] == "cancelled" and data["error"]["code"] == "cancelled"


@pytest.mark.parametrize("behaviour", ["flaky", "slow"])
def test_a_failed_attempt_is_retried_with_the_same_id(service, receiver, behaviour):
    task = start(service, receiver, behaviour, f"retried-{behaviour}")
    wait_until(lambda: webhook_of(service, task["task_id"]) == {"state": "delivered", "attempts": 2}, timeout=15)
    ids = {delivery["id"] for delivery in receiver.of(f"retried-{behaviour}")}
    assert len(ids) == 1 and ids.pop() == f"msg_{task['task_id']}_success"


def test_a_webhook_nobody_takes_is_given_up_after_the_last_retry(service, receiver):
    task = start(service, receiver, "down", "never")
    assert wait_until(lambda: webhook_of(service, task["task_id"])["state"] == "failed", timeout=15)
    assert webhook_of(service, task["task_id"])["attempts"] == 3 == receiver.calls["never"]  # one, and two retries


def test_a_slow_receiver_delays_no_other_delivery(service, receiver):
    receiver.release.clear()
    start(service, receiver, "hold", "held")
    wait_until(lambda: receiver.calls.get("held"), timeout=10)  # its first attempt now waits at the receiver
    start(service, receiver, "ok", "beside")
    wait_until(lambda: receiver.of("beside"), timeout=10)
    assert not receiver.of("held"), "the second webhook waited behind the first"
    receiver.release.set()


@pytest.mark.slow
def test_a_restart_between_attempts_loses_nothing(served_upstream, receiver, tmp_path):
    environ = settings_for(served_upstream, WEBHOOK_RETRY_DELAYS="2", DATABASE_PATH=str(tmp_path / "db.sqlite3"))
    first = Service(environ, tmp_path / "first.log").wait_ready()
    task = start(first, receiver, "flaky", "restarted")
    wait_until(lambda: webhook_of(first, task["task_id"]) == {"state": "pending", "attempts": 1}, timeout=10)
    first.kill()
    second = Service(environ, tmp_path / "second.log", port=first.port).wait_ready()
    try:
        wait_until(lambda: webhook_of(second, task["task_id"]) == {"state": "delivered", "attempts": 2}, timeout=15)
    finally:
        second.stop()
    first_attempt, second_attempt = receiver.of("restarted")
    assert first_attempt["id"] == second_attempt["id"] and second_attempt["body"]["data"]["status"] == "success"


def test_internal_targets_are_refused_over_http(serve_app, receiver):
    strict = serve_app(**{**WEBHOOK_SETTINGS, "webhook_allow_private": False})
    answer = strict.get("/nanobanana", params={"prompt": "a cat", "callback_url": f"{receiver.url}/ok/strict"})
    assert answer.status_code == 400 and "private or local" in answer.json()["error"]["message"]
    assert json.loads(answer.text)["status"] == "error"
