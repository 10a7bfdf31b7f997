"""The Telegram bot (CONTRACT §10): a message makes a picture, the next one edits it.

A thin adapter over what the HTTP API uses. Each chat is a conversation (user `telegram:<chat_id>`,
of an owner of its own, so the HTTP API and the bot never mix users); its generations go through the
same lifecycle, ledger, limits and chain; and their pictures reach the chat through the same durable
outbox as webhooks (this bot is the channel of targets `telegram:<chat>:<message>`), so a restart in
the middle of a generation still sends the picture. The HTTP side (web/chats.py) hands each update to
`take_update`. The Bot API is called with a small client over requests: pyTelegramBotAPI would work
under gevent too, but keeps its API address in module globals.
"""

from __future__ import annotations

import hmac
import io
import logging
import threading
import unicodedata
from typing import Any

import requests

from background import Background
from channels.chat import ChatFront
from config import Settings
from domain.media import Media
from domain.netguard import BodyRefused, plain_session, read_bounded
from errors import InvalidRequest, Unauthorized
from stores.interface import Seen
from stores.records import TaskRecord, TaskState

log = logging.getLogger(__name__)

SCHEME = "telegram"  # a bot task's deliver_to is telegram:<chat_id>:<message_id>
API_TIMEOUT = (5.0, 15.0)
UPDATES_REMEMBERED = 24 * 3600.0  # Telegram repeats an update it thinks was not received, for a day at most
CHAT_ACTION_EVERY = 4.0  # Telegram shows "sending a photo" for 5 s after each sendChatAction
CAPTION_LIMIT = 1024
MAX_PHOTO_BYTES = 20 * 1024 * 1024  # the largest file the Bot API lets a bot download
PHOTO_DEADLINE = 60.0  # for the whole file
PHOTO_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
SET_WEBHOOK_TRIES = 5

HELP = (
    'Send me a description, and I make a picture of it. Then send a change ("make it blue"), and I edit the '
    "last picture. Send a photo with a caption, and I edit that photo as the caption says.\n"
    "/undo goes back one picture. /new starts over."
)
NEEDS_MEDIA = (
    "I cannot edit photos you send here yet: the owner of this service has to set MEDIA_STORE first. "
    "You can still describe a picture, and I make it."
)
NEEDS_CAPTION = "Please send the photo again with a caption that says how to change it."
PHOTO_NOT_FETCHED = "I could not fetch that photo from Telegram. Please send it again."


class NotFromTelegram(Unauthorized):
    message = "This address takes updates only from Telegram."
    headers: dict[str, str] = {}  # no token scheme to offer: Telegram sends its secret in a header of its own


class TelegramError(Exception):
    """A Bot API call failed. The message never holds the bot token."""


class BotApi:
    """The Bot API methods the bot uses. The token is part of every address, so no address is ever logged."""

    def __init__(self, base: str, token: str, session: requests.Session | None = None):
        self.base = base.rstrip("/")
        self.token = token
        self.session = session or plain_session()

    def call(self, method: str, **params) -> Any:
        try:
            answer = self.session.post(f"{self.base}/bot{self.token}/{method}", json=params, timeout=API_TIMEOUT)
            body = answer.json()
        except (requests.RequestException, ValueError) as failure:
            raise TelegramError(f"{method}: no usable answer ({type(failure).__name__})") from None
        if not isinstance(body, dict) or body.get("ok") is not True:
            description = body.get("description") if isinstance(body, dict) else None
            raise TelegramError(f"{method}: {str(description or 'refused')[:200]}")
        return body.get("result")

    def download(self, file_path: str) -> bytes:
        """A file the chat sent (getFile gave its path), at most MAX_PHOTO_BYTES."""
        try:
            with self.session.get(
                f"{self.base}/file/bot{self.token}/{file_path}", stream=True, timeout=API_TIMEOUT
            ) as answer:
                if answer.status_code != 200:
                    raise TelegramError(f"file: HTTP {answer.status_code}")
                return b"".join(read_bounded(answer, MAX_PHOTO_BYTES, PHOTO_DEADLINE))
        except requests.RequestException as failure:
            raise TelegramError(f"file: no answer ({type(failure).__name__})") from None
        except BodyRefused as refused:
            raise TelegramError(f"file: {refused}") from None


