"""Access tokens, rate limits, metrics and the request log, through Flask's test client."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from tools.processes import ROOT

TOKEN_A, TOKEN_B = "token-for-alice-bot", "token-for-bob-bot"


@pytest.fixture
def guarded(make_app):
    """The app with two access tokens."""
    return make_app(access_tokens=(TOKEN_A, TOKEN_B)).test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def generate(client, headers=None, **params):
    return client.get("/nanobanana", query_string=params, headers=headers or {})


# -- access tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/nanobanana?prompt=a+cat", "/nanobanana/tasks/any", "/nanobanana/history/me", "/nanobanana/credits", "/metrics"],
)
def test_guarded_routes_need_a_token(guarded, path):
    for headers in ({}, bearer("wrong-token"), {"Authorization": "Basic abc"}):
        answer = guarded.get(path, headers=headers)
        assert answer.status_code == 401
        assert answer.json["error"]["code"] == "unauthorized"
        assert "Authorization: Bearer" in answer.json["error"]["message"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_token_by_header_query_or_form(guarded):
    assert generate(guarded, bearer(TOKEN_A), prompt="a cat").status_code == 200
    assert generate(guarded, prompt="a cat", token=TOKEN_B).status_code == 200
    assert guarded.post("/nanobanana", data={"prompt": "a cat", "token": TOKEN_A}).status_code == 200
    assert guarded.post("/nanobanana", json={"prompt": "a cat", "token": TOKEN_A}).status_code == 200


def test_open_routes_need_no_token(guarded):
    assert guarded.get("/healthz").status_code == 200
    callback = {"code": 200, "data": {"taskId": "unknown", "info": {"resultImageUrl": "https://x.test/a.png"}}}
    assert guarded.post("/nanobanana/callback", json=callback).status_code == 200


def test_conversations_are_kept_apart_per_token(guarded):
    cat = generate(guarded, bearer(TOKEN_A), prompt="a cat", user_id="sam").json
    other = generate(guarded, bearer(TOKEN_B), prompt="make it blue", user_id="sam").json
    assert other["mode"] == "text-to-image" and other["used_previous_image"] is False
    assert guarded.get("/nanobanana/history/sam", headers=bearer(TOKEN_A)).json["last_image_url"] == cat["image_url"]
    assert guarded.get("/nanobanana/history/sam", headers=bearer(TOKEN_B)).json["last_image_url"] == other["image_url"]
    assert guarded.get(f"/nanobanana/tasks/{cat['task_id']}", headers=bearer(TOKEN_B)).status_code == 404
    assert guarded.get(f"/nanobanana/tasks/{cat['task_id']}", headers=bearer(TOKEN_A)).status_code == 200


# -- rate limits -------------------------------------------------------------------------------


@pytest.fixture
def limited(make_app):
    return make_app(rate_limit="2/minute").test_client()


def test_rate_limit_per_user(limited, emulated):
    for _ in range(2):
        assert generate(limited, prompt="a cat", user_id="eager").status_code == 200
    answer = generate(limited, prompt="a cat", user_id="eager")
    assert answer.status_code == 429
    assert answer.json["status"] == "error" and answer.json["error"]["code"] == "rate_limited"
    assert 0 < int(answer.headers["Retry-After"]) <= 60
    assert len(emulated.submissions()) == 2  # the refused request spent no credit
    assert generate(limited, prompt="a cat", user_id="patient").status_code == 200


def test_rate_limit_headers_only_on_the_429(limited):
    answers = [generate(limited, prompt="[delay=1] a cat", user_id="counted", wait="0") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [202, 202, 429]
    for answer in answers[:2]:
        assert not [name for name, _ in answer.headers if name.lower().startswith(("x-ratelimit", "retry-after"))]
    assert "Retry-After" in answers[2].headers


def test_refused_requests_do_not_count_against_the_limit(make_app, limited):
    for params in ({"prompt": "a cat", "format": "xml"}, {"prompt": ""}, {"prompt": "a", "num_images": "9"}):
        for _ in range(2):
            assert generate(limited, user_id="clumsy", **params).status_code == 400
    too_large = limited.post("/nanobanana?user_id=clumsy", data={"prompt": "x" * (1024 * 1024 + 1)})
    assert too_large.status_code == 413
    assert [generate(limited, prompt="a cat", user_id="clumsy").status_code for _ in range(3)] == [200, 200, 429]
    guarded = make_app(rate_limit="2/minute", access_tokens=("t",)).test_client()
    assert [generate(guarded, prompt="a cat", user_id="u").status_code for _ in range(3)] == [401, 401, 401]
    assert generate(guarded, {"Authorization": "Bearer t"}, prompt="a cat", user_id="u").status_code == 200


def test_429_and_413_honour_format_text(limited):
    for _ in range(2):
        generate(limited, prompt="a cat", user_id="texty")
    limited_answer = generate(limited, prompt="a cat", user_id="texty", format="text")
    assert limited_answer.status_code == 429 and limited_answer.mimetype == "text/plain"
    assert limited_answer.text.startswith("Too many pictures")
    large = limited.post("/nanobanana?format=text", data={"prompt": "x" * (1024 * 1024 + 1)})
    assert large.status_code == 413 and large.mimetype == "text/plain"
    assert "1 MiB" in large.text


def test_rate_limit_per_client_address_behind_one_proxy(limited):
    def from_address(address):
        return limited.get("/nanobanana?prompt=a+cat", headers={"X-Forwarded-For": address})

    assert [from_address("203.0.113.7").status_code for _ in range(3)] == [200, 200, 429]
    assert from_address("198.51.100.9").status_code == 200


def test_rate_limit_only_on_generation(limited):
    for _ in range(5):
        assert limited.get("/nanobanana/history/eager").status_code == 200


def test_rate_limit_off(make_app):
    client = make_app(rate_limit=None).test_client()
    assert all(generate(client, prompt="a cat").status_code == 200 for _ in range(25))


# -- metrics and the request log -------------------------------------------------------------


def test_metrics_count_requests_upstream_calls_and_generation_time(client):
    generate(client, prompt="a cat")
    generate(client, prompt="")
    text = client.get("/metrics").text
    assert 'nanobanana_http_requests_total{method="GET",route="/nanobanana",status="200"} 1.0' in text
    assert 'nanobanana_http_requests_total{method="GET",route="/nanobanana",status="400"} 1.0' in text
    assert 'nanobanana_upstream_calls_total{endpoint="generate",outcome="ok"} 1.0' in text
    assert 'nanobanana_upstream_calls_total{endpoint="record-info",outcome="ok"} 1.0' in text
    assert 'nanobanana_generation_seconds_count{status="200"} 1.0' in text
    assert "nanobanana_generations_in_flight 0.0" in text


def test_request_id_is_returned_and_logged_without_the_prompt(client, caplog):
    with caplog.at_level(logging.INFO, logger="nanobanana.requests"):
        answer = generate(client, {"X-Request-ID": "chatbot-42"}, prompt="a secret birthday surprise")
        fresh = client.get("/healthz")
    assert answer.headers["X-Request-ID"] == "chatbot-42"
    assert len(fresh.headers["X-Request-ID"]) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "nanobanana.requests"]
    assert any(
        "request_id=chatbot-42 method=GET path=/nanobanana status=200" in line and answer.json["task_id"] in line
        for line in lines
    )
    assert not any("birthday" in line for line in lines)


def test_unusable_request_id_is_replaced(client):
    answer = client.get("/healthz", headers={"X-Request-ID": "bad id; with <stuff>"})
    assert len(answer.headers["X-Request-ID"]) == 32 and " " not in answer.headers["X-Request-ID"]


SWEEP_COUNT = """
from gevent import monkey; monkey.patch_all()
import threading, gevent
from web.access import SweptMemoryStorage
made = []
original = threading.Timer.__init__
threading.Timer.__init__ = lambda self, *args, **kwargs: made.append(1) or original(self, *args, **kwargs)
storage = SweptMemoryStorage("swept-memory://")
gevent.joinall([gevent.spawn(storage.incr, f"user-{n}", 60) for n in range(2000)])
print(len(made))
"""


def test_a_burst_of_hits_under_gevent_schedules_one_sweep():
    """As in a gunicorn worker: a timer that has not started yet is not alive, yet it is the sweep to come."""
    counted = subprocess.run([sys.executable, "-c", SWEEP_COUNT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert counted.returncode == 0, counted.stderr
    assert int(counted.stdout) <= 2  # limits' own first timer, and one sweep (not one per hit)
