"""What every chat front-end (Telegram, Discord, Slack) does the same way: a conversation per person of the
platform, RATE_LIMIT per person, and a generation recorded in the ledger with where to deliver it, so that its
picture (or why not) reaches the chat through the deliveries even after a restart.

Each platform's module keeps only its own parts: checking that a request comes from the platform, reading its
messages, acknowledging them within its time, and delivering the result the way it shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from config import Settings
from domain.answers import ordinal
from domain.conversations import Conversations, channel_owner, conversation_key
from domain.deliveries import Undeliverable
from domain.lifecycle import Lifecycle
from domain.params import parse_generation
from errors import InvalidRequest, ServiceError, StoreUnavailable
from stores.records import Picture, TaskRecord

log = logging.getLogger(__name__)

LIMITED = "That is a lot of pictures in a short time. Please wait a minute, then try again."
UNAVAILABLE = "I cannot make pictures right now. Please try again in a minute."
IN_LINE_AFTER = 2.0  # seconds after which a picture still waiting for its turn is said to be in line
IN_LINE = "Many pictures are being made right now: yours is {place} in line. I will send it here when it is ready."
NOTHING_TO_UNDO = "There is nothing to undo yet."
BACK_TO_START = "Went back to the start: your next message makes a new picture."
STARTING_OVER = "Starting over: your next message makes a new picture."


class ChatFront:
    """One platform's people and their pictures: `user_id`s are the platform's (telegram:<chat>, discord:<user>)."""

    def __init__(
        self,
        platform: str,
        settings: Settings,
        lifecycle: Lifecycle,
        conversations: Conversations,
        allowed: Callable[[str], bool],
    ):
        """`allowed(key)` spends one request of RATE_LIMIT for that key, False when none is left."""
        self.owner = channel_owner(platform)
        self.settings = settings
        self.lifecycle = lifecycle
        self.conversations = conversations
        self.allowed = allowed

    def generate(self, user_id: str, values: dict[str, list[str]], deliver_to: str, say: Callable[[str], None]):
        """Make or edit the person's picture; its delivery (deliver_to) brings it, or why not, when it ends.
        `say(text)` tells the chat at once what stops it here: the limit, a wrong request, a full queue, its
        place in line. Returns when the picture has ended, or the wait is over."""
        if self.settings.rate_limit and not self.allowed(user_id):
            say(LIMITED)
            return
        try:
            wanted = parse_generation({**values, "user_id": [user_id]}, self.settings.polling_window)
        except InvalidRequest as wrong:
            say(wrong.message)
            return
        try:
            glance = replace(wanted, wait=min(wanted.wait, IN_LINE_AFTER))
            record = self.lifecycle.generate(glance, self.owner, deliver_to=deliver_to)
            position = self.lifecycle.queue_position(record)
            if position:
                say(IN_LINE.format(place=ordinal(position)))
            self.lifecycle.wait(record, wanted.wait - glance.wait)
        except StoreUnavailable:
            say(UNAVAILABLE)
        except ServiceError as refused:  # refused before it was recorded (no key usable, the queue full)
            say(refused.message)
        except Exception as failure:  # refused after it was recorded: the delivery tells the chat why
            log.info("%s: the generation ended early (%s)", user_id, type(failure).__name__)

    def undo(self, user_id: str) -> tuple[Picture | None, str]:
        """Step the person's chain back: the picture now last (None at the start), and the words to say."""
        conversation = self.conversation(user_id)
        if self.conversations.undo(conversation) is None:
            return None, NOTHING_TO_UNDO
        back = self.conversations.last(conversation)
        if back is None:
            return None, BACK_TO_START
        return back, f"Back to this one ({back.prompt or 'your picture'}). Your next message edits it."

    def start_over(self, user_id: str) -> str:
        self.conversations.forget(self.conversation(user_id))
        return STARTING_OVER

    def conversation(self, user_id: str) -> str:
        return conversation_key(self.owner, user_id)


def give_up_if_expired(record: TaskRecord, asked_after: float, what: str) -> None:
    """A platform's answer lives a while only: a task asked before `asked_after` is not delivered (said in the
    log, by `what`: "Discord's interaction", say)."""
    if record.created_at < asked_after:
        log.warning("task %s: %s expired before the picture came; not delivered", record.task_id, what)
        raise Undeliverable(f"{what} expired")