class TelegramBot:
    attempt_time = sum(API_TIMEOUT)  # of one delivery

    def __init__(
        self,
        settings: Settings,
        front: ChatFront,
        seen: Seen,
        api: BotApi,
        background: Background,
        media: Media | None = None,
    ):
        self.settings = settings
        self.front = front
        self.seen = seen
        self.api = api
        self.background = background
        self.media = media

    # -- the process's part ----------------------------------------------------------------

    def start(self) -> None:
        """With PUBLIC_BASE_URL, tell Telegram where to send updates, and with which secret."""
        if self.settings.public_base_url:
            self.background.spawn(self._set_webhook)

    def _set_webhook(self) -> None:
        url = f"{self.settings.public_base_url}/telegram/webhook"
        for attempt in range(SET_WEBHOOK_TRIES):
            try:
                self.api.call(
                    "setWebhook",
                    url=url,
                    secret_token=self.settings.telegram_webhook_secret,
                    allowed_updates=["message"],
                )
                log.info("Telegram sends the bot's updates to %s", url)
                return
            except TelegramError as failure:
                log.warning("could not set the bot's webhook (%s); trying again", failure)
            if self.background.stopping.wait(2**attempt):
                return

    # -- updates -------------------------------------------------------------------------------

    def check_secret(self, secret: str) -> None:
        """Updates come only with the secret Telegram was given (compared in constant time)."""
        expected = self.settings.telegram_webhook_secret.encode()
        if not hmac.compare_digest(secret.encode("utf-8", "surrogateescape"), expected):
            raise NotFromTelegram()

    def take_update(self, update: Any) -> None:
        """An update posted to us, with the right secret: each is handled once, in the background (Telegram
        wants its answer at once)."""
        if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
            raise InvalidRequest("A Telegram update is a JSON object with an update_id.")
        if self.seen.first_time(f"telegram-update:{update['update_id']}", UPDATES_REMEMBERED):
            self.background.spawn(self._handle, update)

    def _handle(self, update: dict) -> None:
        message = update.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("chat"), dict):
            return  # an edit, a join, a channel post: nothing to draw
        chat_id, message_id = message["chat"].get("id"), message.get("message_id")
        if not isinstance(chat_id, int) or not isinstance(message_id, int):
            return
        try:
            self._answer(chat_id, message_id, message)
        except TelegramError as failure:
            log.warning("chat %d: %s", chat_id, failure)
        except Exception:
            log.exception("chat %d: the update could not be handled", chat_id)

    def _answer(self, chat_id: int, message_id: int, message: dict) -> None:
        text = message_text(message)
        command = command_of(text)
        photo = message.get("photo")
        if command == "/new":
            self._say(chat_id, message_id, self.front.start_over(chat_user(chat_id)))
        elif command == "/undo":
            self._undo(chat_id, message_id)
        elif command is not None:  # /start, /help, and any command the bot does not know: never a paid picture
            self._say(chat_id, message_id, HELP)
        elif isinstance(photo, list) and photo:
            self._edit_photo(chat_id, message_id, photo, text)
        elif text:
            self._generate(chat_id, message_id, text)

    def _undo(self, chat_id: int, message_id: int) -> None:
        back, words = self.front.undo(chat_user(chat_id))
        if back is None:
            self._say(chat_id, message_id, words)
            return
        self.api.call("sendPhoto", chat_id=chat_id, photo=back.image_url, caption=words[:CAPTION_LIMIT])

    def _edit_photo(self, chat_id: int, message_id: int, sizes: list, caption: str) -> None:
        media = self.media
        if media is None or not media.reachable:
            self._say(chat_id, message_id, NEEDS_MEDIA)
            return
        if not caption:
            self._say(chat_id, message_id, NEEDS_CAPTION)
            return
        largest = sizes[-1] if isinstance(sizes[-1], dict) else {}
        found = self.api.call("getFile", file_id=largest.get("file_id"))
        path = found.get("file_path", "") if isinstance(found, dict) else ""
        content_type = PHOTO_TYPES.get(path.rsplit(".", 1)[-1].lower())
        try:
            photo = self.api.download(path) if content_type else None
        except TelegramError as failure:
            log.warning("chat %d: %s", chat_id, failure)
            self._say(chat_id, message_id, PHOTO_NOT_FETCHED)
            return
        # A copy of our own: the upstream must never see the file's address, which holds the bot token.
        copy = media.keep_file(io.BytesIO(photo), content_type) if photo is not None else None
        if copy is None:
            self._say(chat_id, message_id, "I could not read that photo. Please send it as a JPEG or PNG picture.")
            return
        self._generate(chat_id, message_id, caption, image_url=copy)

    def _generate(self, chat_id: int, message_id: int, prompt: str, image_url: str | None = None) -> None:
        """Make or edit the chat's picture, "sending a photo" showing meanwhile; `deliver` sends it (or why not)."""
        values = {"prompt": [prompt], **({"image_url": [image_url]} if image_url else {})}
        showing = threading.Event()
        self.background.spawn(self._show_progress, chat_id, showing)
        try:
            self.front.generate(
                chat_user(chat_id),
                values,
                deliver_to=f"{SCHEME}:{chat_id}:{message_id}",
                say=lambda text: self._say(chat_id, message_id, text),
            )
        finally:
            showing.set()

    def _show_progress(self, chat_id: int, done: threading.Event) -> None:
        """`sendChatAction upload_photo` until the picture is ready (Telegram shows each for 5 s)."""
        while not done.is_set() and not self.background.stopping.is_set():
            try:
                self.api.call("sendChatAction", chat_id=chat_id, action="upload_photo")
            except TelegramError as failure:
                log.info("chat %d: %s", chat_id, failure)
            done.wait(CHAT_ACTION_EVERY)

    # -- the channel of deliveries (domain/deliveries.py) -------------------------------------------

    def check(self, target: str) -> None:
        """Targets of this channel are made here, never given by a caller."""

    def deliver(self, record: TaskRecord) -> bool:
        """Send the ended task to its chat, in reply to the message that asked: the picture, or why not."""
        chat_id, message_id = (int(part) for part in record.deliver_to.removeprefix(f"{SCHEME}:").split(":"))
        reply = reply_to(message_id)
        try:
            if record.state == TaskState.SUCCESS:
                caption = (record.prompt or "")[:CAPTION_LIMIT]
                self.api.call(
                    "sendPhoto", chat_id=chat_id, photo=record.image_urls[0], caption=caption, reply_parameters=reply
                )
            else:
                text = record.error_message or "The picture could not be made."
                self.api.call("sendMessage", chat_id=chat_id, text=text, reply_parameters=reply)
        except TelegramError as failure:
            log.warning("chat %d: %s", chat_id, failure)
            return False
        return True

    # -- small helpers -------------------------------------------------------------------------

    def _say(self, chat_id: int, message_id: int, text: str) -> None:
        self.api.call("sendMessage", chat_id=chat_id, text=text, reply_parameters=reply_to(message_id))


def message_text(message: dict) -> str:
    """A message's text (or a photo's caption), as text Python can store and send on: a field of another type
    counts as none, and a lone surrogate (which JSON allows, and UTF-8 does not) becomes a replacement mark."""
    text = message.get("text") or message.get("caption") or ""
    if not isinstance(text, str):
        return ""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").strip()


def command_of(text: str) -> str | None:
    """The command a message starts with, as the user meant it: look-alike letters (/ｓｔａｒｔ) read as
    plain ones, and invisible characters (a zero-width space in /new) dropped. None when it is no command."""
    plain = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf").strip()
    if not plain.startswith("/"):
        return None
    return plain.split(maxsplit=1)[0].split("@")[0].lower()


def chat_user(chat_id: int) -> str:
    """The user id of a chat's conversation."""
    return f"telegram:{chat_id}"


def reply_to(message_id: int) -> dict:
    """Bot API reply parameters: in reply to the message that asked, or on its own if it was deleted."""
    return {"message_id": message_id, "allow_sending_without_reply": True}
