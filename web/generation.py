"""Making pictures: GET/POST /nanobanana, and GET /nanobanana/tasks/<task_id>."""

from __future__ import annotations

import time

from flask import Blueprint, g, request
from werkzeug.exceptions import MethodNotAllowed

from domain.params import parse_format, parse_generation, parse_status_wait
from domain.waiting import WAITING
from errors import ServiceError, UnknownTask
from web.inputs import request_values
from web.parts import parts
from web.render import render_task

bp = Blueprint("generation", __name__)


@bp.route("/nanobanana", methods=["GET", "POST"])
def generate():
    if request.method == "HEAD":  # Flask adds HEAD to every GET route; here it would start a paid picture
        raise MethodNotAllowed(valid_methods=["GET", "POST"])
    values = request_values()
    g.response_format = parse_format(values)
    wanted = parse_generation(
        values,
        parts().settings.polling_window,
        idempotency_header=request.headers.get("Idempotency-Key"),
        prefer_header=request.headers.get("Prefer"),
    )
    lifecycle = parts().lifecycle
    with parts().metrics.generating():
        record = lifecycle.generate(wanted, g.owner)
    response = render_task(record, time.monotonic() - g.started, lifecycle.queue_position(record))
    if wanted.preference_applied:
        response.headers["Preference-Applied"] = wanted.preference_applied
    return response


@bp.get("/nanobanana/tasks/<task_id>")
def task_status(task_id: str):
    values = request_values()
    g.response_format = parse_format(values)
    wait = parse_status_wait(values, parts().settings.polling_window)
    lifecycle = parts().lifecycle
    record = lifecycle.task(task_id, g.owner)
    if record is None:
        raise UnknownTask()
    if wait and record.state in WAITING:  # a long poll: the answer comes the moment the task ends
        record = lifecycle.wait(record, wait)
    elapsed = (record.completed_at or time.time()) - record.created_at
    return render_task(record, elapsed, lifecycle.queue_position(record))


@bp.delete("/nanobanana/tasks/<task_id>")
def cancel_task(task_id: str):
    """Cancel a queued task: it is never submitted (CONTRACT §11)."""
    record = parts().lifecycle.cancel(task_id, g.owner)
    if record is None:
        raise UnknownTask()
    return {"status": "cancelled", "task_id": record.task_id}


@bp.post("/nanobanana/callback")
def upstream_callback():
    """In the route map for OpenAPI and for 405 on other methods; web/upstream_callbacks.py answers the POSTs."""
    raise ServiceError("The callback receiver was bypassed.")
