"""The client against `responses`: every upstream variant of UPSTREAM.md."""

from __future__ import annotations

import json

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from nanobanana_client import (
    CALLBACK_PLACEHOLDER,
    MAX_POLL_GAP,
    Generation,
    KeyRefused,
    NanoBananaClient,
    NanoBananaError,
    SubmissionUncertain,
    Task,
    TaskStatus,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    callback_task_id,
    parse_callback,
)
from tests.conftest import KEYS, UPSTREAM

GENERATE = f"{UPSTREAM}/api/v1/nanobanana/generate"
GENERATE_PRO = f"{UPSTREAM}/api/v1/nanobanana/generate-pro"
GENERATE_2 = f"{UPSTREAM}/api/v1/nanobanana/generate-2"
RECORD_INFO = f"{UPSTREAM}/api/v1/nanobanana/record-info"
CREDIT = f"{UPSTREAM}/api/v1/common/credit"
ACCEPTED = {"code": 200, "msg": "success", "data": {"taskId": "task-1"}}


class FakeTime:
    """A clock that moves only when the client sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(fake_time, mocked) -> NanoBananaClient:
    return NanoBananaClient(
        UPSTREAM, KEYS, poll_interval=2.0, poll_max_attempts=5, clock=fake_time.clock, sleep=fake_time.sleep
    )


def upstream_calls(mocked) -> list:
    """The calls to the upstream; a stray callback from an emulator thread of another test is not one."""
    return [call for call in mocked.calls if call.request.url.startswith(UPSTREAM)]


def sent_json(call) -> dict:
    return json.loads(call.request.body)


def record(flag, response=None, **extra) -> dict:
    return {
        "code": 200,
        "msg": "success",
        "data": {"taskId": "task-1", "successFlag": flag, "response": response, **extra},
    }


def refused_connection() -> requests.ConnectionError:
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.ConnectionError(MaxRetryError(None, GENERATE, reason))


# -- submit: field names of each model -------------------------------------------------


def test_text_to_image_uses_misspelled_type_and_first_key(client, mocked):
    mocked.post(GENERATE, json=ACCEPTED)
    task = client.submit(Generation(prompt="a cat", aspect_ratio="16:9"))
    assert task.task_id == "task-1" and task.key_number == 1
    call = upstream_calls(mocked)[0]
    assert call.request.headers["Authorization"] == "Bearer key-one"
    assert sent_json(call) == {
        "prompt": "a cat",
        "callBackUrl": CALLBACK_PLACEHOLDER,
        "type": "TEXTTOIAMGE",
        "numImages": 1,
        "image_size": "16:9",
    }


def test_image_to_image_sends_the_images(client, mocked):
    mocked.post(GENERATE, json=ACCEPTED)
    client.submit(Generation(prompt="make it blue", image_urls=("https://x.test/a.png",), num_images=2))
    body = sent_json(upstream_calls(mocked)[0])
    assert body["type"] == "IMAGETOIAMGE"
    assert body["imageUrls"] == ["https://x.test/a.png"]
    assert body["numImages"] == 2


def test_pro_model_uses_its_own_fields_and_message_key(client, mocked):
    mocked.post(GENERATE_PRO, json={"code": 200, "message": "success", "data": {"taskId": "pro-1"}})
    task = client.submit(Generation(prompt="a cat", model="nano-banana-pro", aspect_ratio="auto", resolution="4K"))
    assert task.task_id == "pro-1"
    body = sent_json(upstream_calls(mocked)[0])
    assert body == {"prompt": "a cat", "callBackUrl": CALLBACK_PLACEHOLDER, "aspectRatio": "auto", "resolution": "4K"}


def test_model_2_sends_empty_image_list_for_text_to_image(client, mocked):
    mocked.post(GENERATE_2, json={"code": 200, "msg": "success", "data": {"taskId": "two-1"}})
    client.submit(Generation(prompt="a cat", model="nano-banana-2", aspect_ratio="8:1"))
    body = sent_json(upstream_calls(mocked)[0])
    assert body["imageUrls"] == [] and body["aspectRatio"] == "8:1"
    assert "type" not in body and "numImages" not in body


# -- submit: keys ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 402, 433])
def test_refused_key_is_set_aside_and_next_key_used(client, mocked, fake_time, code):
    mocked.post(GENERATE, json={"code": code, "msg": "Credits insufficient"})
    with pytest.raises(KeyRefused):
        client.submit(Generation(prompt="a"))
    mocked.post(GENERATE, json=ACCEPTED)
    assert client.submit(Generation(prompt="b")).key_number == 2  # key 1 is not asked again
    keys_used = [call.request.headers["Authorization"] for call in upstream_calls(mocked)]
    assert keys_used == ["Bearer key-one", "Bearer key-two"]
    fake_time.now += 601
    assert client.submit(Generation(prompt="c")).key_number == 1


def test_the_key_asked_for_is_used(client, mocked):
    mocked.post(GENERATE, json=ACCEPTED)
    assert client.submit(Generation(prompt="a"), key_number=2).key_number == 2
    assert upstream_calls(mocked)[0].request.headers["Authorization"] == "Bearer key-two"


def test_no_usable_key_is_unavailable(client, mocked):
    mocked.post(GENERATE, json={"code": 402, "msg": "Credits insufficient"})
    for _ in range(2):
        with pytest.raises(KeyRefused):
            client.submit(Generation(prompt="a"))
    with pytest.raises(UpstreamUnavailable, match="out of credits") as caught:
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 2
    assert caught.value.retry_after == 600


def test_http_status_error_with_code_in_body_is_read_from_body(client, mocked):
    mocked.post(GENERATE, json={"code": 401, "msg": "bad key"}, status=200)
    with pytest.raises(KeyRefused):
        client.submit(Generation(prompt="a"))


# -- submit: retries only when nothing was created ------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        {"json": {"code": 500, "msg": "server error"}},
        {"body": "<html>502 Bad Gateway</html>", "status": 502},
        {"body": refused_connection()},
        {"body": requests.ConnectTimeout("connect timed out")},
    ],
)
def test_submission_is_retried_when_certainly_not_created(client, mocked, fake_time, failure):
    mocked.post(GENERATE, **failure)
    mocked.post(GENERATE, **failure)
    mocked.post(GENERATE, json=ACCEPTED)
    assert client.submit(Generation(prompt="a")).task_id == "task-1"
    assert len(upstream_calls(mocked)) == 3
    assert fake_time.sleeps == [0.5, 1.0]


def test_retries_stop_after_two(client, mocked):
    mocked.post(GENERATE, json={"code": 500, "msg": "server error"})
    with pytest.raises(UpstreamError, match="500"):
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 3


@pytest.mark.parametrize(
    "answer", [{"code": 429, "status": 200}, {"code": 455, "status": 200}, {"code": 503, "status": 503}]
)
def test_a_busy_upstream_is_not_retried_but_said_with_its_retry_after(client, mocked, fake_time, answer):
    mocked.post(
        GENERATE,
        json={"code": answer["code"], "msg": "slow down"},
        status=answer["status"],
        headers={"Retry-After": "3"},
    )
    with pytest.raises(UpstreamBusy) as caught:
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 1 and fake_time.sleeps == []
    assert caught.value.retry_after == 3


def test_refused_connection_everywhere_is_unavailable(client, mocked):
    mocked.post(GENERATE, body=refused_connection())
    with pytest.raises(UpstreamUnavailable, match="cannot be reached"):
        client.submit(Generation(prompt="a"))


@pytest.mark.parametrize(
    "lost",
    [requests.ReadTimeout("read timed out"), requests.ConnectionError(ProtocolError("Connection aborted."))],
)
def test_submission_with_unknown_outcome_is_not_retried(client, mocked, lost):
    mocked.post(GENERATE, body=lost)
    with pytest.raises(SubmissionUncertain, match="not retried"):
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 1


def test_a_feature_turned_off_fails_at_once_saying_so(client, mocked):
    mocked.post(GENERATE, json={"code": 505, "msg": "feature disabled"})
    with pytest.raises(UpstreamError, match="turned this off") as caught:
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 1 and caught.value.code == "upstream_error"


def test_misspelling_rejection_is_an_upstream_error_not_retried(client, mocked):
    mocked.post(GENERATE, json={"code": 422, "msg": "type is invalid"})
    with pytest.raises(UpstreamError, match="422"):
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 1


def test_content_refusal_is_rejected_with_upstream_reason(client, mocked):
    mocked.post(GENERATE, json={"code": 400, "msg": "prompt violates the content policy"})
    with pytest.raises(UpstreamRejected, match="content policy"):
        client.submit(Generation(prompt="a"))


@pytest.mark.parametrize(
    "answer",
    [{"json": {"code": 200, "msg": "success", "data": {}}}, {"body": "<html>ok</html>", "status": 200}],
)
def test_unusable_acceptance_is_an_upstream_error(client, mocked, answer):
    mocked.post(GENERATE, **answer)
    with pytest.raises(UpstreamError):
        client.submit(Generation(prompt="a"))
    assert len(upstream_calls(mocked)) == 1


# -- status --------------------------------------------------------------------------------


def test_status_polls_with_task_id_and_the_tasks_own_key(client, mocked):
    mocked.get(RECORD_INFO, json=record(0))
    assert client.status(Task("task-1", 2, 0.0)).state == "pending"
    request = upstream_calls(mocked)[0].request
    assert request.url == f"{RECORD_INFO}?taskId=task-1"
    assert request.headers["Authorization"] == "Bearer key-two"


@pytest.mark.parametrize(
    "response, urls",
    [
        ({"resultImageUrl": "https://f.test/1.png"}, ("https://f.test/1.png",)),
        (
            {"resultImageUrl": ["https://f.test/1.png", "https://f.test/2.png"]},
            ("https://f.test/1.png", "https://f.test/2.png"),
        ),
        ({"resultUrls": ["https://f.test/3.png"]}, ("https://f.test/3.png",)),
        ({"resultImageUrl": "", "resultUrls": ["https://f.test/4.png"]}, ("https://f.test/4.png",)),
        ({"resultJson": '{"resultUrls": ["https://f.test/5.png"]}'}, ("https://f.test/5.png",)),
    ],
)
def test_result_urls_in_every_shape(client, mocked, response, urls):
    mocked.get(RECORD_INFO, json=record(1, response))
    status = client.status(Task("task-1", 1, 0.0))
    assert status.state == "success" and status.image_urls == urls


def test_result_json_beside_the_response_is_read_too(client, mocked):
    mocked.get(RECORD_INFO, json=record(1, None, resultJson='{"resultUrls": ["https://f.test/6.png"]}'))
    assert client.status(Task("task-1", 1, 0.0)).image_urls == ("https://f.test/6.png",)


def state_record(state: str, **extra) -> dict:
    """A record as the provider's other endpoints answer it: `state` instead of `successFlag`."""
    return {"code": 200, "msg": "success", "data": {"taskId": "task-1", "state": state, **extra}}


