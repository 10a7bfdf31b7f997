"""The Discord bot over real HTTP: interactions signed with a real Ed25519 key as Discord signs them, posted to
the service (served in this process; under gunicorn for the restart), a fake Discord API that records the edits
of each answer and the command's registration, and the emulator as the upstream."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import replace

import pytest
import requests
from flask import Flask, request
from nacl.signing import SigningKey

from channels.chat import IN_LINE, LIMITED, STARTING_OVER
from channels.discord import COMMAND_DEFINITION, START_OVER, TOKEN_LIFETIME, UNDO
from domain.deliveries import Undeliverable
from tests.helpers import served_environ
from tools.processes import Service, free_port, serving, wait_until

APPLICATION = "112233445566778899"
BOT_TOKEN = "discord-bot-token-never-to-be-seen"
SIGNING = SigningKey.generate()  # Discord's key: the service knows only its public half
tokens = (f"interaction-token-{n}" for n in itertools.count())
users = (str(n) for n in itertools.count(80_000_000_000_000_000))


class FakeDiscordApi:
    """Discord's API as the bot uses it: each edit of an interaction's answer, and the command registrations."""

    def __init__(self):
        self.edits: dict[str, list[dict]] = {}
        self.registrations: list[tuple[str, list]] = []
        self.lock = threading.Lock()
        self.app = Flask("discord-api")
        self.app.add_url_rule(
            "/webhooks/<application>/<token>/messages/@original", view_func=self.edit, methods=["PATCH"]
        )
        self.app.add_url_rule("/applications/<application>/commands", view_func=self.register, methods=["PUT"])

    def edit(self, application: str, token: str):
        if application != APPLICATION:
            return {"message": "Unknown Webhook"}, 404
        with self.lock:
            self.edits.setdefault(token, []).append(request.get_json())
        return {"id": "1"}

    def register(self, application: str):
        with self.lock:
            self.registrations.append((request.headers.get("Authorization", ""), request.get_json()))
        return []

    def answers(self, token: str, count: int = 1) -> list[dict]:
        return wait_until(lambda: len(found := self.edits.get(token, [])) >= count and list(found), timeout=15)


@pytest.fixture(scope="module")
def discord_api():
    fake = FakeDiscordApi()
    with serving(fake.app) as url:
        fake.url = url
        yield fake


def discord_settings(discord_api) -> dict:
    return {
        "discord_application_id": APPLICATION,
        "discord_public_key": SIGNING.verify_key.encode().hex(),
        "discord_bot_token": BOT_TOKEN,
        "discord_api_base": discord_api.url,
    }


@pytest.fixture
def service(serve_app, discord_api, caplog):
    served = serve_app(**discord_settings(discord_api))
    yield served
    assert BOT_TOKEN not in caplog.text and "interaction-token" not in caplog.text


def post(service, interaction: dict, key: SigningKey = SIGNING, timestamp: str | None = None, signed=True):
    body = json.dumps(interaction).encode()
    timestamp = timestamp or str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Signature-Timestamp": timestamp}
    if signed:
        headers["X-Signature-Ed25519"] = key.sign(timestamp.encode() + body).signature.hex()
    return requests.post(f"{service.url}/discord/interactions", data=body, headers=headers, timeout=10)


def banana(user: str, prompt: str, token: str, **options) -> dict:
    given = [{"name": "prompt", "type": 3, "value": prompt}]
    given += [{"name": name, "type": 3, "value": value} for name, value in options.items()]
    return {
        "type": 2,
        "id": f"id-of-{token}",
        "token": token,
        "member": {"user": {"id": user}},
        "data": {"name": "banana", "options": given},
    }


def press(user: str, button: str) -> dict:
    token = next(tokens)
    return {"type": 3, "id": f"id-of-{token}", "token": token, "user": {"id": user}, "data": {"custom_id": button}}


def test_unsigned_wrongly_signed_or_old_interactions_are_401_and_do_nothing(service, served_upstream):
    token = next(tokens)
    wish = banana(next(users), "an unsigned cat", token)
    stranger = SigningKey.generate()
    answers = [
        post(service, wish, signed=False),
        post(service, wish, key=stranger),
        post(service, wish, timestamp=str(int(time.time()) - 3600)),  # a replay of an old request
    ]
    assert [answer.status_code for answer in answers] == [401, 401, 401]
    assert all(answer.json()["error"]["code"] == "unauthorized" for answer in answers)
    assert not [t for t in served_upstream.tasks.values() if "unsigned cat" in t.params["prompt"]]


def test_the_same_signed_interaction_again_is_401_and_makes_nothing_more(service, discord_api, served_upstream):
    token, timestamp = next(tokens), str(int(time.time()))
    wish = banana(next(users), "a replayed owl", token)
    first, replayed = (post(service, wish, timestamp=timestamp) for _ in range(2))
    assert (first.status_code, replayed.status_code) == (200, 401)
    discord_api.answers(token)
    assert len([t for t in served_upstream.tasks.values() if "a replayed owl" in t.params["prompt"]]) == 1


def test_a_ping_is_answered_with_a_pong(service):
    assert post(service, {"type": 1}).json() == {"type": 1}


def test_banana_is_deferred_then_the_picture_edits_the_answer_and_the_next_one_changes_it(
    service, discord_api, served_upstream
):
    user, first_token, second_token = next(users), next(tokens), next(tokens)
    assert post(service, banana(user, "a red boat", first_token, aspect_ratio="16:9")).json() == {"type": 5}
    [edit] = discord_api.answers(first_token)
    [embed] = edit["embeds"]
    assert embed["description"] == "a red boat" and embed["image"]["url"].startswith(served_upstream.url)
    ids = [button["custom_id"] for button in edit["components"][0]["components"]]
    assert ids == [UNDO, START_OVER]
    boat = task_with(served_upstream, "a red boat")
    assert "16:9" in (boat.params.get("image_size"), boat.params.get("aspectRatio"))
    post(service, banana(user, "make it blue", second_token))
    discord_api.answers(second_token)
    assert task_with(served_upstream, "make it blue").params["imageUrls"] == [embed["image"]["url"]]


def test_the_buttons_undo_and_start_over(service, discord_api, served_upstream):
    user = next(users)
    for prompt in ("a green tree", "add a bird"):
        token = next(tokens)
        post(service, banana(user, prompt, token))
        discord_api.answers(token)
    back = post(service, press(user, UNDO)).json()
    assert back["type"] == 4 and back["data"]["embeds"][0]["description"] == "a green tree"
    assert post(service, press(user, START_OVER)).json()["data"]["content"] == STARTING_OVER
    token = next(tokens)
    post(service, banana(user, "a lonely cloud", token))
    discord_api.answers(token)
    assert task_with(served_upstream, "a lonely cloud").params["type"] == "TEXTTOIAMGE"


def test_failures_and_the_rate_limit_are_said_in_the_answer(serve_app, discord_api, served_upstream):
    strict = serve_app(rate_limit="1/minute", **discord_settings(discord_api))
    user, failing, limited = next(users), next(tokens), next(tokens)
    post(strict, banana(user, "[fail] a doomed cat", failing))
    assert "could not be made" in discord_api.answers(failing)[0]["content"]
    post(strict, banana(user, "one too many", limited))
    assert discord_api.answers(limited) == [{"content": LIMITED}]
    wrong = next(tokens)
    post(strict, banana(next(users), "a cat", wrong, aspect_ratio="7:3"))
    assert "aspect_ratio" in discord_api.answers(wrong)[0]["content"]


def test_an_attached_picture_is_the_one_edited(service, discord_api, served_upstream):
    token = next(tokens)
    wish = banana(next(users), "give it a hat", token)
    attached = "https://cdn.discordapp.com/attachments/1/2/dog.png"
    wish["data"]["options"].append({"name": "image", "type": 11, "value": "777"})
    wish["data"]["resolved"] = {"attachments": {"777": {"id": "777", "url": attached, "content_type": "image/png"}}}
    post(service, wish)
    discord_api.answers(token)
    assert task_with(served_upstream, "give it a hat").params["imageUrls"] == [attached]


def test_a_picture_waiting_its_turn_says_where_it_is_in_line_then_comes(serve_app, discord_api):
    paced = serve_app(upstream_rate=(1, 4.0), **discord_settings(discord_api))
    first, waiting = next(tokens), next(tokens)
    post(paced, banana(next(users), "the first picture", first))
    discord_api.answers(first)
    post(paced, banana(next(users), "a picture that waits its turn", waiting))
    in_line, picture = discord_api.answers(waiting, 2)
    assert in_line == {"content": IN_LINE.format(place="1st")}
    assert picture["embeds"][0]["description"] == "a picture that waits its turn"


def test_an_interaction_past_its_fifteen_minutes_is_given_up_and_said_in_the_log(
    service, discord_api, served_upstream, caplog
):
    token = next(tokens)
    post(service, banana(next(users), "a picture for later", token))
    discord_api.answers(token)
    parts = service.app.extensions["nanobanana"]
    ended = parts.store.task(task_with(served_upstream, "a picture for later").task_id)  # by the upstream's id
    with pytest.raises(Undeliverable):
        parts.discord.deliver(replace(ended, created_at=time.time() - TOKEN_LIFETIME - 1))
    assert "interaction expired" in caplog.text and len(discord_api.edits[token]) == 1


def test_start_up_registers_the_command_with_the_bot_token(service, discord_api):
    authorization, commands = wait_until(lambda: discord_api.registrations and discord_api.registrations[-1])
    assert authorization == f"Bot {BOT_TOKEN}" and commands == [COMMAND_DEFINITION]


@pytest.mark.slow
def test_a_kill_9_between_the_answer_and_the_picture_still_delivers_it(served_upstream, discord_api, tmp_path):
    port = free_port()
    environ = {
        **served_environ(served_upstream),
        "DATABASE_PATH": str(tmp_path / "db.sqlite3"),
        "DISCORD_APPLICATION_ID": APPLICATION,
        "DISCORD_PUBLIC_KEY": SIGNING.verify_key.encode().hex(),
        "DISCORD_API_BASE": discord_api.url,
        "WEBHOOK_RETRY_DELAYS": "0.5,0.5",
    }
    first = Service(environ, tmp_path / "first.log", port=port).wait_ready()
    token = next(tokens)
    assert post(first, banana(next(users), "[delay=3] a slow snail", token)).json() == {"type": 5}
    wait_until(lambda: task_with(served_upstream, "a slow snail"), timeout=10)
    first.kill()
    assert token not in discord_api.edits  # nothing delivered before the crash
    second = Service(environ, tmp_path / "second.log", port=port).wait_ready()
    try:
        [edit] = discord_api.answers(token)
        assert edit["embeds"][0]["description"] == "[delay=3] a slow snail"
    finally:
        second.stop()


def task_with(served_upstream, words: str):
    with served_upstream.lock:
        return next((task for task in served_upstream.tasks.values() if words in task.params["prompt"]), None)
