"""The Telegram bot over real HTTP: updates posted to the service (served in this process; under gunicorn for
the restart), a fake Bot API that records every call (and serves getFile and the file itself), and the
emulator as the upstream."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time

import pytest
import requests
from flask import Flask, Response, request

import channels.telegram
from channels.chat import IN_LINE, LIMITED
from channels.telegram import CAPTION_LIMIT, HELP, NEEDS_MEDIA, PHOTO_NOT_FETCHED
from tests.helpers import served_environ
from tools.processes import Service, free_port, serving, wait_until

TOKEN = "123456:TEST-bot-token-never-to-be-seen"
SECRET = "telegram-webhook-secret"
PHOTO = b"\xff\xd8\xff\xe0 a photo sent to the bot \xff\xd9"
update_ids = itertools.count(1000)
chat_ids = itertools.count(7000)


class FakeBotApi:
    """The Bot API as the tests need it: every call recorded; getFile and the file route served."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.app = Flask("bot-api")
        self.app.add_url_rule("/bot<token>/<method>", view_func=self.method, methods=["POST"])
        self.app.add_url_rule("/file/bot<token>/<path:path>", view_func=self.file)

    def method(self, token: str, method: str):
        if token != TOKEN:
            return {"ok": False, "error_code": 401, "description": "Unauthorized"}, 401
        body = request.get_json()
        with self.lock:
            self.calls.append((method, body))
        if method == "getFile":
            path = "photos/slow.jpg" if body["file_id"] == "slow" else "photos/file_1.jpg"
            return {"ok": True, "result": {"file_id": body["file_id"], "file_path": path}}
        return {"ok": True, "result": {"message_id": 1}}

    def file(self, token: str, path: str):
        if token == TOKEN and path == "photos/slow.jpg":
            return Response(drip(PHOTO * 100), content_type="application/octet-stream")
        if token != TOKEN or path != "photos/file_1.jpg":
            return Response("not found", 404)
        return Response(PHOTO, content_type="application/octet-stream")

    def to_chat(self, chat_id: int, method: str | None = None) -> list[tuple[str, dict]]:
        with self.lock:
            return [(m, body) for m, body in self.calls if body.get("chat_id") == chat_id and m == (method or m)]


def drip(content: bytes):
    """A byte every 0.1 s, until the reader goes away."""
    for byte in content:
        yield bytes([byte])
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bot_api():
    fake = FakeBotApi()
    with serving(fake.app) as url:
        fake.url = url
        yield fake


def bot_settings(bot_api) -> dict:
    return {
        "telegram_bot_token": TOKEN,
        "telegram_webhook_secret": SECRET,
        "telegram_api_base": bot_api.url,
        "webhook_retry_delays": (0.5, 0.5),
    }


@pytest.fixture
def service(serve_app, bot_api, tmp_path, caplog):
    served = serve_app(public=True, media_store="local", media_dir=str(tmp_path / "m"), **bot_settings(bot_api))
    yield served
    ours = [record.getMessage() for record in caplog.records if record.name != "werkzeug"]  # not the fake Bot API's
    assert not [line for line in ours if TOKEN.split(":")[1] in line], "the bot token reached the log"


def send(service: Service, chat_id: int, text: str | None = None, photo=False, update_id=None, secret=SECRET):
    """A message from the chat; `photo=True` (or the largest size's file id) sends a photo."""
    message = {"message_id": next(update_ids), "chat": {"id": chat_id, "type": "private"}, "date": 0}
    if photo:
        largest = "big" if photo is True else photo
        message["photo"] = [{"file_id": "small", "width": 90}, {"file_id": largest, "width": 1280}]
        if text:
            message["caption"] = text
    else:
        message["text"] = text
    update = {"update_id": update_id or next(update_ids), "message": message}
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
    answer = requests.post(f"{service.url}/telegram/webhook", json=update, headers=headers, timeout=10)
    return answer, message["message_id"]


def photos(bot_api, chat_id: int, count: int, timeout: float = 15) -> list[dict]:
    """The photos sent to the chat, once there are at least `count`."""
    sent = wait_until(lambda: len(found := bot_api.to_chat(chat_id, "sendPhoto")) >= count and found, timeout)
    return [body for _, body in sent]


