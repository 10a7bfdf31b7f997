"""A caller's conversations: GET and DELETE /nanobanana/history/<user_id>, and POST …/undo (CONTRACT §9)."""

from __future__ import annotations

from flask import Blueprint, g
from werkzeug.exceptions import MethodNotAllowed

from domain.conversations import conversation_key
from domain.params import parse_user_id
from errors import InvalidRequest, NothingToUndo
from web.parts import parts
from web.render import history_body

bp = Blueprint("history", __name__)


@bp.get("/nanobanana/history/<path:user_id>")
def history(user_id: str):
    user_id = checked_user_id(not_the_undo_address(user_id))
    return history_body(user_id, parts().conversations.chain(conversation_key(g.owner, user_id)))


@bp.post("/nanobanana/history/<path:user_id>/undo")
def undo(user_id: str):
    """The remembered picture steps back to the one before it; the last one leaves the chain."""
    user_id = checked_user_id(user_id)
    conversation = conversation_key(g.owner, user_id)
    if parts().conversations.undo(conversation) is None:
        raise NothingToUndo()
    return history_body(user_id, parts().conversations.chain(conversation))


@bp.delete("/nanobanana/history/<path:user_id>")
def forget(user_id: str):
    """Forget the chain, and remove the lasting copies of its pictures."""
    user_id = checked_user_id(not_the_undo_address(user_id))
    parts().conversations.forget(conversation_key(g.owner, user_id))
    return {"user_id": user_id, "cleared": True}


def not_the_undo_address(user_id: str) -> str:
    """User ids may hold a slash, so .../history/<id>/undo would also read as a user: it is undo's, POST only."""
    if user_id.endswith("/undo"):
        raise MethodNotAllowed(valid_methods=["POST"])
    return user_id


def checked_user_id(user_id: str) -> str:
    checked = parse_user_id({"user_id": [user_id]})
    if checked is None:
        raise InvalidRequest("Please name the user, for example /nanobanana/history/alice.")
    return checked
