"""The app through Flask's test client, with the emulator answering at the HTTP layer."""

from __future__ import annotations

import pytest

from errors import StoreUnavailable
from stores.sqlite import SqliteStore
from tests.conftest import UPSTREAM
from tools.processes import wait_until


def generate(client, **params):
    return client.get("/nanobanana", query_string=params)


def sent_params(upstream, task_id: str) -> dict:
    return upstream.tasks[task_id].params


# -- the conversation ----------------------------------------------------------------------


def test_text_to_image_answers_with_the_picture(client, emulated):
    answer = generate(client, prompt="a cat", user_id="alice")
    assert answer.status_code == 200
    body = answer.json
    assert body["status"] == "success"
    assert body["mode"] == "text-to-image"
    assert body["image_url"].startswith(f"{UPSTREAM}/files/{body['upstream_task_id']}/")
    assert body["image_urls"] == [body["image_url"]]
    assert body["source_image_urls"] == [] and body["used_previous_image"] is False
    assert body["user_id"] == "alice"
    assert isinstance(body["elapsed_seconds"], float)
    assert sent_params(emulated, body["upstream_task_id"])["type"] == "TEXTTOIAMGE"


def test_edit_uses_previous_result(client, emulated):
    first = generate(client, prompt="a cat", user_id="alice").json
    second = generate(client, prompt="make it blue", user_id="alice").json
    assert second["mode"] == "image-to-image"
    assert second["used_previous_image"] is True
    assert second["source_image_urls"] == [first["image_url"]]
    assert sent_params(emulated, second["upstream_task_id"])["imageUrls"] == [first["image_url"]]
    assert client.get("/nanobanana/history/alice").json["last_image_url"] == second["image_url"]


def test_users_are_kept_apart(client):
    generate(client, prompt="a cat", user_id="alice")
    assert generate(client, prompt="a dog", user_id="bob").json["mode"] == "text-to-image"


def test_without_user_id_nothing_is_remembered(client):
    generate(client, prompt="a cat")
    assert generate(client, prompt="make it blue").json["mode"] == "text-to-image"


@pytest.mark.parametrize("name", ["image_url", "image", "imageUrl", "image_urls"])
def test_explicit_image_wins_over_the_remembered_one(client, emulated, name):
    generate(client, prompt="a cat", user_id="alice")
    body = generate(
        client, prompt="combine", user_id="alice", **{name: "https://x.test/a.png,https://x.test/b.png"}
    ).json
    assert body["used_previous_image"] is False
    assert body["source_image_urls"] == ["https://x.test/a.png", "https://x.test/b.png"]
    assert sent_params(emulated, body["upstream_task_id"])["imageUrls"] == body["source_image_urls"]


def test_repeated_image_parameter(client):
    answer = client.get("/nanobanana?prompt=mix&image_url=https://x.test/a.png&image_url=https://x.test/b.png")
    assert answer.json["source_image_urls"] == ["https://x.test/a.png", "https://x.test/b.png"]


def test_reset_starts_over(client):
    generate(client, prompt="a cat", user_id="alice")
    body = generate(client, prompt="a dog", user_id="alice", reset="true").json
    assert body["mode"] == "text-to-image" and body["used_previous_image"] is False


def test_failed_generation_is_502_and_leaves_the_history_alone(client):
    first = generate(client, prompt="a cat", user_id="alice").json
    answer = generate(client, prompt="[fail] make it blue", user_id="alice")
    assert answer.status_code == 502
    assert answer.json["status"] == "failed"
    assert answer.json["error"]["code"] == "generation_failed"
    assert "could not be made" in answer.json["error"]["message"]
    assert client.get("/nanobanana/history/alice").json["last_image_url"] == first["image_url"]


def test_post_form_and_json_take_the_same_fields(client):
    form = client.post("/nanobanana", data={"prompt": "a cat", "userId": "carol"})
    assert form.status_code == 200 and form.json["user_id"] == "carol"
    body = client.post("/nanobanana", json={"prompt": "make it blue", "user": "carol", "num_images": 2}).json
    assert body["used_previous_image"] is True
    assert len(body["image_urls"]) == 2


@pytest.mark.parametrize(
    "model, path, extra",
    [
        ("nano-banana-pro", "/api/v1/nanobanana/generate-pro", {"resolution": "2k", "aspect_ratio": "auto"}),
        ("nano-banana-2", "/api/v1/nanobanana/generate-2", {"aspect_ratio": "1:8"}),
    ],
)
def test_other_models_use_their_endpoint(client, emulated, model, path, extra):
    body = generate(client, prompt="a cat", model=model, **extra).json
    assert body["status"] == "success"
    assert emulated.tasks[body["upstream_task_id"]].endpoint == path.rsplit("/", 1)[1]