def messages(bot_api, chat_id: int, count: int = 1) -> list[str]:
    sent = wait_until(lambda: len(found := bot_api.to_chat(chat_id, "sendMessage")) >= count and found, timeout=15)
    return [body["text"] for _, body in sent]


def task_with(served_upstream, words: str):
    with served_upstream.lock:
        return next(task for task in served_upstream.tasks.values() if words in task.params["prompt"])


def test_start_up_sets_the_webhook_with_its_secret(service, bot_api):
    (_, call), *_ = wait_until(lambda: [c for c in bot_api.calls if c[0] == "setWebhook"], timeout=10)
    assert call["url"] == f"{service.url}/telegram/webhook" and call["secret_token"] == SECRET


@pytest.mark.parametrize("secret", [None, "wrong", "telegram-webhook-secreT"])
def test_an_update_without_the_secret_is_401_and_nothing_happens(service, bot_api, served_upstream, secret):
    chat_id = next(chat_ids)
    answer, _ = send(service, chat_id, "a forged cat", secret=secret)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
    assert "WWW-Authenticate" not in answer.headers  # no token would help: only Telegram knows the secret
    answer, _ = send(service, chat_id, "/help")  # a genuine update after it is handled: the forged one was not
    messages(bot_api, chat_id)
    assert bot_api.to_chat(chat_id, "sendChatAction") == []
    assert not [t for t in served_upstream.tasks.values() if "a forged cat" in t.params["prompt"]]


def test_a_message_makes_a_picture_and_the_next_one_edits_it(service, bot_api, served_upstream):
    chat_id = next(chat_ids)
    answer, first_message = send(service, chat_id, "a cat on a sofa")
    assert answer.status_code == 200 and answer.json() == {"ok": True}
    [first] = photos(bot_api, chat_id, 1)
    assert first["caption"] == "a cat on a sofa" and first["reply_parameters"]["message_id"] == first_message
    assert first["photo"].startswith(f"{service.url}/media/")  # the lasting copy
    assert bot_api.to_chat(chat_id, "sendChatAction")[0][1]["action"] == "upload_photo"

    _, second_message = send(service, chat_id, "make it blue")
    second = photos(bot_api, chat_id, 2)[1]
    assert second["caption"] == "make it blue" and second["reply_parameters"]["message_id"] == second_message
    assert task_with(served_upstream, "make it blue").params["imageUrls"] == [first["photo"]]


def test_a_photo_with_a_caption_is_edited_without_the_token_leaving(service, bot_api, served_upstream):
    chat_id = next(chat_ids)
    send(service, chat_id, "put a hat on her", photo=True)
    [edited] = photos(bot_api, chat_id, 1)
    assert edited["caption"] == "put a hat on her"
    assert bot_api.to_chat(chat_id) and [body["file_id"] for m, body in bot_api.calls if m == "getFile"][-1] == "big"
    [source] = task_with(served_upstream, "put a hat on her").params["imageUrls"]
    assert source.startswith(f"{service.url}/media/") and requests.get(source, timeout=5).content == PHOTO
    assert not [t for t in served_upstream.tasks.values() if TOKEN in str(t.params)]


def test_a_photo_that_comes_too_slowly_is_given_up_and_said(service, bot_api, served_upstream, monkeypatch):
    monkeypatch.setattr(channels.telegram, "PHOTO_DEADLINE", 1.0)
    chat_id = next(chat_ids)
    send(service, chat_id, "put a hat on the slow one", photo="slow")
    assert messages(bot_api, chat_id) == [PHOTO_NOT_FETCHED]
    assert not [t for t in served_upstream.tasks.values() if "the slow one" in t.params["prompt"]]


def test_new_starts_over_and_undo_steps_back(service, bot_api, served_upstream):
    chat_id = next(chat_ids)
    send(service, chat_id, "a red boat")
    first = photos(bot_api, chat_id, 1)[0]["photo"]
    send(service, chat_id, "make it a ship")
    photos(bot_api, chat_id, 2)
    send(service, chat_id, "/undo")
    back = photos(bot_api, chat_id, 3)[2]
    assert back["photo"] == first and "Back to this one" in back["caption"]
    send(service, chat_id, "add a sail")
    photos(bot_api, chat_id, 4)
    assert task_with(served_upstream, "add a sail").params["imageUrls"] == [first]
    send(service, chat_id, "/new")
    assert "Starting over" in messages(bot_api, chat_id)[0]
    send(service, chat_id, "a green tree")
    photos(bot_api, chat_id, 5)
    assert task_with(served_upstream, "a green tree").params["type"] == "TEXTTOIAMGE"


