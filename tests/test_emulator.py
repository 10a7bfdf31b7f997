"""The emulator speaks the upstream as UPSTREAM.md describes it, callbacks included."""

from __future__ import annotations

import json
import threading
from xml.etree import ElementTree

import pytest
import requests
from flask import Flask, request

from nanobanana_client import parse_record
from tools.emulator import Upstream, create_emulator
from tools.processes import serving, wait_until

KEY = "emulator-key"


@pytest.fixture
def receiver():
    """A callback receiver: every JSON body posted to it, in order."""
    received: list[dict] = []
    lock = threading.Lock()
    app = Flask("receiver")

    @app.post("/callback")
    def callback():
        with lock:
            received.append(request.get_json())
        return "ok"

    with serving(app) as url:
        yield f"{url}/callback", received


@pytest.fixture
def emulator():
    upstream = Upstream(delay=0.1, keys={KEY: 10, "empty": 0})
    with serving(create_emulator(upstream)) as url:
        yield url, upstream


def call(url: str, path: str, key: str = KEY, **kwargs) -> dict:
    method = "POST" if "json" in kwargs else "GET"
    answer = requests.request(method, url + path, headers={"Authorization": f"Bearer {key}"}, timeout=5, **kwargs)
    return answer.json()


def submit(url: str, endpoint: str = "generate", key: str = KEY, **body) -> dict:
    body.setdefault("callBackUrl", "http://127.0.0.1:9/unused")
    if endpoint == "generate":
        body.setdefault("type", "TEXTTOIAMGE")
    return call(url, f"/api/v1/nanobanana/{endpoint}", key=key, json=body)


def record_info(url: str, task_id: str, key: str = KEY) -> dict:
    return call(url, "/api/v1/nanobanana/record-info", key=key, params={"taskId": task_id})


def test_task_is_generating_then_done_with_a_picture_of_the_prompt(emulator):
    url, _ = emulator
    task_id = submit(url, prompt="a blue whale")["data"]["taskId"]
    assert record_info(url, task_id)["data"]["successFlag"] == 0
    done = wait_until(lambda: (r := record_info(url, task_id))["data"]["successFlag"] == 1 and r)
    picture = requests.get(done["data"]["response"]["resultImageUrl"], timeout=5)
    assert picture.headers["Content-Type"].startswith("image/svg+xml")
    assert "a blue whale" in picture.text and "#1d4ed8" in picture.text


def test_corrected_spelling_is_rejected_with_422(emulator):
    url, _ = emulator
    assert submit(url, prompt="a cat", type="TEXTTOIMAGE")["code"] == 422


def test_pro_answers_with_message_not_msg(emulator):
    url, _ = emulator
    answer = submit(url, "generate-pro", prompt="a cat", resolution="2K")
    assert answer["code"] == 200 and "message" in answer and "msg" not in answer


def test_polling_with_task_id_spelling_is_a_500(emulator):
    url, _ = emulator
    assert call(url, "/api/v1/nanobanana/record-info", params={"task_id": "x"})["code"] == 500


def test_tasks_belong_to_their_key(emulator):
    url, upstream = emulator
    upstream.keys["other"] = 10
    task_id = submit(url, prompt="a cat")["data"]["taskId"]
    assert record_info(url, task_id, key="other")["code"] == 404


def test_keys_without_credits_and_unknown_keys(emulator):
    url, _ = emulator
    assert submit(url, key="empty", prompt="a cat")["code"] == 402
    assert submit(url, key="stranger", prompt="a cat")["code"] == 401
    assert call(url, "/api/v1/common/credit", key="empty") == {"code": 200, "msg": "success", "data": 0}


def test_failure_markers(emulator):
    url, _ = emulator
    failed = submit(url, prompt="[fail] a cat")["data"]["taskId"]
    not_created = submit(url, prompt="[create-fail] a cat")["data"]["taskId"]
    assert wait_until(lambda: record_info(url, failed)["data"]["successFlag"] == 3)
    assert wait_until(lambda: record_info(url, not_created)["data"]["successFlag"] == 2)
    assert (
        requests.post(
            f"{url}/api/v1/nanobanana/generate", json={"prompt": "[submit-http=502] x"}, timeout=5
        ).status_code
        == 502
    )


def test_callback_of_generate_has_the_info_shape(emulator, receiver):
    url, _ = emulator
    callback_url, received = receiver
    task_id = submit(url, prompt="a cat", callBackUrl=callback_url)["data"]["taskId"]
    wait_until(lambda: received)
    assert received[0]["code"] == 200
    assert received[0]["data"]["taskId"] == task_id
    assert received[0]["data"]["info"]["resultImageUrl"].endswith(".svg")