@pytest.mark.parametrize("state", ["waiting", "queuing", "generating"])
def test_a_state_still_under_way_is_pending(client, mocked, state):
    mocked.get(RECORD_INFO, json=state_record(state))
    assert client.status(Task("task-1", 1, 0.0)).state == "pending"


def test_the_state_of_a_finished_task_and_its_result_json(client, mocked):
    mocked.get(RECORD_INFO, json=state_record("success", resultJson='{"resultUrls": ["https://f.test/7.png"]}'))
    assert client.status(Task("task-1", 1, 0.0)).image_urls == ("https://f.test/7.png",)
    mocked.get(RECORD_INFO, json=state_record("fail", failMsg="not allowed"))
    failed = client.status(Task("task-1", 1, 0.0))
    assert failed.state == "failed" and "not allowed" in failed.error_message


@pytest.mark.parametrize("answer", [state_record("paused"), state_record("success", resultJson="{broken")])
def test_an_unknown_state_or_an_unreadable_result_is_no_success(client, mocked, answer):
    mocked.get(RECORD_INFO, json=answer)
    with pytest.raises(NanoBananaError):
        client.status(Task("task-1", 1, 0.0))


@pytest.mark.parametrize(
    "flag, opening", [(2, "could not start"), (3, "could not be made"), ("3", "could not be made")]
)
def test_failed_generation_carries_the_reason(client, mocked, flag, opening):
    mocked.get(RECORD_INFO, json=record(flag, errorCode=501, errorMessage="face detected"))
    status = client.status(Task("task-1", 1, 0.0))
    assert status.state == "failed"
    assert opening in status.error_message and "face detected" in status.error_message


