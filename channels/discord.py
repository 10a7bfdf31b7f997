"""The Discord bot (CONTRACT §13): the /banana slash command, through the interactions Discord posts to us.

Discord gives an interaction 3 seconds, so /banana is answered "deferred" at once and the picture edits that
answer when it is ready, through the ledger's deliveries (deliver_to is discord:<interaction token>), so a
restart mid-generation still delivers it while the token lives (15 minutes). Every interaction is checked
first: its Ed25519 signature over the timestamp and the body, with the application's public key, its age,
and that it was not seen before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from background import Background
from channels.chat import ChatFront, give_up_if_expired
from config import Settings
from domain.netguard import plain_session
from domain.params import MODEL_TABLE, MODELS
from errors import InvalidRequest, Unauthorized
from stores.interface import Seen
from stores.records import TaskRecord, TaskState

log = logging.getLogger(__name__)

SCHEME = "discord"  # a bot task's deliver_to is discord:<interaction token>
API_TIMEOUT = (5.0, 15.0)
TOKEN_LIFETIME = 15 * 60.0  # seconds an interaction's token may edit its answer
SIGNATURE_MAX_AGE = 300.0  # seconds: an older signed request is a replay
REGISTER_TRIES = 5
PING, COMMAND, COMPONENT = 1, 2, 3  # interaction types
PONG, MESSAGE, DEFERRED = 1, 4, 5  # response types
UNDO, START_OVER = "banana:undo", "banana:new"  # the buttons' custom ids
EPHEMERAL = 64  # message flag: only the person who asked sees it
PROMPT_LIMIT = 4096  # an embed's description
BUTTONS = [
    {
        "type": 1,
        "components": [
            {"type": 2, "style": 2, "label": "Undo", "custom_id": UNDO},
            {"type": 2, "style": 2, "label": "Start over", "custom_id": START_OVER},
        ],
    }
]
_RATIOS = list(dict.fromkeys(ratio for name in MODELS for ratio in MODEL_TABLE[name].aspect_ratios))
COMMAND_DEFINITION = {
    "name": "banana",
    "type": 1,
    "description": "Make a picture, or change your last one",
    "options": [
        {"type": 3, "name": "prompt", "description": "What to draw, or how to change it", "required": True},
        {"type": 11, "name": "image", "description": "A picture to start from"},
        {
            "type": 3,
            "name": "model",
            "description": "Which model",
            "choices": [{"name": m, "value": m} for m in MODELS],
        },
        {
            "type": 3,
            "name": "aspect_ratio",
            "description": "The picture's shape",
            "choices": [{"name": r, "value": r} for r in _RATIOS[:25]],
        },
    ],
}
HELP = "Use /banana with a prompt: it makes a picture, and the next /banana changes it."


class NotFromDiscord(Unauthorized):
    message = "This address takes interactions only from Discord, signed."
    headers: dict[str, str] = {}


class DiscordError(Exception):
    """Discord's API did not take a call (its words, never a token)."""


class DiscordApi:
    """The two calls the bot makes: edit an interaction's answer, and register the command."""

    def __init__(self, base: str, application_id: str, bot_token: str | None, session: requests.Session | None):
        self.base = base.rstrip("/")
        self.application_id = application_id
        self.bot_token = bot_token
        self.session = session or plain_session()

    def edit_answer(self, token: str, message: dict) -> None:
        self._call("PATCH", f"/webhooks/{self.application_id}/{token}/messages/@original", message)

    def register(self, command: dict) -> None:
        headers = {"Authorization": f"Bot {self.bot_token}"}
        self._call("PUT", f"/applications/{self.application_id}/commands", [command], headers)

    def _call(self, method: str, path: str, body: Any, headers: dict | None = None) -> None:
        try:
            answer = self.session.request(method, self.base + path, json=body, headers=headers, timeout=API_TIMEOUT)
        except requests.RequestException as failure:
            raise DiscordError(f"{method}: no answer ({type(failure).__name__})") from None
        if answer.status_code >= 300:
            raise DiscordError(f"{method}: HTTP {answer.status_code}")


