"""The Flask app factory: builds the service's parts once, registers the blueprints, and maps every error.

gunicorn starts `app:create_app()` (the Procfile); each worker then runs `start_background(app)` and,
when it stops, `stop_background(app)` (gunicorn.conf.py). Tests build a fresh app the same way, handing
in their own settings, upstream session, store and the sessions of the other outbound calls.
"""

from __future__ import annotations

import logging

import requests
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from background import Background
from channels.chat import ChatFront
from channels.discord import SCHEME as DISCORD
from channels.discord import DiscordApi, DiscordBot
from channels.slack import SCHEME as SLACK
from channels.slack import SlackCommands
from channels.telegram import SCHEME as TELEGRAM
from channels.telegram import BotApi, TelegramBot
from config import MAX_BODY_BYTES, Settings, load_settings
from domain.conversations import Conversations
from domain.deliveries import Channel, Deliveries
from domain.lifecycle import Lifecycle
from domain.media import local_media, open_media
from domain.uploads import Uploads
from domain.webhooks import SCHEMES, WebhookChannel
from nanobanana_client import NanoBananaClient
from stores import open_store
from stores.interface import Store
from web import chats, generation, history, ops, telemetry, uploads
from web.access import init_access, limit_spender
from web.errors import describe_error, handle_error
from web.inputs import request_values
from web.parts import EXTENSION, Parts
from web.upstream_callbacks import CallbackReceiver

log = logging.getLogger(__name__)

BLUEPRINTS = (generation.bp, uploads.bp, history.bp, ops.bp, chats.bp)


def create_app(
    settings: Settings | None = None,
    *,
    session: requests.Session | None = None,
    store: Store | None = None,
    webhook_session: requests.Session | None = None,
    media_session: requests.Session | None = None,
    bot_session: requests.Session | None = None,
) -> Flask:
    """Build the app. `session` reaches the upstream; the other sessions reach callers' webhooks, pictures to
    copy and the chat platforms' APIs. Background work starts with start_background(app)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["UPLOAD_MAX_BYTES"] = settings.upload_max_bytes  # for the gunicorn worker (web/worker.py)
    app.json.sort_keys = False
    metrics = telemetry.init_app(app, settings.metrics_dir)
    parts = build_parts(settings, metrics, session, store, webhook_session, media_session)
    app.extensions[EXTENSION] = parts
    hops = settings.proxy_hops
    proxied = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.wsgi_app = CallbackReceiver(proxied, parts.lifecycle, metrics, describe_error)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    init_access(app, settings, request_values, parts.store)
    add_chat_fronts(app, parts, bot_session)
    app.register_error_handler(Exception, handle_error)
    if not settings.configured:
        log.warning("No API key is configured (API_KEYS_1, ...): generation requests will answer 503.")
    return app


def add_chat_fronts(app: Flask, parts: Parts, bot_session: requests.Session | None) -> None:
    """The chat platforms whose settings are given, each a channel of the deliveries."""
    settings = parts.settings

    def front(platform: str) -> ChatFront:
        return ChatFront(platform, settings, parts.lifecycle, parts.conversations, limit_spender(app, settings))

    if settings.telegram_bot_token:
        api = BotApi(settings.telegram_api_base, settings.telegram_bot_token, bot_session)
        parts.telegram = TelegramBot(settings, front("telegram"), parts.store, api, parts.background, parts.media)
        parts.deliveries.add_channel(TELEGRAM, parts.telegram)
    if settings.discord_public_key:
        api = DiscordApi(
            settings.discord_api_base, settings.discord_application_id, settings.discord_bot_token, bot_session
        )
        parts.discord = DiscordBot(settings, front("discord"), parts.store, api, parts.background)
        parts.deliveries.add_channel(DISCORD, parts.discord)
    if settings.slack_signing_secret:
        parts.slack = SlackCommands(settings, front("slack"), parts.store, parts.background, bot_session)
        parts.deliveries.add_channel(SLACK, parts.slack)


def build_parts(settings, metrics, session, store, webhook_session, media_session) -> Parts:
    """The service's parts, each built once, in the order they depend on each other."""
    client = NanoBananaClient.from_settings(settings, session=session, on_call=metrics.upstream_call)
    owns_store = store is None
    store = store or open_store(settings)
    background = Background()
    media = open_media(settings, media_session)
    uploaded = Uploads(store, media or local_media(settings, media_session), settings.history_ttl, background)
    conversations = Conversations(store, media, background)
    channels: dict[str, Channel] = {}
    if settings.webhook_secret:
        webhooks = WebhookChannel(settings, webhook_session)
        channels.update(dict.fromkeys(SCHEMES, webhooks))
    deliveries = Deliveries(settings, store, background, channels, on_outcome=metrics.webhook_outcome)
    lifecycle = Lifecycle(
        settings,
        client,
        store,
        conversations,
        deliveries,
        background,
        media,
        uploaded,
        waited_in_queue=metrics.waited_in_queue,
    )
    return Parts(
        settings=settings,
        client=client,
        store=store,
        background=background,
        conversations=conversations,
        lifecycle=lifecycle,
        deliveries=deliveries,
        metrics=metrics,
        media=media,
        uploads=uploaded,
        owns_store=owns_store,
    )


def start_background(app: Flask) -> None:
    """Follow tasks, take over orphaned ones, deliver ended ones, set the bot's webhook: in each gunicorn worker."""
    app.extensions[EXTENSION].start()


def stop_background(app: Flask) -> None:
    """Stop the background work, hand pending tasks over, and close the store: when a worker stops."""
    app.extensions[EXTENSION].stop()
