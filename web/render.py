"""How answers are written: a task as JSON, text or a redirect; a conversation's history; plain text."""

from __future__ import annotations

import time

from flask import g, jsonify, make_response, redirect, request, url_for

from domain.answers import task_answer
from stores.records import Picture, TaskRecord, TaskState
from web.parts import parts


def render_task(record: TaskRecord, elapsed: float, queue_position: int | None = None):
    """The answer for a task (domain/answers.py) as JSON, text or a redirect; a waiting one says where to look."""
    fmt = g.get("response_format", "json")
    g.task_id = record.task_id
    status_url = None
    if record.state in (TaskState.QUEUED, TaskState.PENDING):
        status_url = external_url(url_for("generation.task_status", task_id=record.task_id))
    status, body = task_answer(record, elapsed, status_url, queue_position)
    if fmt == "redirect" and status == 200:
        return redirect(record.image_urls[0], code=302)
    if fmt == "text":
        response = text_response(answer_text(body), status)
    else:
        response = jsonify(body)
        response.status_code = status
    if status_url:
        response.headers["Location"] = status_url
    return response


def external_url(path: str) -> str:
    """The address of one of the service's paths, for a caller: under PUBLIC_BASE_URL when it is set (never a
    Host header a caller made up), else as this request reached the service."""
    base = parts().settings.public_base_url or request.host_url.rstrip("/")
    return base + path


def answer_text(body: dict) -> str:
    """format=text: the picture addresses one per line, or the message."""
    if body["status"] == "success":
        return "\n".join(body["image_urls"]) + "\n"
    return (body.get("message") or body["error"]["message"]) + "\n"


def history_body(user_id: str, chain: list[Picture]) -> dict:
    """A conversation as GET /nanobanana/history/<user_id> shows it: the remembered picture and the chain."""
    last = chain[-1] if chain else None
    return {
        "user_id": user_id,
        "last_image_url": last.image_url if last else None,
        "updated_at": iso8601(last.created_at) if last else None,
        "chain": [
            {
                "task_id": picture.task_id,
                "image_url": picture.image_url,
                "prompt": picture.prompt,
                "created_at": iso8601(picture.created_at),
            }
            for picture in chain
        ],
    }


def text_response(text: str, status: int):
    response = make_response(text, status)
    response.mimetype = "text/plain"
    return response


def iso8601(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
