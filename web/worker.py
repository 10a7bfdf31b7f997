"""The gunicorn worker: gevent, with the service's own rules at the HTTP edge.

gunicorn answers a request it cannot parse with an HTML page, and logs its raw request line (which
may carry a token or a prompt). This worker answers such requests with the service's JSON error
body and logs only what kind of error it was. It also bounds what a client may hold:
- the request line: a GET may carry a 20,000-character prompt (up to about 240 KB percent-encoded),
  but gunicorn's own limit stops at 8 KB, or else reads without end; here it is REQUEST_LINE_LIMIT;
- the body: it must arrive within BODY_TIMEOUT seconds, so a client that sends one byte a second,
  or a chunked body without end, holds a connection for seconds, not for ever.
The head of a request (line and headers) has gunicorn's keep-alive time-out (2 s) to arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from http import HTTPStatus

import gevent
from gunicorn.http import errors
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    InternalServerError,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
    RequestURITooLarge,
)

from config import BODY_TIMEOUT, MAX_BODY_BYTES, REQUEST_LINE_LIMIT, UPLOAD_BODY_TIMEOUT, UPLOAD_FORM_ROOM, UPLOAD_PATH

log = logging.getLogger("nanobanana.edge")

LINGER_SECONDS = 1.0  # after an error, read what the client still sends, so it gets the answer (no reset)


def late(seconds: float) -> str:
    return f"The request body did not arrive within {seconds:g} seconds. Please send it again, all at once."


class BodyTimeout(RequestTimeout):
    """The body did not arrive in time: the app answers 408 (werkzeug would call an OSError a disconnect)."""

    seconds = BODY_TIMEOUT
    description = late(seconds)


class UploadTimeout(BodyTimeout):
    seconds = UPLOAD_BODY_TIMEOUT
    description = late(seconds)


class MalformedBody(BadRequest):
    description = "The request body is not valid HTTP (a broken chunk), so it could not be read."


DROP_READS = 64  # of 64 KiB: what is read and dropped of a body that is too large, at most


class BodyTooLarge(RequestEntityTooLarge):
    """A chunked body longer than MAX_BODY_BYTES: werkzeug, which knows no length for it, would cut it short."""


class BodyReader:
    """gunicorn's body reader, with a deadline and a size limit; its failures are HTTP errors the app answers like
    any other.

    gunicorn closes the connection after any of them, since where the next request starts is unknown.
    """

    def __init__(self, reader, timeout: type[BodyTimeout] = BodyTimeout, limit: int = MAX_BODY_BYTES):
        self.reader = reader
        self.timeout = timeout  # the error when the body is late: a class, made only if it fires
        self.deadline = time.monotonic() + timeout.seconds
        self.limit = limit
        self.read_so_far = 0

    def read(self, size):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.timeout()
        # A read that reaches the limit asks for one byte more: if it comes, the body is too long.
        reaches_limit = size is not None and size >= 0 and self.read_so_far + size >= self.limit
        try:
            with gevent.Timeout(remaining, self.timeout):
                data = self.reader.read(size + 1 if reaches_limit else size)
        except errors.ParseException:
            raise MalformedBody() from None
        self.read_so_far += len(data)
        if self.read_so_far > self.limit:
            self._drop_the_rest(remaining)
            raise BodyTooLarge()
        return data

    def _drop_the_rest(self, seconds: float) -> None:
        """Read what follows (a few MB at most) and drop it: a close on unread data would reset the connection, and
        the client would lose the answer that says the body is too large."""
        with gevent.Timeout(seconds, False), contextlib.suppress(errors.ParseException, OSError):
            for _ in range(DROP_READS):
                if not self.reader.read(64 * 1024):
                    return


class ServiceRequest(Request):
    upload_limit = MAX_BODY_BYTES  # the worker sets UPLOAD_MAX_BYTES here once the app is loaded

    def read_line(self, unreader, buf, limit=0):
        """The request line, up to REQUEST_LINE_LIMIT (gunicorn's setting stops at 8 KB)."""
        return super().read_line(unreader, buf, REQUEST_LINE_LIMIT)

    def set_body_reader(self):
        super().set_body_reader()
        if self.path == UPLOAD_PATH:  # a picture: larger, and from a phone on a slow line perhaps
            self.body.reader = BodyReader(self.body.reader, UploadTimeout, self.upload_limit + UPLOAD_FORM_ROOM)
        else:
            self.body.reader = BodyReader(self.body.reader)


class Worker(GeventWorker):
    def load_wsgi(self):
        super().load_wsgi()
        ServiceRequest.upload_limit = self.wsgi.config["UPLOAD_MAX_BYTES"]

    def init_process(self):
        # gunicorn builds its parser inside the connection handler; its message class is the hook it offers.
        RequestParser.mesg_class = ServiceRequest
        super().init_process()

    def handle_error(self, req, client, addr, exc):
        """Answer what gunicorn could not parse (or could not serve) with the service's JSON error body."""
        if isinstance(exc, (BodyTimeout, MalformedBody, BodyTooLarge)):
            # Met while skipping a body the app did not read, after its answer: the connection closes, once the
            # client had a moment to read that answer (closing on unread data would reset it).
            with contextlib.suppress(OSError):
                linger(client)
            return
        refusal = http_refusal(exc)
        if isinstance(refusal, InternalServerError):
            log.error("could not answer a request (%s)", type(exc).__name__, exc_info=exc)
        else:  # the class of the error only: the raw request line may carry a token or a prompt
            log.warning("refused a request that is not valid HTTP (%s, %d)", type(exc).__name__, refusal.code)
        # Imported here, in the worker after gevent patched the standard library, not in gunicorn's arbiter.
        from web.errors import describe_error

        status, body = describe_error(refusal)
        payload = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        try:
            client.sendall(head.encode("latin-1") + payload)
            linger(client)
        except OSError:
            log.debug("the client left before its error answer was sent")


def http_refusal(exc: BaseException) -> HTTPException:
    """The HTTP error for what gunicorn raised, with words for the caller (the app renders it)."""
    if isinstance(exc, errors.LimitRequestLine):
        return RequestURITooLarge(
            f"The address is longer than {REQUEST_LINE_LIMIT // 1024} KiB. "
            "Send long prompts in the body of a POST instead."
        )
    if isinstance(exc, errors.LimitRequestHeaders):
        return RequestHeaderFieldsTooLarge("A request header is too large, or there are too many of them.")
    if isinstance(exc, errors.ParseException):
        return BadRequest("The request is not valid HTTP, so it could not be read.")
    return InternalServerError()


def linger(client: socket.socket) -> None:
    """Half-close, then read what is left for a moment: closing with unread data would reset the connection
    and could destroy the answer before the client reads it."""
    client.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    with gevent.Timeout(LINGER_SECONDS, False):
        while time.monotonic() < deadline and client.recv(65536):
            pass