def test_callback_of_generate_2_carries_the_record(emulator, receiver):
    url, _ = emulator
    callback_url, received = receiver
    submit(url, "generate-2", prompt="a cat", imageUrls=[], callBackUrl=callback_url)
    wait_until(lambda: received)
    assert received[0]["data"]["successFlag"] == 1
    assert received[0]["data"]["operationType"] == "generate"


def test_callback_twice_and_never(emulator, receiver):
    url, _ = emulator
    callback_url, received = receiver
    never = submit(url, prompt="[callback=never] a", callBackUrl=callback_url)["data"]["taskId"]
    twice = submit(url, prompt="[callback=twice] b", callBackUrl=callback_url)["data"]["taskId"]
    wait_until(lambda: len(received) == 2)
    wait_until(lambda: record_info(url, never)["data"]["successFlag"] == 1)
    assert [body["data"]["taskId"] for body in received] == [twice, twice]


def test_with_a_state_file_tasks_and_pictures_outlive_a_restart(tmp_path):
    state = str(tmp_path / "emulator-tasks.jsonl")
    with serving(create_emulator(Upstream(delay=0.1, state_path=state))) as url:
        task_id = submit(url, prompt="a lasting lighthouse")["data"]["taskId"]
        wait_until(lambda: record_info(url, task_id)["data"]["successFlag"] == 1)
        picture_url = record_info(url, task_id)["data"]["response"]["resultImageUrl"]
    with serving(create_emulator(Upstream(delay=0.1, state_path=state))) as url:  # started again
        assert record_info(url, task_id)["data"]["successFlag"] == 1
        path = picture_url.split("/files/", 1)[1]
        assert "a lasting lighthouse" in requests.get(f"{url}/files/{path}", timeout=5).text


@pytest.mark.parametrize("prompt", ["a cat \ud800 alone", "a cat \x00 with a NUL", "\x1b[31m red \ufffe"])
def test_any_prompt_makes_a_picture_that_parses(emulator, prompt):
    url, _ = emulator
    body = json.dumps({"prompt": prompt, "type": "TEXTTOIAMGE", "callBackUrl": "http://127.0.0.1:9/unused"})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = requests.post(f"{url}/api/v1/nanobanana/generate", data=body, headers=headers, timeout=5).json()
    task_id = answer["data"]["taskId"]
    wait_until(lambda: record_info(url, task_id)["data"]["successFlag"] == 1)
    picture = requests.get(record_info(url, task_id)["data"]["response"]["resultImageUrl"], timeout=5)
    assert picture.status_code == 200
    ElementTree.fromstring(picture.content)  # well-formed XML
    assert "a cat" in picture.text or "red" in picture.text


# -- limits like the provider's, and the shapes seen in the wild --------------------------------------------------


def test_a_rate_limit_refuses_the_excess_with_429_and_counts_it(emulator):
    url, upstream = emulator
    assert requests.post(f"{url}/_config", json={"rate": "2/1s"}, timeout=5).json()["rate"] == "2/1s"
    answers = [submit(url, prompt=f"cat {n}")["code"] for n in range(3)]
    assert answers == [200, 200, 429]
    assert requests.get(f"{url}/_config", timeout=5).json()["refused"] == 1
    assert len(upstream.tasks) == 2  # refused, not queued
    wait_until(lambda: submit(url, prompt="a cat, a second later")["code"] == 200, timeout=3)


def test_a_running_limit_refuses_until_a_task_finishes(emulator):
    url, _ = emulator
    requests.post(f"{url}/_config", json={"max_running": 1}, timeout=5)
    assert submit(url, prompt="[delay=0.3] first")["code"] == 200
    assert submit(url, prompt="second")["code"] == 429
    wait_until(lambda: submit(url, prompt="third")["code"] == 200, timeout=3)


@pytest.mark.parametrize("shape", ["urls", "json", "state"])
def test_every_shape_reads_as_the_same_picture(emulator, shape):
    url, _ = emulator
    task_id = submit(url, prompt=f"[shape={shape}] a cat")["data"]["taskId"]
    assert parse_record(record_info(url, task_id)["data"]).state == "pending"
    done = wait_until(lambda: (s := parse_record(record_info(url, task_id)["data"])).done and s)
    assert done.state == "success" and done.image_urls[0].startswith(f"{url}/files/{task_id}/")


def test_a_failure_in_the_state_shape_says_why(emulator):
    url, _ = emulator
    task_id = submit(url, prompt="[shape=state] [fail] a cat")["data"]["taskId"]
    failed = wait_until(lambda: (s := parse_record(record_info(url, task_id)["data"])).done and s)
    assert failed.state == "failed" and "could not be generated" in failed.error_message