def test_long_prompt_is_fine_for_model_2(client):
    assert generate(client, prompt="x" * 20000, model="nano-banana-2").status_code == 200


# -- formats ----------------------------------------------------------------------------------


def test_text_format_lists_image_urls(client):
    answer = generate(client, prompt="a cat", num_images=2, format="text")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    lines = answer.text.splitlines()
    assert len(lines) == 2 and all(line.startswith("http") for line in lines)


def test_text_format_error_is_plain_text_with_the_same_status(client):
    answer = generate(client, prompt="", format="text")
    assert answer.status_code == 400 and answer.mimetype == "text/plain"
    assert answer.text.startswith("Please add a prompt")


def test_redirect_format_sends_the_browser_to_the_picture(client):
    answer = generate(client, prompt="a cat", format="redirect")
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith(f"{UPSTREAM}/files/")


# -- waiting and late results -----------------------------------------------------------------


def test_wait_zero_answers_pending_and_the_task_completes_later(client):
    generate(client, prompt="a cat", user_id="dave")
    answer = generate(client, prompt="[delay=0.3] make it blue", user_id="dave", wait="0")
    assert answer.status_code == 202
    body = answer.json
    assert body["status"] == "pending"
    assert body["status_url"] == f"http://localhost/nanobanana/tasks/{body['task_id']}"
    assert answer.headers["Location"] == body["status_url"]
    done = wait_until(lambda: (r := client.get(body["status_url"])).status_code == 200 and r)
    assert done.json["task_id"] == body["task_id"]
    assert done.json["used_previous_image"] is True
    assert client.get("/nanobanana/history/dave").json["last_image_url"] == done.json["image_url"]


def test_pending_text_format_gives_the_status_url(client):
    answer = generate(client, prompt="[delay=1] a cat", wait="0", format="text")
    assert answer.status_code == 202
    assert answer.headers["Location"] in answer.text


def test_status_url_honours_the_proxy(client):
    answer = client.get(
        "/nanobanana",
        query_string={"prompt": "[delay=1] a cat", "wait": "0"},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "banana.example.com"},
    )
    assert answer.json["status_url"].startswith("https://banana.example.com/nanobanana/tasks/")


def test_task_status_asks_upstream_at_most_once_per_interval(make_app, emulated):
    client = make_app(poll_interval=1.0).test_client()
    pending = generate(client, prompt="[delay=5] a cat", wait="0.3").json  # submitted; first poll due at 1 s
    for _ in range(5):
        assert client.get(f"/nanobanana/tasks/{pending['task_id']}").status_code == 202
    assert emulated.polls_of(pending["upstream_task_id"]) == 1


def test_a_status_read_with_wait_answers_the_moment_the_picture_is_ready(client):
    pending = generate(client, prompt="[delay=0.5] a cat", wait="0").json
    url = f"/nanobanana/tasks/{pending['task_id']}"
    assert client.get(url).status_code == 202  # at once, as ever, without wait
    answer = client.get(url, query_string={"wait": "20"})
    assert answer.status_code == 200 and answer.json["status"] == "success"
    assert answer.json["elapsed_seconds"] < 20  # it came when the picture did, not at the end of the wait
    assert client.get(url, query_string={"wait": "soon"}).status_code == 400


def test_failed_task_status_is_502(client):
    task_id = generate(client, prompt="[fail] [delay=0.1] a cat", wait="0").json["task_id"]
    answer = wait_until(lambda: (r := client.get(f"/nanobanana/tasks/{task_id}")).status_code != 202 and r)
    assert answer.status_code == 502 and answer.json["status"] == "failed"


def test_unknown_task_is_404(client):
    answer = client.get("/nanobanana/tasks/not-ours")
    assert answer.status_code == 404
    assert answer.json["error"]["code"] == "not_found"


# -- history, credits, health -------------------------------------------------------------


def test_history_of_unknown_user_is_empty(client):
    assert client.get("/nanobanana/history/nobody").json == {
        "user_id": "nobody",
        "last_image_url": None,
        "updated_at": None,
        "chain": [],
    }