class DiscordBot:
    attempt_time = sum(API_TIMEOUT)  # of one delivery

    def __init__(
        self,
        settings: Settings,
        front: ChatFront,
        seen: Seen,
        api: DiscordApi,
        background: Background,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.front = front
        self.seen = seen
        self.api = api
        self.background = background
        self.clock = clock
        self.key = VerifyKey(bytes.fromhex(settings.discord_public_key))

    # -- the process's part ----------------------------------------------------------------

    def start(self) -> None:
        """With DISCORD_BOT_TOKEN, register the /banana command (the same definition each time: idempotent)."""
        if self.api.bot_token:
            self.background.spawn(self._register)

    def _register(self) -> None:
        for attempt in range(REGISTER_TRIES):
            try:
                self.api.register(COMMAND_DEFINITION)
                log.info("registered the Discord command /banana")
                return
            except DiscordError as failure:
                log.warning("could not register the Discord command (%s); trying again", failure)
            if self.background.stopping.wait(2**attempt):
                return

    # -- interactions ------------------------------------------------------------------------

    def verify(self, signature: str, timestamp: str, body: bytes) -> None:
        """Only what Discord signed, lately: a wrong, missing or old signature is refused."""
        try:
            self.key.verify(timestamp.encode() + body, bytes.fromhex(signature))
            signed_at = float(timestamp)
        except (BadSignatureError, ValueError):
            raise NotFromDiscord() from None
        if abs(self.clock() - signed_at) > SIGNATURE_MAX_AGE:
            raise NotFromDiscord()

    def take_interaction(self, interaction: Any) -> dict:
        """Discord's answer, at once; a picture is made in the background."""
        if not isinstance(interaction, dict):
            raise InvalidRequest("A Discord interaction is a JSON object.")
        kind, data = interaction.get("type"), interaction.get("data")
        if kind == PING:
            return {"type": PONG}
        if not self.seen.first_time(f"discord-interaction:{interaction.get('id')}", 2 * SIGNATURE_MAX_AGE):
            raise NotFromDiscord()  # the same signed interaction again: a replay
        user_id = person(interaction)
        if user_id is None or not isinstance(data, dict):
            raise InvalidRequest("A Discord interaction names who sent it and what they asked.")
        if kind == COMMAND and data.get("name") == "banana":
            token = interaction.get("token")
            if not isinstance(token, str) or not token:
                raise InvalidRequest("A Discord command comes with its token.")
            self.background.spawn(self._make, user_id, command_values(data), token)
            return {"type": DEFERRED}
        if kind == COMPONENT and data.get("custom_id") == UNDO:
            return self._undo(user_id)
        if kind == COMPONENT and data.get("custom_id") == START_OVER:
            return {"type": MESSAGE, "data": {"content": self.front.start_over(user_id)}}
        return {"type": MESSAGE, "data": {"content": HELP, "flags": EPHEMERAL}}

    def _make(self, user_id: str, values: dict[str, list[str]], token: str) -> None:
        def say(text: str) -> None:
            try:
                self.api.edit_answer(token, {"content": text})
            except DiscordError as failure:
                log.warning("%s: %s", user_id, failure)

        self.front.generate(user_id, values, deliver_to=f"{SCHEME}:{token}", say=say)

    def _undo(self, user_id: str) -> dict:
        back, words = self.front.undo(user_id)
        if back is None:
            return {"type": MESSAGE, "data": {"content": words}}
        return {"type": MESSAGE, "data": {"content": words, **picture_message(back.image_url, back.prompt)}}

    # -- the channel of deliveries (domain/deliveries.py) -------------------------------------------

    def check(self, target: str) -> None:
        """Targets of this channel are made here, never given by a caller."""

    def deliver(self, record: TaskRecord) -> bool:
        """Edit the deferred answer: the picture with its buttons, or why not."""
        token = record.deliver_to.removeprefix(f"{SCHEME}:")
        give_up_if_expired(record, self.clock() - TOKEN_LIFETIME, "Discord's interaction")
        if record.state == TaskState.SUCCESS:
            message = {"content": "", **picture_message(record.image_urls[0], record.prompt)}
        else:
            message = {"content": record.error_message or "The picture could not be made."}
        try:
            self.api.edit_answer(token, message)
        except DiscordError as failure:
            log.warning("task %s: %s", record.task_id, failure)
            return False
        return True


def picture_message(image_url: str, prompt: str | None) -> dict:
    embed = {"image": {"url": image_url}, "description": (prompt or "")[:PROMPT_LIMIT]}
    return {"embeds": [embed], "components": BUTTONS}


def person(interaction: dict) -> str | None:
    """The user id of the person who sent it: in a server, its member's user; in a direct message, its user."""
    member = interaction.get("member")
    user = member.get("user") if isinstance(member, dict) else interaction.get("user")
    user_id = user.get("id") if isinstance(user, dict) else None
    return f"discord:{user_id}" if isinstance(user_id, str) and user_id.isdigit() else None


def command_values(data: dict) -> dict[str, list[str]]:
    """/banana's options as generation values: prompt, model, aspect_ratio, and the attached picture's address."""
    values: dict[str, list[str]] = {}
    options = data.get("options") if isinstance(data.get("options"), list) else []
    for option in options:
        if not isinstance(option, dict) or not isinstance(option.get("value"), str):
            continue
        name, value = option.get("name"), option["value"]
        if name in ("prompt", "model", "aspect_ratio"):
            values[name] = [value]
        elif name == "image":
            attachment = ((data.get("resolved") or {}).get("attachments") or {}).get(value)
            if isinstance(attachment, dict) and isinstance(attachment.get("url"), str):
                values["image_url"] = [attachment["url"]]
    return values
