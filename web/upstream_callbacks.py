"""The receiver of the upstream's callbacks: `POST /nanobanana/callback`, answered below Flask.

The upstream calls back once per task, and when many tasks end together, many at once. Through
Flask's request machinery a callback cost as much CPU as a submission, so a queue built up behind
a burst (docs/benchmark.md); here it costs a fraction. The rules stay those of every route:
the app's one error mapping, its error body, X-Request-ID, the request log line and metrics.
What a callback means is the lifecycle's business (`Lifecycle.receive_callback`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs

from config import MAX_BODY_BYTES
from errors import TooLarge
from web import telemetry


class CallbackReceiver:
    PATH = "/nanobanana/callback"

    def __init__(self, wsgi_app, lifecycle, metrics: telemetry.Metrics, describe_error: Callable):
        """`describe_error(exception)` gives the (status, JSON body) the app answers for it."""
        self.wsgi_app = wsgi_app
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.describe_error = describe_error

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != self.PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        started = time.monotonic()
        request_id = telemetry.request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        task_id = None
        try:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            ours, secret = query.get("task", [""])[0], query.get("secret", [""])[0]
            task_id = self.lifecycle.receive_callback(ours, secret, self._json_body(environ))
            status, body = 200, {"status": "ok"}
        except Exception as error:  # noqa: BLE001 - mapped like on every route
            status, body = self.describe_error(error)
        payload = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(f"{status} {HTTPStatus(status).phrase}", [*headers, ("X-Request-ID", request_id)])
        self.metrics.answered(self.PATH, "POST", self.PATH, status, time.monotonic() - started, request_id, task_id)
        return [payload]

    @staticmethod
    def _json_body(environ):
        declared = environ.get("CONTENT_LENGTH", "")
        # Never read past the declared length: a server may keep the connection open after it (werkzeug's does).
        size = min(int(declared), MAX_BODY_BYTES + 1) if declared.isdigit() else MAX_BODY_BYTES + 1
        raw = environ["wsgi.input"].read(size)
        if len(raw) > MAX_BODY_BYTES:
            raise TooLarge()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return None  # receive_callback then says what a callback needs
