"""The Slack slash command /banana (CONTRACT §13), through the commands Slack posts to us.

Slack gives a command 3 seconds, so /banana is answered at once with a note only the person sees, and the
picture is POSTed to the command's response_url when it is ready, through the ledger's deliveries
(deliver_to is slack:<response_url>), so a restart mid-generation still delivers it while the address lives
(30 minutes). Every command is checked first: its v0 signature (HMAC-SHA256 of the timestamp and the body with
the signing secret), and its timestamp, at most 5 minutes off.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import requests

from background import Background
from channels.chat import ChatFront, give_up_if_expired
from config import Settings
from domain.netguard import check_target, public_session
from errors import InvalidRequest, Unauthorized
from stores.interface import Seen
from stores.records import TaskRecord, TaskState

log = logging.getLogger(__name__)

SCHEME = "slack"  # a bot task's deliver_to is slack:<response_url>
POST_TIMEOUT = (5.0, 15.0)
RESPONSE_URL_LIFETIME = 30 * 60.0  # seconds a command's response_url takes messages
SIGNATURE_MAX_AGE = 300.0  # seconds: an older signed request is refused, as Slack advises
ALT_TEXT_LIMIT = 2000  # an image block's alt_text
HELP = (
    "/banana <what to draw> makes a picture; the next /banana <a change> edits it. "
    "/banana undo goes back one picture, /banana new starts over."
)


class NotFromSlack(Unauthorized):
    message = "This address takes commands only from Slack, signed."
    headers: dict[str, str] = {}


class SlackCommands:
    attempt_time = sum(POST_TIMEOUT)  # of one delivery

    def __init__(
        self,
        settings: Settings,
        front: ChatFront,
        seen: Seen,
        background: Background,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.front = front
        self.seen = seen
        self.background = background
        # response_url comes from a request: it reaches only public addresses, as webhooks do
        self.session = session or public_session(settings.webhook_allow_private)
        self.clock = clock

    def start(self) -> None:
        """Nothing to set up with Slack: the slash command's address is set in Slack's app settings."""

    # -- commands ----------------------------------------------------------------------------

    def verify(self, signature: str, timestamp: str, body: bytes) -> None:
        """Only what Slack signed, lately, once: a wrong, missing, old or repeated signature is refused."""
        secret = self.settings.slack_signing_secret.encode()
        expected = "v0=" + hmac.new(secret, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise NotFromSlack()
        try:
            fresh = abs(self.clock() - float(timestamp)) <= SIGNATURE_MAX_AGE
        except ValueError:
            fresh = False
        if not fresh or not self.seen.first_time(f"slack-command:{expected}", 2 * SIGNATURE_MAX_AGE):
            raise NotFromSlack()

    def take_command(self, body: bytes) -> dict:
        """Slack's answer, at once (seen only by the person); a picture is made in the background."""
        fields = {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}
        user_id = person(fields)
        response_url = fields.get("response_url", "")
        if user_id is None or not response_url:
            raise InvalidRequest("A Slack command names its team, its user and its response_url.")
        check_target(response_url, self.settings.webhook_allow_private, name="response_url")
        text = fields.get("text", "").strip()
        word = text.lower()
        if word in ("", "help"):
            return ephemeral(HELP)
        if word == "new":
            return ephemeral(self.front.start_over(user_id))
        if word == "undo":
            back, words = self.front.undo(user_id)
            return ephemeral(words) if back is None else picture_message(back.image_url, words, "in_channel")
        self.background.spawn(self._make, user_id, text, response_url)
        return ephemeral(f"Making it: {text}")

    def _make(self, user_id: str, prompt: str, response_url: str) -> None:
        def say(text: str) -> None:
            self._post(response_url, ephemeral(text), user_id)

        self.front.generate(user_id, {"prompt": [prompt]}, deliver_to=f"{SCHEME}:{response_url}", say=say)

    # -- the channel of deliveries (domain/deliveries.py) -------------------------------------------

    def check(self, target: str) -> None:
        """Targets of this channel are made here, never given by a caller."""

    def deliver(self, record: TaskRecord) -> bool:
        """POST the picture to the command's response_url, for the channel; or why not, for the person."""
        response_url = record.deliver_to.removeprefix(f"{SCHEME}:")
        give_up_if_expired(record, self.clock() - RESPONSE_URL_LIFETIME, "Slack's response_url")
        if record.state == TaskState.SUCCESS:
            message = picture_message(record.image_urls[0], record.prompt, "in_channel")
        else:
            message = ephemeral(record.error_message or "The picture could not be made.")
        return self._post(response_url, message, record.task_id)

    def _post(self, response_url: str, message: dict, about: str) -> bool:
        try:
            answer = self.session.post(response_url, json=message, timeout=POST_TIMEOUT, allow_redirects=False)
        except requests.RequestException as failure:
            log.warning("%s: Slack's response_url did not answer (%s)", about, type(failure).__name__)
            return False
        if answer.status_code >= 300:
            log.warning("%s: Slack's response_url answered HTTP %d", about, answer.status_code)
            return False
        return True


def person(fields: dict[str, str]) -> str | None:
    """The user id of the person who sent it: slack:<team id>:<user id>."""
    team, user = fields.get("team_id", ""), fields.get("user_id", "")
    if not (team.isalnum() and user.isalnum()):
        return None
    return f"slack:{team}:{user}"


def ephemeral(text: str) -> dict:
    return {"response_type": "ephemeral", "text": text}


def picture_message(image_url: str, words: str | None, response_type: str) -> dict:
    alt = (words or "a picture")[:ALT_TEXT_LIMIT]
    return {
        "response_type": response_type,
        "text": alt,
        "blocks": [{"type": "image", "image_url": image_url, "alt_text": alt}],
    }
