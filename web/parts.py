"""The parts of one running service, built once by the factory (app.py) and found by the routes here.

One object instead of string keys in `app.extensions`: the routes ask `parts()` for what they use.
`start` and `stop` are each worker's beginning and end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import current_app

from background import Background
from channels.discord import DiscordBot
from channels.slack import SlackCommands
from channels.telegram import TelegramBot
from config import Settings
from domain.conversations import Conversations
from domain.deliveries import Deliveries
from domain.lifecycle import Lifecycle
from domain.media import Media
from domain.uploads import Uploads
from nanobanana_client import NanoBananaClient
from stores.interface import Store
from web.telemetry import Metrics


@dataclass
class Parts:
    settings: Settings
    client: NanoBananaClient
    store: Store
    background: Background
    conversations: Conversations
    lifecycle: Lifecycle
    deliveries: Deliveries
    metrics: Metrics
    uploads: Uploads
    media: Media | None = None
    telegram: TelegramBot | None = None
    discord: DiscordBot | None = None
    slack: SlackCommands | None = None
    owns_store: bool = True  # False when a test handed the store in: it closes it itself
    stopped: bool = field(default=False, init=False)

    def start(self) -> None:
        """Follow tasks, take over orphaned ones, deliver ended ones, set the bot's webhook: in each worker."""
        self.lifecycle.start()
        self.deliveries.start()
        for bot in (self.telegram, self.discord, self.slack):
            if bot is not None:
                bot.start()

    def stop(self) -> None:
        """Stop all background work (bounded), hand pending tasks over at once, and let go of the store. Once."""
        if self.stopped:
            return
        self.stopped = True
        self.background.begin_stop()
        self.lifecycle.answer_waiters()  # before waiting: a chat's generation waits in the background too
        self.background.wait(STOP_TIMEOUT)
        self.lifecycle.retire()  # after the keeper has stopped, so no heartbeat renews the lease again
        if self.owns_store:
            self.store.close()


EXTENSION = "nanobanana"
STOP_TIMEOUT = 5.0  # seconds background work gets to finish when a worker stops


def parts() -> Parts:
    """The parts of the app handling the current request."""
    return current_app.extensions[EXTENSION]
