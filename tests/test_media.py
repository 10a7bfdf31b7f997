"""Lasting copies of pictures: a local folder over real HTTP, a real S3-compatible server, and the limits."""

from __future__ import annotations

import json
import os
import secrets
import time

import pytest
import requests
import responses
from flask import Flask, Response
from moto.server import ThreadedMotoServer

from domain.media import MAX_BYTES, LocalMedia
from tests.helpers import served_environ
from tools.processes import Service, serving, wait_until

# -- MEDIA_STORE=local, over real HTTP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def local(served_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    environ = served_environ(served_upstream, MEDIA_STORE="local", MEDIA_DIR=str(folder / "copies"))
    running = Service(environ, folder / "service.log").wait_ready()
    running.folder = folder / "copies"
    yield running
    running.stop()


@pytest.mark.slow
def test_a_local_copy_outlives_the_upstreams_file(local):
    answer = local.get("/nanobanana", params={"prompt": "[file-lifetime=1] a lasting cat", "user_id": "keeper"})
    body = answer.json()
    assert body["image_url"].startswith(f"{local.url}/media/") and body["image_url"] != body["upstream_image_url"]
    original = requests.get(body["upstream_image_url"], timeout=5)
    copy = requests.get(body["image_url"], timeout=5)
    assert copy.content == original.content and copy.headers["Content-Type"].startswith("image/svg+xml")
    assert "max-age=31536000" in copy.headers["Cache-Control"] and "immutable" in copy.headers["Cache-Control"]
    assert "sandbox" in copy.headers["Content-Security-Policy"]
    wait_until(lambda: requests.get(body["upstream_image_url"], timeout=5).status_code == 404, timeout=5)
    assert requests.get(body["image_url"], timeout=5).content == original.content
    history = local.get("/nanobanana/history/keeper").json()
    assert history["last_image_url"] == history["chain"][0]["image_url"] == body["image_url"]


@pytest.mark.slow
def test_without_a_public_address_edits_send_the_upstream_its_own_file(local, served_upstream):
    first = local.get("/nanobanana", params={"prompt": "a cat", "user_id": "editor"}).json()
    edit = local.get("/nanobanana", params={"prompt": "make it blue", "user_id": "editor"}).json()
    assert edit["source_image_urls"] == [first["upstream_image_url"]]
    assert served_upstream.tasks[edit["upstream_task_id"]].params["imageUrls"] == [first["upstream_image_url"]]


@pytest.mark.slow
def test_delete_removes_the_users_copies(local):
    body = local.get("/nanobanana", params={"prompt": "a short-lived cat", "user_id": "leaver"}).json()
    name = body["image_url"].rsplit("/", 1)[1]
    assert (local.folder / name).exists()
    requests.delete(f"{local.url}/nanobanana/history/leaver", timeout=5)
    assert not (local.folder / name).exists()
    assert requests.get(body["image_url"], timeout=5).status_code == 404


@pytest.mark.slow
def test_a_file_that_is_not_a_picture_leaves_the_upstreams_address(local):
    body = local.get("/nanobanana", params={"prompt": "[file-type=text/html] a cat"}).json()
    assert body["status"] == "success" and body["image_url"] == body["upstream_image_url"]


@pytest.mark.slow
def test_names_of_copies_cannot_be_guessed_or_escape_the_folder(local):
    for name in ("..%2Fservice.log", "service.log", "a" * 32 + ".svg"):
        assert requests.get(f"{local.url}/media/{name}", timeout=5).status_code == 404