def test_history_shows_time_and_delete_forgets(client):
    image = generate(client, prompt="a cat", user_id="erin").json["image_url"]
    history = client.get("/nanobanana/history/erin").json
    assert history["last_image_url"] == image
    assert history["updated_at"].endswith("Z") and history["updated_at"][:4].isdigit()
    for _ in range(2):  # idempotent
        answer = client.delete("/nanobanana/history/erin")
        assert answer.status_code == 200 and answer.json == {"user_id": "erin", "cleared": True}
    assert client.get("/nanobanana/history/erin").json["last_image_url"] is None
    assert generate(client, prompt="a dog", user_id="erin").json["mode"] == "text-to-image"


def test_credits_by_key_number_never_the_key(client, emulated):
    answer = client.get("/nanobanana/credits")
    assert answer.json == {
        "keys": [{"key": 1, "credits": 100.0, "usable": True}, {"key": 2, "credits": 100.0, "usable": True}]
    }
    assert "key-one" not in answer.text


def test_healthz(client):
    assert client.get("/healthz").json == {
        "status": "ok",
        "configured": True,
        "api_keys": 2,
        "store": "sqlite",
        "store_ok": True,
        "demo": False,
    }


def test_healthz_says_demo_only_when_make_run_says_so(make_app):
    local_proxy = make_app(api_base="http://127.0.0.1:9000").test_client()  # a local address is no demo
    assert local_proxy.get("/healthz").json["demo"] is False
    demo = make_app(api_base="http://127.0.0.1:9000", demo=True).test_client()
    assert demo.get("/healthz").json["demo"] is True


def test_without_keys_generation_is_not_configured(make_app):
    client = make_app(api_keys=()).test_client()
    assert client.get("/healthz").json["configured"] is False
    answer = generate(client, prompt="a cat")
    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "not_configured"


# -- keys and upstream trouble ------------------------------------------------------------------


def test_key_out_of_credits_is_rotated_to_the_next(client, emulated):
    emulated.keys["key-one"] = 0
    body = generate(client, prompt="a cat").json
    assert body["status"] == "success"
    assert emulated.tasks[body["upstream_task_id"]].key == "key-two"
    assert client.get("/nanobanana/credits").json["keys"][0]["usable"] is False


def test_no_key_with_credits_is_503_with_retry_after(client, emulated):
    emulated.keys.update({"key-one": 0, "key-two": 0})
    answer = generate(client, prompt="a cat")
    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "upstream_unavailable"
    assert int(answer.headers["Retry-After"]) > 0


@pytest.mark.parametrize(
    "marker, status, code",
    [
        ("[submit-code=500]", 502, "upstream_error"),
        ("[submit-http=502]", 502, "upstream_error"),
        ("[submit-code=505]", 502, "upstream_error"),
        ("[submit-code=400]", 400, "invalid_request"),
    ],
)
def test_upstream_trouble_is_a_clear_error(client, marker, status, code):
    answer = generate(client, prompt=f"{marker} a cat")
    assert answer.status_code == status
    assert answer.json["status"] == "error" and answer.json["error"]["code"] == code
    assert "image service" in answer.json["error"]["message"]