def test_a_repeated_update_is_handled_once(service, bot_api, served_upstream):
    chat_id, update_id = next(chat_ids), next(update_ids)
    for _ in range(3):
        assert send(service, chat_id, "a twice-sent fox", update_id=update_id)[0].status_code == 200
    photos(bot_api, chat_id, 1)
    assert len([t for t in served_upstream.tasks.values() if "a twice-sent fox" in t.params["prompt"]]) == 1


def test_help_failures_and_long_captions(service, bot_api):
    chat_id = next(chat_ids)
    send(service, chat_id, "/start")
    assert messages(bot_api, chat_id) == [HELP]
    _, asked = send(service, chat_id, "[fail] a cat")
    failure = wait_until(lambda: len(found := bot_api.to_chat(chat_id, "sendMessage")) == 2 and found[1][1])
    assert "could not be made" in failure["text"] and failure["reply_parameters"]["message_id"] == asked
    send(service, chat_id, "a very long wish " * 200)
    assert len(photos(bot_api, chat_id, 1)[0]["caption"]) == CAPTION_LIMIT


def test_without_a_media_store_photos_are_declined_and_chats_are_rate_limited(serve_app, bot_api):
    strict = serve_app(public=True, rate_limit="2/minute", **bot_settings(bot_api))
    chat_id = next(chat_ids)
    send(strict, chat_id, "put a hat on him", photo=True)
    assert messages(bot_api, chat_id) == [NEEDS_MEDIA]
    for n in range(3):
        send(strict, chat_id, f"limited picture {n}")
    assert LIMITED in messages(bot_api, chat_id, 2)
    photos(bot_api, chat_id, 2)


def start(served_upstream, bot_api, log_path, port=None, **extra) -> Service:
    port = port or free_port()
    environ = {
        **served_environ(served_upstream),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_WEBHOOK_SECRET": SECRET,
        "TELEGRAM_API_BASE": bot_api.url,
        "WEBHOOK_RETRY_DELAYS": "0.5,0.5",
        **extra,
    }
    return Service(environ, log_path, port=port).wait_ready()


@pytest.mark.slow
def test_a_restart_in_the_middle_of_a_generation_still_sends_the_picture(served_upstream, bot_api, tmp_path):
    environ = {"DATABASE_PATH": str(tmp_path / "db.sqlite3")}
    first = start(served_upstream, bot_api, tmp_path / "first.log", **environ)
    chat_id = next(chat_ids)
    send(first, chat_id, "[delay=3] a slow turtle")
    turtle = wait_until(lambda: task_with_or_none(served_upstream, "a slow turtle"), timeout=10)
    wait_until(
        lambda: in_the_ledger(environ["DATABASE_PATH"], turtle.task_id)
    )  # bot tasks are not HTTP callers' to see
    first.kill()
    second = start(served_upstream, bot_api, tmp_path / "second.log", port=first.port, **environ)
    try:
        [photo] = photos(bot_api, chat_id, 1, timeout=30)
        assert photo["caption"] == "[delay=3] a slow turtle"
    finally:
        output = second.stop() + (tmp_path / "first.log").read_text()
    assert TOKEN.split(":")[1] not in output, "the bot token reached the log"


def in_the_ledger(database: str, upstream_task_id: str) -> bool:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT 1 FROM tasks WHERE upstream_task_id = ?", (upstream_task_id,)).fetchone() is not None


def task_with_or_none(served_upstream, words: str):
    try:
        return task_with(served_upstream, words)
    except StopIteration:
        return None