# -- MEDIA_STORE=s3://…, against a real S3-compatible server ------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    s3.create_bucket(Bucket="pictures")
    public_read = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::pictures/*"}
    s3.put_bucket_policy(Bucket="pictures", Policy=json.dumps({"Version": "2012-10-17", "Statement": [public_read]}))
    yield endpoint, s3
    server.stop()


@pytest.mark.slow
def test_s3_copies_keep_the_upstreams_bytes_and_go_with_the_user(served_upstream, s3_server, tmp_path):
    endpoint, s3 = s3_server
    environ = served_environ(
        served_upstream,
        MEDIA_STORE="s3://pictures/nanobanana",
        S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
    running = Service(environ, tmp_path / "s3.log").wait_ready()
    try:
        body = running.get("/nanobanana", params={"prompt": "a cat in a bucket", "user_id": "bucketeer"}).json()
        assert body["image_url"].startswith(f"{endpoint}/pictures/nanobanana/")
        copy = requests.get(body["image_url"], timeout=5)
        assert copy.content == requests.get(body["upstream_image_url"], timeout=5).content
        assert copy.headers["Content-Type"] == "image/svg+xml"
        key = body["image_url"].removeprefix(f"{endpoint}/pictures/")
        assert s3.head_object(Bucket="pictures", Key=key)["CacheControl"].endswith("immutable")
        requests.delete(f"{running.url}/nanobanana/history/bucketeer", timeout=5)
        assert requests.get(body["image_url"], timeout=5).status_code == 404
    finally:
        running.stop()


# -- the limits of a copy -------------------------------------------------------------------------------------


@pytest.fixture
def folder_media(tmp_path):
    return LocalMedia(str(tmp_path / "copies"), "http://service.test", reachable=False, upstream="https://files.test")


@responses.activate
@pytest.mark.parametrize(
    "answer",
    [
        {"body": b"<html>nope</html>", "content_type": "text/html"},
        {"body": b"x", "content_type": "image/png", "headers": {"Content-Length": str(MAX_BYTES + 1)}},
        {"body": b"x" * (MAX_BYTES + 1), "content_type": "image/png"},
        {"body": b"gone", "status": 404, "content_type": "text/plain"},
        {"body": b"\x00" * 90, "content_type": "image/jpeg"},  # says it is a picture, and is not one
        {"body": b"<html><body>not a picture</body></html>", "content_type": "image/svg+xml"},
    ],
)
def test_what_is_not_a_picture_of_at_most_30_mb_is_not_kept(folder_media, tmp_path, answer):
    responses.add(responses.GET, "https://files.test/p.png", **answer)
    assert folder_media.keep("https://files.test/p.png") is None
    assert not (tmp_path / "copies").exists() or not [n for n in os.listdir(tmp_path / "copies") if n[0] != "."]


@responses.activate
def test_a_kept_picture_has_a_name_nobody_can_guess(folder_media, tmp_path):
    picture = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(1000)
    responses.add(responses.GET, "https://files.test/p.png", body=picture, content_type="image/png")
    first, second = folder_media.keep("https://files.test/p.png"), folder_media.keep("https://files.test/p.png")
    assert first != second and first.startswith("http://service.test/media/") and first.endswith(".png")
    assert (tmp_path / "copies" / first.rsplit("/", 1)[1]).read_bytes() == picture


class Secret:
    """Something inside, on this machine: a picture nobody outside may see, and who asked for it."""

    def __init__(self):
        self.asked = 0
        self.app = Flask("secret")
        self.app.add_url_rule("/secret.svg", view_func=self.serve)

    def serve(self):
        self.asked += 1
        return Response("<svg xmlns='http://www.w3.org/2000/svg'><text>secret</text></svg>", mimetype="image/svg+xml")


@pytest.fixture(scope="module")
def secret():
    inside = Secret()
    with serving(inside.app) as url:
        inside.url = url
        yield inside


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["result-url", "file-redirect"])
def test_a_picture_address_that_leads_inside_is_not_copied(local, secret, marker):
    """The result (or a redirect from the upstream's file) points at an address inside: no copy is made of it,
    and nothing inside is asked for it."""
    answer = local.get("/nanobanana", params={"prompt": f"[{marker}={secret.url}/secret.svg] a cat"})
    assert answer.status_code == 200
    assert "/media/" not in answer.json()["image_url"]
    assert secret.asked == 0
    copies = [(local.folder / name).read_bytes() for name in os.listdir(local.folder)]
    assert not [copy for copy in copies if b"<text>secret</text>" in copy]  # not republished at /media/


def test_a_picture_sent_a_byte_at_a_time_is_given_up_at_the_deadline(tmp_path, monkeypatch):
    """Each read arrives well within the read time-out, yet the copy as a whole has one deadline."""
    dripping = Flask("drip")

    @dripping.get("/slow.png")
    def slow():
        def drip():
            yield b"\\x89PNG\\r\\n\\x1a\\n"
            for _ in range(30):
                time.sleep(0.2)
                yield b"x"

        return Response(drip(), mimetype="image/png")

    monkeypatch.setattr("domain.media.FETCH_DEADLINE", 1.0)
    with serving(dripping) as url:
        media = LocalMedia(str(tmp_path / "copies"), "http://service.test", reachable=False, upstream=url)
        started = time.monotonic()
        assert media.keep(f"{url}/slow.png") is None
        assert time.monotonic() - started < 4  # not the six seconds the drip would take


def test_a_slow_picture_is_copied_once_and_holds_up_no_status_read(serve_app, served_upstream, tmp_path):
    service = serve_app(public=True, media_store="local", media_dir=str(tmp_path / "copies"))
    pending = service.get("/nanobanana", params={"prompt": "[file-delay=3] a slow picture", "wait": "0"}).json()
    slowest, answer = 0.0, None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        started = time.monotonic()
        answer = requests.get(pending["status_url"], timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        if answer.status_code != 202:
            break
        time.sleep(0.2)
    assert answer.status_code == 200 and "/media/" in answer.json()["image_url"]
    assert slowest < 2  # each read answered at once, though the copy took 3 s
    upstream_id = answer.json()["upstream_task_id"]
    assert served_upstream.files_served[upstream_id] == 1  # one copy, however many asked
