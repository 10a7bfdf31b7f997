"""Where chat platforms post: POST /telegram/webhook, POST /discord/interactions, POST /slack/commands.
The platform's own rules (its secret or signature, its message format) are its channel's (channels/); this
is only the HTTP side."""

from __future__ import annotations

from flask import Blueprint, request

from errors import InvalidRequest, NotFound
from web.inputs import parse_json
from web.parts import parts

bp = Blueprint("chats", __name__)


@bp.post("/telegram/webhook", endpoint="telegram")
def telegram_webhook():
    """Telegram's updates: answered at once, handled in the background."""
    bot = parts().telegram
    if bot is None:
        raise NotFound("This service runs no Telegram bot.")
    bot.check_secret(request.headers.get("X-Telegram-Bot-Api-Secret-Token", ""))
    try:
        update = parse_json(request.get_data())
    except InvalidRequest:
        update = None  # take_update says what an update needs
    bot.take_update(update)
    return {"ok": True}


@bp.post("/discord/interactions", endpoint="discord")
def discord_interactions():
    """Discord's interactions, signed: answered at once (a picture deferred, made in the background)."""
    bot = parts().discord
    if bot is None:
        raise NotFound("This service runs no Discord bot.")
    body = request.get_data()
    bot.verify(request.headers.get("X-Signature-Ed25519", ""), request.headers.get("X-Signature-Timestamp", ""), body)
    return bot.take_interaction(parse_json(body))


@bp.post("/slack/commands", endpoint="slack")
def slack_commands():
    """Slack's slash commands, signed: answered at once (seen by the person), the picture posted later."""
    commands = parts().slack
    if commands is None:
        raise NotFound("This service runs no Slack command.")
    body = request.get_data()
    commands.verify(
        request.headers.get("X-Slack-Signature", ""), request.headers.get("X-Slack-Request-Timestamp", ""), body
    )
    return commands.take_command(body)