@pytest.mark.parametrize(
    "answer",
    [
        {"json": record(7)},
        {"json": record(None)},
        {"json": record(1, {})},
        {"json": {"code": 404, "msg": "task not found"}},
        {"json": {"code": 500, "message": "boom"}},
        {"body": "<html>oops</html>", "status": 503},
        {"body": "not json", "status": 200},
    ],
)
def test_unusable_status_raises_instead_of_passing_for_success(client, mocked, answer):
    mocked.get(RECORD_INFO, **answer)
    with pytest.raises(NanoBananaError):
        client.status(Task("task-1", 1, 0.0))


# -- the polling schedule -----------------------------------------------------------------------


def test_polls_fall_every_interval_after_submission(client):
    assert [client.next_poll(100.0, 100.0 + t) for t in (0, 1.9, 2.0, 9.99)] == [102, 102, 104, 110]


def test_past_the_window_polls_come_further_and_further_apart(client):
    moments, after = [], 0.0
    while (after := client.next_poll(0.0, after)) < 600:
        moments.append(after)
    # five polls two seconds apart (the window), then gaps of 4, 8, 16, ... seconds
    assert moments == [2, 4, 6, 8, 10, 14, 22, 38, 70, 134, 262, 518]


def test_gaps_between_polls_stop_growing_at_ten_minutes(client):
    late = client.next_poll(0.0, 86_000)
    assert client.next_poll(0.0, late) - late == MAX_POLL_GAP == 600