def test_flaky_polls_still_deliver(client):
    assert generate(client, prompt="[flaky-polls=3] a cat").status_code == 200


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, mentions",
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 5001}, "5000"),
        ({"prompt": "x" * 20001, "model": "nano-banana-2"}, "20000"),
        ({"prompt": "a", "model": "banana-max"}, "model"),
        ({"prompt": "a", "image_url": "ftp://x.test/a.png"}, "image_url"),
        ({"prompt": "a", "image_url": "not a url"}, "image_url"),
        ({"prompt": "a", "image_url": ",".join(f"https://x.test/{n}" for n in range(11))}, "at most 10"),
        (
            {"prompt": "a", "model": "nano-banana-pro", "image_url": ",".join(f"https://x.test/{n}" for n in range(9))},
            "at most 8",
        ),
        (
            {"prompt": "a", "model": "nano-banana-2", "image_url": ",".join(f"https://x.test/{n}" for n in range(15))},
            "at most 14",
        ),
        ({"prompt": "a", "resolution": "2K"}, "resolution"),
        ({"prompt": "a", "model": "nano-banana-pro", "resolution": "8K"}, "resolution"),
        ({"prompt": "a", "aspect_ratio": "auto"}, "aspect_ratio"),
        ({"prompt": "a", "model": "nano-banana-pro", "aspect_ratio": "1:8"}, "aspect_ratio"),
        ({"prompt": "a", "num_images": "5"}, "num_images"),
        ({"prompt": "a", "num_images": "two"}, "num_images"),
        ({"prompt": "a", "num_images": "2", "model": "nano-banana-2"}, "num_images"),
        ({"prompt": "a", "reset": "maybe"}, "reset"),
        ({"prompt": "a", "wait": "-1"}, "wait"),
        ({"prompt": "a", "wait": "soon"}, "wait"),
        ({"prompt": "a", "wait": "nan"}, "wait"),
        ({"prompt": "a", "format": "xml"}, "format"),
        ({"prompt": "a", "user_id": "u" * 129}, "user_id"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(client, emulated, params, mentions):
    answer = generate(client, **params)
    assert answer.status_code == 400
    assert answer.json["status"] == "error"
    assert answer.json["error"]["code"] == "invalid_request"
    assert mentions in answer.json["error"]["message"]
    assert emulated.submissions() == []  # no credits spent on a bad request


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": {"text": "a cat"}}, "prompt"),
        ({"prompt": ["a cat", "a dog"]}, "prompt"),
        ({"prompt": True}, "prompt"),
        ({"prompt": "a cat", "model": 2}, "model"),
        ({"prompt": "a cat", "user_id": 42}, "user_id"),
        ({"prompt": "a cat", "num_images": "2"}, "num_images"),
        ({"prompt": "a cat", "num_images": 2.5}, "num_images"),
        ({"prompt": "a cat", "num_images": True}, "num_images"),
        ({"prompt": "a cat", "image_url": [1, 2]}, "image_url"),
        ({"prompt": "a cat", "image_url": {"url": "https://x.test/a.png"}}, "image_url"),
        ({"prompt": "a cat", "wait": [1]}, "wait"),
        ({"prompt": "a cat", "reset": 1}, "reset"),
    ],
)
def test_json_fields_of_the_wrong_type_are_400_naming_the_field(client, emulated, body, field):
    answer = client.post("/nanobanana", json=body)
    assert answer.status_code == 400 and answer.json["error"]["message"].startswith(field)
    assert emulated.submissions() == []


def test_json_fields_of_the_right_types_are_read(client, emulated):
    body = {"prompt": "a cat", "num_images": 2, "wait": 5, "reset": True, "image_url": ["https://x.test/a.png"]}
    answer = client.post("/nanobanana", json=body)
    assert answer.status_code == 200 and len(answer.json["image_urls"]) == 2


def test_a_lone_surrogate_is_400_not_a_crash(client, emulated):
    answer = client.post(
        "/nanobanana", data=b'{"prompt": "a cat \\ud800", "user_id": "u"}', content_type="application/json"
    )
    assert answer.status_code == 400 and answer.json["error"]["message"].startswith("prompt")
    assert emulated.submissions() == []


def test_json_that_does_not_parse_says_where(client):
    answer = client.post("/nanobanana", data=b'{"prompt": "a cat",}', content_type="application/json")
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json["error"]["message"] and "line 1, column" in answer.json["error"]["message"]


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's parser goes


@pytest.mark.parametrize("path", ["/nanobanana", "/nanobanana/callback"])
def test_json_nested_too_deeply_is_a_400_not_a_traceback(client, emulated, path):
    answer = client.post(path, data=DEEP_JSON, content_type="application/json")
    assert answer.status_code == 400 and answer.json["status"] == "error"
    assert emulated.submissions() == []


def test_a_body_of_another_kind_is_refused_with_what_to_send(client, emulated):
    answer = client.post("/nanobanana", data=b'{"prompt": "a cat"}', content_type="text/plain")
    assert answer.status_code == 400
    assert "text/plain" in answer.json["error"]["message"] and "application/json" in answer.json["error"]["message"]
    assert emulated.submissions() == []


def test_json_body_must_be_an_object(client):
    answer = client.post("/nanobanana", json=["a cat"])
    assert answer.status_code == 400 and "JSON object" in answer.json["error"]["message"]


def test_wait_above_the_window_is_clamped(client):
    assert generate(client, prompt="a cat", wait="9999").status_code == 200


# -- every error is JSON ------------------------------------------------------------------------