def test_a_picture_waiting_its_turn_says_where_it_is_in_line_then_comes(serve_app, bot_api, tmp_path):
    paced = serve_app(public=True, upstream_rate=(1, 4.0), **bot_settings(bot_api))
    first_chat, second_chat = next(chat_ids), next(chat_ids)
    send(paced, first_chat, "the first picture")
    photos(bot_api, first_chat, 1)
    send(paced, second_chat, "a picture that waits its turn")
    assert messages(bot_api, second_chat) == [IN_LINE.format(place="1st")]
    assert photos(bot_api, second_chat, 1)[0]["caption"] == "a picture that waits its turn"
    assert bot_api.to_chat(first_chat, "sendMessage") == []  # no line, nothing said


def test_a_full_queue_is_said_to_the_chat_and_nothing_is_made(serve_app, bot_api, served_upstream):
    full = serve_app(public=True, upstream_rate=(1, 60.0), queue_max=1, **bot_settings(bot_api))
    first, second, third = next(chat_ids), next(chat_ids), next(chat_ids)
    send(full, first, "takes the only turn")
    photos(bot_api, first, 1)
    send(full, second, "waits in line")
    messages(bot_api, second)  # "… in line"
    send(full, third, "one too many")
    assert "So many pictures are waiting" in messages(bot_api, third)[0]
    assert not [t for t in served_upstream.tasks.values() if t.params["prompt"] in ("waits in line", "one too many")]


def test_a_chats_conversation_cannot_be_reached_over_http(service, bot_api, served_upstream):
    """Without ACCESS_TOKENS too: no user_id spells a chat's conversation, to read, plant or forget a picture."""
    chat_id = next(chat_ids)
    send(service, chat_id, "a chat's own cat")
    [own] = photos(bot_api, chat_id, 1)
    spelled = f"telegram/telegram:{chat_id}"
    assert service.get(f"/nanobanana/history/{spelled}").json()["chain"] == []
    planted = service.get("/nanobanana", params={"prompt": "a planted dog", "user_id": spelled}).json()
    assert planted["status"] == "success"
    assert requests.delete(f"{service.url}/nanobanana/history/{spelled}", timeout=10).status_code == 200
    send(service, chat_id, f"make chat {chat_id}'s cat blue")
    photos(bot_api, chat_id, 2)
    assert task_with(served_upstream, f"make chat {chat_id}'s").params["imageUrls"] == [own["photo"]]  # its own cat
    marked = f"\x1ftelegram/telegram:{chat_id}"  # the mark itself is blank space at the edges, and inside refused
    assert service.get("/nanobanana/history/" + marked).json()["chain"] == []
    answer = service.get("/nanobanana", params={"prompt": "a cat", "user_id": "x" + marked})
    assert answer.status_code == 400 and "printable" in answer.json()["error"]["message"]


def test_an_update_nested_too_deeply_is_a_400(service):
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    answer = requests.post(f"{service.url}/telegram/webhook", data=deep, headers=headers, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("text", ["/ｓｔａｒｔ", "/he\u200blp", "/HELP@SomeBot", "/draw a cat"])
def test_look_alike_and_unknown_commands_get_the_help_and_cost_nothing(service, bot_api, served_upstream, text):
    chat_id = next(chat_ids)
    send(service, chat_id, text)
    assert messages(bot_api, chat_id) == [HELP]
    assert not [t for t in served_upstream.tasks.values() if t.params["prompt"] == text]


def test_a_look_alike_new_starts_over(service, bot_api, served_upstream):
    chat_id = next(chat_ids)
    send(service, chat_id, f"a lighthouse for chat {chat_id}")
    photos(bot_api, chat_id, 1)
    send(service, chat_id, "/n\u200bew")
    assert "Starting over" in messages(bot_api, chat_id)[0]


def test_malformed_fields_and_lone_surrogates_are_handled_plainly(service, bot_api, served_upstream, caplog):
    odd, lone = next(chat_ids), next(chat_ids)
    for field in ({"text": {"not": "text"}}, {"photo": "not a list"}, {"caption": 42, "photo": {}}):
        update = {"update_id": next(update_ids), "message": {"message_id": 1, "chat": {"id": odd}, **field}}
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        assert requests.post(f"{service.url}/telegram/webhook", json=update, headers=headers, timeout=10).ok
    send(service, lone, "a cat \ud800 with a broken character")
    assert photos(bot_api, lone, 1)[0]["caption"] == "a cat \ufffd with a broken character"
    assert bot_api.to_chat(odd) == []  # nothing to answer, and nothing made
    assert "Traceback" not in caplog.text