# -- credits ---------------------------------------------------------------------------------


def test_credits_of_each_key(client, mocked):
    mocked.get(CREDIT, json={"code": 200, "msg": "success", "data": 120.5})
    mocked.get(CREDIT, json={"code": 401, "msg": "bad key"})
    credits = client.credits()
    assert [(c.key, c.credits, c.usable) for c in credits] == [(1, 120.5, True), (2, None, False)]


# -- callbacks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            {
                "code": 200,
                "msg": "success",
                "data": {"taskId": "t", "info": {"resultImageUrl": "https://f.test/1.png"}},
            },
            TaskStatus("success", ("https://f.test/1.png",)),
        ),
        (
            {
                "code": 200,
                "msg": "success",
                "data": {
                    "taskId": "t",
                    "successFlag": 1,
                    "operationType": "generate",
                    "response": {"resultImageUrl": "https://f.test/2.png"},
                },
            },
            TaskStatus("success", ("https://f.test/2.png",)),
        ),
        (
            {"code": 501, "msg": "generation failed", "data": {"taskId": "t", "info": None}},
            TaskStatus("failed", error_message="The image could not be made: generation failed"),
        ),
        ({"code": 200, "msg": "success", "data": {"taskId": "t", "info": {}}}, None),
        ({"code": 200, "data": {"taskId": "t", "successFlag": 0}}, None),
        (
            {
                "code": 200,
                "data": {"taskId": "t", "state": "success", "resultJson": '{"resultUrls": ["https://f.test/8.png"]}'},
            },
            TaskStatus("success", ("https://f.test/8.png",)),
        ),
        ({"code": 200, "data": {"taskId": "t", "state": "generating"}}, None),
        ({"code": 200, "data": {"taskId": "t", "successFlag": "weird"}}, None),
        (["not", "an", "object"], None),
    ],
)
def test_callback_in_either_shape(body, expected):
    assert parse_callback(body) == expected


@pytest.mark.parametrize(
    "body, task_id",
    [({"data": {"taskId": "abc"}}, "abc"), ({"data": {"taskId": 5}}, None), ({"data": None}, None), (None, None)],
)
def test_callback_task_id(body, task_id):
    assert callback_task_id(body) == task_id