def test_unknown_path_is_json_404(client):
    answer = client.get("/nope")
    assert answer.status_code == 404 and answer.json["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(client):
    answer = client.put("/nanobanana")
    assert answer.status_code == 405
    assert answer.json["error"]["code"] == "method_not_allowed"
    assert "GET or POST" in answer.json["error"]["message"]


def test_body_over_one_mebibyte_is_413(client):
    answer = client.post("/nanobanana", data={"prompt": "x" * (1024 * 1024 + 1)})
    assert answer.status_code == 413 and answer.json["error"]["code"] == "too_large"


def test_unexpected_failure_is_json_500_without_a_trace(make_app):
    class BrokenStore(SqliteStore):
        def last_picture(self, conversation):
            raise RuntimeError("disk on fire at /srv/secret/path")

    client = make_app(store=BrokenStore(":memory:", 3600, 10)).test_client()
    answer = generate(client, prompt="a cat", user_id="alice")
    assert answer.status_code == 500
    assert answer.json["error"]["code"] == "internal_error"
    assert "disk on fire" not in answer.text and "Traceback" not in answer.text


# -- the upstream's callback route --------------------------------------------------------


def test_callback_with_a_body_that_is_not_json_is_400(client):
    answer = client.post("/nanobanana/callback", data=b"\xff not json", content_type="application/json")
    assert answer.status_code == 400
    assert answer.json["error"] == {
        "code": "invalid_request",
        "message": "A callback needs a JSON body with data.taskId.",
    }
    assert len(answer.headers["X-Request-ID"]) == 32


def test_callback_over_one_mebibyte_is_413(client):
    answer = client.post("/nanobanana/callback", data=b"x" * (1024 * 1024 + 1), content_type="application/json")
    assert answer.status_code == 413 and answer.json["error"]["code"] == "too_large"


def test_callback_route_takes_only_post(client):
    answer = client.get("/nanobanana/callback")
    assert answer.status_code == 405 and answer.json["error"]["code"] == "method_not_allowed"


def test_callback_is_counted_and_logged(client, caplog):
    with caplog.at_level("INFO", logger="nanobanana.requests"):
        client.post("/nanobanana/callback", json={"data": {"taskId": "stranger"}}, headers={"X-Request-ID": "cb-1"})
    assert any(
        "request_id=cb-1 method=POST path=/nanobanana/callback status=200" in r.getMessage() for r in caplog.records
    )
    assert 'route="/nanobanana/callback",status="200"' in client.get("/metrics").text


def test_callback_while_the_store_is_away_is_503(make_app):
    class AwayStore(SqliteStore):
        def task(self, task_id):
            raise StoreUnavailable("connection refused")

    client = make_app(store=AwayStore(":memory:", 3600, 10)).test_client()
    answer = client.post("/nanobanana/callback?secret=s", json={"data": {"taskId": "t"}})
    assert answer.status_code == 503 and answer.json["error"]["code"] == "store_unavailable"


def test_with_a_public_address_no_made_up_host_is_echoed(make_app, emulated):
    client = make_app(public_base_url="https://banana.example.com").test_client()
    made_up = {"Host": "evil.test"}
    pending = client.get("/nanobanana", query_string={"prompt": "[delay=5] a cat", "wait": "0"}, headers=made_up)
    assert pending.json["status_url"].startswith("https://banana.example.com/nanobanana/tasks/")
    assert pending.headers["Location"] == pending.json["status_url"]
    servers = client.get("/openapi.json", headers=made_up).json["servers"]
    assert [server["url"] for server in servers] == ["https://banana.example.com"]


def test_a_store_that_reads_but_cannot_write_is_unhealthy_yet_answers_reads(make_app, emulated, tmp_path):
    """A full disk: reads still work, writes fail. Health says so, and a status read needs no write."""
    app = make_app(database_path=str(tmp_path / "full.sqlite3"), poll_max_attempts=3000)
    client = app.test_client()
    pending = generate(client, prompt="[delay=30] a slow cat", wait="0").json
    wait_until(lambda: client.get(pending["status_url"]).json["upstream_task_id"], timeout=5)
    store = app.extensions["nanobanana"].store
    with store.database.reading() as db:  # the disk fills up: SQLite can still read, but no longer write
        db.execute("PRAGMA query_only = ON")
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json["store_ok"] is False
    status = client.get(pending["status_url"])
    assert status.status_code == 202 and status.json["status"] == "pending"
    refused = generate(client, prompt="a cat", wait="0")
    assert refused.status_code == 503 and refused.json["error"]["code"] == "store_unavailable"
    with store.database.reading() as db:
        db.execute("PRAGMA query_only = OFF")
    assert client.get("/healthz").json["store_ok"] is True
