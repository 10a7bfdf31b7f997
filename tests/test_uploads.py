"""POST /nanobanana/uploads (CONTRACT §14): a picture from the caller's device, kept where the upstream can fetch it."""

from __future__ import annotations

import io
import os

import pytest
import requests

from domain.media import LocalMedia
from domain.uploads import Uploads
from tests.helpers import png, served_environ
from tools.processes import Service, free_port

PUBLIC = "https://pictures.example"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(200)
GIF = b"GIF89a" + bytes(200)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>'


@pytest.fixture
def uploading(make_app, tmp_path):
    """An app whose uploads land in a local folder served at PUBLIC (PUBLIC_BASE_URL)."""
    app = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "media"))
    return app.test_client()


def upload_form(client, content: bytes, filename: str = "photo.png", **query):
    return client.post("/nanobanana/uploads", query_string=query, data={"file": (io.BytesIO(content), filename)})


def served(client, url: str):
    """The file at `url`, as the service serves it (closed after reading)."""
    with client.get(url.removeprefix(PUBLIC)) as answer:
        answer.get_data()
        return answer


def test_a_photo_sent_as_a_form_is_kept_and_served(uploading):
    picture = png()
    answer = upload_form(uploading, picture)
    assert answer.status_code == 201
    body = answer.json
    assert body["url"].startswith(f"{PUBLIC}/media/") and body["url"].endswith(".png")
    assert body["content_type"] == "image/png" and body["bytes"] == len(picture)
    assert answer.headers["Location"] == body["url"]
    file = served(uploading, body["url"])
    assert file.status_code == 200 and file.data == picture and file.mimetype == "image/png"


@pytest.mark.parametrize(
    ("content", "kind"), [(JPEG, "image/jpeg"), (WEBP, "image/webp"), (GIF, "image/gif"), (png(), "image/png")]
)
def test_a_raw_body_is_known_by_its_bytes_not_its_declared_type(uploading, content, kind):
    answer = uploading.post("/nanobanana/uploads", data=content, content_type="image/png")
    assert answer.status_code == 201
    assert answer.json["content_type"] == kind and answer.json["bytes"] == len(content)
    assert served(uploading, answer.json["url"]).data == content


@pytest.mark.parametrize("content", [SVG, b"%PDF-1.7\n" + bytes(100), b"just some words"])
def test_what_is_not_a_photo_is_refused_with_415(uploading, content, tmp_path):
    answer = upload_form(uploading, content, filename="looks-like.png")
    assert answer.status_code == 415
    assert (
        answer.json["error"]["code"] == "not_a_picture" and "PNG, JPEG, WebP or GIF" in answer.json["error"]["message"]
    )
    assert not os.path.exists(tmp_path / "media") or not os.listdir(tmp_path / "media")


def test_a_body_of_another_kind_is_told_how_to_send_a_photo(uploading):
    answer = uploading.post("/nanobanana/uploads", json={"image": "base64..."})
    assert answer.status_code == 415 and 'form field "file"' in answer.json["error"]["message"]


def test_an_empty_photo_or_a_form_without_file_is_a_400(uploading):
    assert upload_form(uploading, b"").status_code == 400
    answer = uploading.post("/nanobanana/uploads", data={"picture": (io.BytesIO(png()), "a.png")})
    assert answer.status_code == 400 and 'no field "file"' in answer.json["error"]["message"]


def test_a_photo_over_the_limit_is_a_413_that_names_the_limit(make_app, tmp_path):
    client = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "media"), upload_max_bytes=2048).test_client()
    assert upload_form(client, png(16, 16)).status_code == 201  # well under 2 KB compressed
    too_big = png() + bytes(2048)
    for answer in (
        upload_form(client, too_big),
        client.post("/nanobanana/uploads", data=too_big, content_type="image/png"),
    ):
        assert answer.status_code == 413
        assert answer.json["error"]["message"] == "The picture is larger than 2 KiB. Please send a smaller one."


def test_without_an_address_the_upstream_can_reach_uploads_are_a_503_naming_the_setting(make_app, tmp_path):
    client = make_app(media_dir=str(tmp_path / "media")).test_client()  # no PUBLIC_BASE_URL, no MEDIA_STORE
    answer = upload_form(client, png())
    assert answer.status_code == 503 and answer.json["error"]["code"] == "uploads_unavailable"
    assert "PUBLIC_BASE_URL" in answer.json["error"]["message"] and "MEDIA_STORE" in answer.json["error"]["message"]
    assert not os.path.exists(tmp_path / "media") or not os.listdir(tmp_path / "media")


def test_uploads_need_the_access_token_like_generation(make_app, tmp_path):
    client = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "m"), access_tokens=("t",)).test_client()
    assert upload_form(client, png()).status_code == 401
    answer = client.post(
        "/nanobanana/uploads", data=png(), content_type="image/png", headers={"Authorization": "Bearer t"}
    )
    assert answer.status_code == 201


