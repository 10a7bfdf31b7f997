"""POST /nanobanana/uploads: a picture from the caller's device, kept where the upstream can fetch it (CONTRACT §14).

The picture comes as the multipart form field `file`, or as the whole body with an image content type.
Only this route takes a body larger than MAX_BODY_BYTES (web/worker.py gives it UPLOAD_MAX_BYTES and
more time); nothing reads it before the view, so the limit below is the one that applies.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from config import UPLOAD_FORM_ROOM, UPLOAD_PATH, size_in_words
from errors import InvalidRequest, NotAPicture, TooLarge
from web.parts import parts

bp = Blueprint("uploads", __name__)

UPLOAD_ENDPOINT = "uploads.upload"
IN_MEMORY = 1024 * 1024  # a larger picture waits in a temporary file
HOW_TO_SEND = (
    'Send the picture as the form field "file" (multipart/form-data), or as the whole body with its own '
    "content type (like Content-Type: image/jpeg)."
)


@bp.post(UPLOAD_PATH, endpoint="upload")
def upload():
    uploads = parts().uploads
    uploads.check_usable()
    limit = parts().settings.upload_max_bytes
    request.max_content_length = limit + UPLOAD_FORM_ROOM
    try:
        with received_picture(limit) as (content, size):
            kept = uploads.take(content, size)
    except RequestEntityTooLarge:
        raise too_large(limit) from None
    response = jsonify(url=kept.url, content_type=kept.content_type, bytes=kept.size)
    response.status_code = 201
    response.headers["Location"] = kept.url
    return response


@contextmanager
def received_picture(limit: int) -> Iterator[tuple[IO[bytes], int]]:
    """The picture sent, as a file at its start, and its size in bytes."""
    if request.mimetype == "multipart/form-data":
        sent = request.files.get("file")
        if sent is None:
            raise InvalidRequest('The form has no field "file". ' + HOW_TO_SEND)
        content = sent.stream
        yield checked(content, size_of(content), limit)
    elif request.mimetype.startswith("image/"):
        with tempfile.SpooledTemporaryFile(max_size=IN_MEMORY) as content:
            size = 0
            while chunk := request.stream.read(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                content.write(chunk)
            content.seek(0)
            yield checked(content, size, limit)
    else:
        raise NotAPicture(f"The body was sent as {request.mimetype or 'nothing'}. {HOW_TO_SEND}")


def size_of(content: IO[bytes]) -> int:
    size = content.seek(0, 2)
    content.seek(0)
    return size


def checked(content: IO[bytes], size: int, limit: int) -> tuple[IO[bytes], int]:
    if size == 0:
        raise InvalidRequest("The picture is empty. " + HOW_TO_SEND)
    if size > limit:
        raise too_large(limit)
    return content, size


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"The picture is larger than {size_in_words(limit)}. Please send a smaller one.")