def test_uploads_and_generations_count_against_one_rate_limit(make_app, tmp_path):
    client = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "m"), rate_limit="2/minute").test_client()
    assert upload_form(client, png(), user_id="ann").status_code == 201
    assert client.get("/nanobanana", query_string={"prompt": "a cat", "user_id": "ann"}).status_code == 200
    refused = upload_form(client, png(), user_id="ann")
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert upload_form(client, png(), user_id="bob").status_code == 201  # each person has their own


def test_a_new_user_id_for_each_upload_gains_nothing(make_app, tmp_path):
    client = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "m"), rate_limit="2/minute").test_client()
    assert [upload_form(client, png(), user_id=f"u{n}").status_code for n in range(3)] == [201, 201, 429]


def test_refused_uploads_do_not_count_against_the_limit(make_app, tmp_path):
    client = make_app(media_dir=str(tmp_path / "m"), rate_limit="2/minute").test_client()  # uploads cannot work
    assert [upload_form(client, png(), user_id="dee").status_code for _ in range(3)] == [503] * 3
    assert client.get("/nanobanana", query_string={"prompt": "a cat", "user_id": "dee"}).status_code == 200


def test_an_upload_is_the_picture_an_edit_starts_from(make_app, tmp_path, emulated):
    client = make_app(public_base_url=PUBLIC, media_dir=str(tmp_path / "media")).test_client()
    url = upload_form(client, png()).json["url"]
    answer = client.get("/nanobanana", query_string={"prompt": "make it blue", "image_url": url, "user_id": "cy"})
    assert answer.status_code == 200 and answer.json["source_image_urls"] == [url]
    assert emulated.tasks[answer.json["upstream_task_id"]].params["imageUrls"] == [url]


# -- how long an upload is kept ----------------------------------------------------------------------------------


@pytest.fixture
def kept(store, clock, tmp_path):
    media = LocalMedia(str(tmp_path / "media"), PUBLIC, reachable=True)
    return Uploads(store, media, lifetime=3600, clock=clock), store, clock, media


def test_a_purge_takes_a_batch_of_expired_uploads_the_earliest_first(store, clock):
    for n in range(5):
        store.keep_upload(f"{PUBLIC}/media/{n}.png", clock.now + n)
    clock.now += 10
    assert set(store.expired_uploads(clock.now, 3)) == {f"{PUBLIC}/media/{n}.png" for n in range(3)}
    assert set(store.expired_uploads(clock.now, 3)) == {f"{PUBLIC}/media/{n}.png" for n in (3, 4)}


def test_an_unused_upload_is_removed_when_its_time_runs_out(kept):
    uploads, store, clock, media = kept
    upload = uploads.take(io.BytesIO(png()), len(png()))
    path = media.path(upload.url.rsplit("/", 1)[1])
    clock.now += 3599
    assert store.expired_uploads(clock.now, 100) == []
    clock.now += 2
    expired = store.expired_uploads(clock.now, 100)
    assert expired == [upload.url] and store.expired_uploads(clock.now, 100) == []  # named once
    uploads.drop(expired)
    assert not os.path.exists(path)


def test_each_use_keeps_an_upload_longer_and_a_lasting_copy_is_never_taken_for_one(kept):
    uploads, store, clock, _ = kept
    upload = uploads.take(io.BytesIO(GIF), len(GIF))
    clock.now += 3000
    uploads.used([upload.url, f"{PUBLIC}/media/{'c' * 32}.png", "https://elsewhere.example/x.png"])
    clock.now += 3000
    assert store.expired_uploads(clock.now, 100) == []
    clock.now += 601
    assert store.expired_uploads(clock.now, 100) == [upload.url]  # the copy and the stranger's address were never kept


# -- over real HTTP, under gunicorn ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(served_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    port = free_port()
    environ = served_environ(
        served_upstream, MEDIA_DIR=str(folder / "media"), PUBLIC_BASE_URL=f"http://127.0.0.1:{port}"
    )
    running = Service(environ, folder / "service.log", port=port).wait_ready()
    yield running
    running.stop()


@pytest.mark.slow
def test_a_photo_of_several_megabytes_passes_where_other_bodies_stop_at_one(service):
    photo = png() + bytes(3 * 1024 * 1024)  # a PNG with room after its end: 3 MB, like a phone's photo
    answer = requests.post(f"{service.url}/nanobanana/uploads", files={"file": ("IMG_0001.png", photo)}, timeout=30)
    assert answer.status_code == 201, answer.text
    assert requests.get(answer.json()["url"], timeout=10).content == photo
    too_long = requests.post(f"{service.url}/nanobanana", json={"prompt": "x" * (2 * 1024 * 1024)}, timeout=30)
    assert too_long.status_code == 413


@pytest.mark.slow
def test_a_chunked_photo_over_the_limit_is_a_413_in_json(service):
    def chunks():
        yield png()
        for _ in range(11):
            yield bytes(1024 * 1024)

    answer = requests.post(
        f"{service.url}/nanobanana/uploads", data=chunks(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert answer.status_code == 413 and answer.json()["error"]["message"].startswith(
        "The picture is larger than 10 MB"
    )
