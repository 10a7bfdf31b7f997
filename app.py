"""The Flask app: routes, the way a generation travels, and the one mapping of errors to statuses."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from urllib.parse import parse_qs

from flask import Blueprint, Flask, current_app, g, jsonify, make_response, redirect, render_template, request, url_for
from flask_limiter import Limiter
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import openapi
import telemetry
from config import Settings, load_settings
from nanobanana_client import (
    CALLBACK_PLACEHOLDER,
    Generation,
    NanoBananaClient,
    NanoBananaError,
    Task,
    TaskStatus,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    callback_task_id,
    parse_callback,
)
from params import InvalidParameter, parse_format, parse_generation, parse_user_id
from store import MemoryStore, RedisStore, Store, StoreUnavailable, TaskRecord

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024

bp = Blueprint("nanobanana", __name__)


class ApiError(Exception):
    """An error answer: HTTP status, stable code, plain message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class Service:
    """What a generation request needs, created once per app."""

    settings: Settings
    client: NanoBananaClient
    store: Store

    def generate(
        self, generation: Generation, user_id: str | None, reset: bool, wait: float, owner: str = ""
    ) -> TaskRecord:
        """Submit, record, and wait up to `wait` seconds in all; a task still running is followed in the background."""
        deadline = time.monotonic() + wait
        if not self.settings.configured:
            raise ApiError(503, "not_configured", "This service has no API key yet. Its owner needs to set API_KEYS_1.")
        conversation = conversation_key(owner, user_id)
        if reset and conversation:
            self.store.forget(conversation)
        generation, used_previous = self._choose_images(generation, conversation)
        secret = secrets.token_urlsafe(18) if self.settings.callbacks else None
        task = self.client.submit(generation, self._callback_url(secret))
        record = self.store.add_task(
            TaskRecord(
                task_id=task.task_id,
                key_number=task.key_number,
                user_id=user_id,
                mode="image-to-image" if generation.image_urls else "text-to-image",
                source_image_urls=generation.image_urls,
                used_previous_image=used_previous,
                created_at=time.time(),
                callback_secret=secret,
                owner=owner,
                conversation=conversation,
            )
        )
        record = self._await(record, task, max(0.0, deadline - time.monotonic()))
        if record.state == "pending":
            threading.Thread(
                target=self._follow, args=(record, task), name=f"follow-{task.task_id}", daemon=True
            ).start()
        return record

    def receive_callback(self, secret: str, body) -> str:
        """Record the end of a task from its callback, if the callback is genuine, and wake its waiters."""
        task_id = callback_task_id(body)
        if task_id is None:
            raise InvalidParameter("A callback needs a JSON body with data.taskId.")
        record = self.store.task(task_id)
        if record is None or not record.callback_secret or not hmac.compare_digest(record.callback_secret, secret):
            log.warning("ignored a callback for task %s: not a task of ours, or not from the upstream", task_id)
            return task_id
        status = parse_callback(body)
        if record.state != "pending" or status is None:
            return task_id  # a repeated delivery, or one we cannot read: the fallback polls will tell
        self.store.complete_task(task_id, status.state, status.image_urls, status.error_message)
        self.store.notify(task_id)
        return task_id

    def refresh(self, record: TaskRecord) -> TaskRecord:
        """Ask the upstream once (at most once per poll interval) about a task that is still pending."""
        if record.state != "pending" or not self.store.claim_poll(record.task_id, self.settings.poll_interval):
            return record
        try:
            status = self.client.status(Task(record.task_id, record.key_number, record.created_at))
        except NanoBananaError as failure:
            log.info("status of task %s unknown: %s", record.task_id, failure.message)
            return record
        return self._complete(record, status) if status.done else record

    def _choose_images(self, generation: Generation, conversation: str | None) -> tuple[Generation, bool]:
        """Explicit images first, else the user's remembered image, else none."""
        if generation.image_urls or not conversation:
            return generation, False
        remembered = self.store.remembered_image(conversation)
        if remembered is None:
            return generation, False
        return replace(generation, image_urls=(remembered.image_url,)), True

    def _await(self, record: TaskRecord, task: Task, timeout: float) -> TaskRecord:
        """Wait for the task's end: polling, and with callbacks on, until a callback wakes us."""
        if self.settings.callbacks:
            with self.store.listen(task.task_id) as woken:
                status = self.client.wait(task, timeout, wake=woken)
        else:
            status = self.client.wait(task, timeout)
        if status.done:
            return self._complete(record, status)
        if self.settings.callbacks:  # a callback may have recorded the end meanwhile
            return self.store.task(task.task_id) or record
        return record

    def _follow(self, record: TaskRecord, task: Task) -> None:
        """Go on waiting for a task whose caller stopped waiting, so its result is remembered when it comes."""
        self._await(record, task, self.settings.polling_window)

    def _callback_url(self, secret: str | None) -> str:
        if secret is None:
            return CALLBACK_PLACEHOLDER
        return f"{self.settings.public_base_url}/nanobanana/callback?secret={secret}"

    def _complete(self, record: TaskRecord, status: TaskStatus) -> TaskRecord:
        """Record the task's end; if the store is away, the caller still gets the picture."""
        try:
            return self.store.complete_task(record.task_id, status.state, status.image_urls, status.error_message)
        except StoreUnavailable:
            log.error("could not record the end of task %s: the store is unavailable", record.task_id)
            return replace(record, state=status.state, image_urls=status.image_urls, error_message=status.error_message)


class CallbackReceiver:
    """Answers the upstream's `POST /nanobanana/callback` below Flask; everything else goes on to Flask.

    The upstream calls back once per task, and when many tasks end together, many at once. Through
    Flask's request machinery a callback cost as much CPU as a submission, so a queue built up behind
    a burst (README, The benchmark); here it costs a fraction. The rules stay the same as on every
    route: `to_api_error` for failures, the error body, X-Request-ID, the request log line and metrics.
    """

    PATH = "/nanobanana/callback"

    def __init__(self, app: Flask, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != self.PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        started = time.monotonic()
        request_id = telemetry.request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        task_id = None
        try:
            secret = parse_qs(environ.get("QUERY_STRING", "")).get("secret", [""])[0]
            task_id = self.app.extensions["nanobanana"].receive_callback(secret, self._json_body(environ))
            status, body = 200, {"status": "ok"}
        except Exception as error:  # noqa: BLE001 - mapped like on every route, by to_api_error
            api_error = to_api_error(error)
            status, body = api_error.status, error_body(api_error)
        payload = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(f"{status} {HTTPStatus(status).phrase}", [*headers, ("X-Request-ID", request_id)])
        metrics = self.app.extensions["metrics"]
        metrics.answered(self.PATH, "POST", self.PATH, status, time.monotonic() - started, request_id, task_id)
        return [payload]

    @staticmethod
    def _json_body(environ):
        raw = environ["wsgi.input"].read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, *HTTP_ERRORS[413])
        try:
            return json.loads(raw)
        except ValueError:
            return None  # receive_callback then says what a callback needs


def create_app(settings: Settings | None = None, *, session=None, store: Store | None = None) -> Flask:
    """Build the app; tests pass their own settings and HTTP session."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.wsgi_app = CallbackReceiver(app, ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1))
    metrics = telemetry.init_app(app, settings.metrics_dir)
    app.before_request(require_access_token)  # before the rate limit: strangers spend nobody's quota
    poll_interval, poll_max_attempts = settings.poll_schedule
    client = NanoBananaClient(
        settings.api_base,
        settings.api_keys,
        session=session,
        poll_interval=poll_interval,
        poll_max_attempts=poll_max_attempts,
        connect_timeout=settings.connect_timeout,
        submit_read_timeout=settings.submit_read_timeout,
        poll_read_timeout=settings.poll_read_timeout,
        credit_path=settings.credit_path,
        retry_backoff=settings.submit_retry_backoff,
        on_call=metrics.upstream_call,
    )
    store = store or new_store(settings)
    app.extensions["nanobanana"] = Service(settings, client, store)
    app.register_blueprint(bp)
    init_rate_limit(app, settings)
    app.register_error_handler(Exception, handle_error)
    if not settings.configured:
        log.warning("No API key is configured (API_KEYS_1, ...): generation requests will answer 503.")
    return app


def new_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.history_ttl)
    return MemoryStore(settings.history_ttl, settings.history_max_users)


def service() -> Service:
    return current_app.extensions["nanobanana"]


def conversation_key(owner: str, user_id: str | None) -> str | None:
    """Where a user's history lives: the same user id under two access tokens is two users."""
    if not user_id:
        return None
    return f"{owner}/{user_id}" if owner else user_id


# -- access and limits -------------------------------------------------------------------

OPEN_ENDPOINTS = {
    "nanobanana.upstream_callback",
    "nanobanana.healthz",
    "nanobanana.openapi",
    "nanobanana.home",
    "static",
}


def require_access_token() -> None:
    """With ACCESS_TOKENS set, every route but the open ones needs one of them."""
    g.owner = ""
    tokens = service().settings.access_tokens
    if not tokens or request.endpoint is None or request.endpoint in OPEN_ENDPOINTS:
        return
    token = matching_token(presented_token(), tokens)
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "This service needs an access token. Send it as the header 'Authorization: Bearer <token>' "
            "or add ?token=<token> to the address.",
            {"WWW-Authenticate": "Bearer"},
        )
    g.owner = hashlib.sha256(token.encode()).hexdigest()[:16]


def presented_token() -> str:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return (request_values().get("token") or [""])[0]


def matching_token(given: str, tokens: tuple[str, ...]) -> str | None:
    """Compare with every token in constant time, so timing tells nothing about any of them."""
    found = None
    for token in tokens:
        if hmac.compare_digest(given.encode(), token.encode()):
            found = token
    return found


def init_rate_limit(app: Flask, settings: Settings) -> None:
    """RATE_LIMIT on generation requests, per user (within its token), else per client address."""
    limiter = Limiter(
        key_func=rate_limit_key,
        app=app,
        storage_uri=settings.redis_url or "memory://",
        headers_enabled=True,
        key_prefix="nanobanana-limits",
        enabled=settings.rate_limit is not None,
        # Redis away: count in memory meanwhile; the request itself then gets the store's clear 503.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    endpoint = "nanobanana.generate"
    limiter.request_filter(lambda: request.endpoint != endpoint)  # every other request skips the limiter at once
    if settings.rate_limit:
        app.view_functions[endpoint] = limiter.limit(settings.rate_limit)(app.view_functions[endpoint])


def rate_limit_key() -> str:
    try:
        user_id = parse_user_id(request_values())
    except InvalidParameter:
        user_id = None
    if user_id:
        return f"user:{conversation_key(g.get('owner', ''), user_id)}"
    return f"address:{request.remote_addr}"


# -- routes ----------------------------------------------------------------------------


@bp.get("/", endpoint="home")
def home():
    """The page to try it: a prompt box, the picture, and this browser's conversation."""
    return render_template("index.html")


@bp.route("/nanobanana", methods=["GET", "POST"])
def generate():
    values = request_values()
    g.response_format = parse_format(values)
    wanted = parse_generation(values, service().settings.polling_window)
    with current_app.extensions["metrics"].in_flight.track_inprogress():
        record = service().generate(wanted.generation, wanted.user_id, wanted.reset, wanted.wait, g.owner)
    return render_task(record, elapsed=time.monotonic() - g.started)


@bp.get("/nanobanana/tasks/<task_id>")
def task_status(task_id: str):
    g.response_format = parse_format(request_values())
    record = service().store.task(task_id)
    if record is None or record.owner != g.owner:
        raise ApiError(404, "not_found", "There is no task with this id here. Tasks are kept for 24 hours.")
    record = service().refresh(record)
    return render_task(record, elapsed=(record.completed_at or time.time()) - record.created_at)


@bp.post("/nanobanana/callback")
def upstream_callback():
    """In the route map for OpenAPI and for 405 on other methods; CallbackReceiver answers the POSTs."""
    raise ApiError(500, "internal_error", "The callback receiver was bypassed.")


@bp.get("/nanobanana/history/<path:user_id>")
def history(user_id: str):
    user_id = checked_user_id(user_id)
    remembered = service().store.remembered_image(conversation_key(g.owner, user_id))
    return {
        "user_id": user_id,
        "last_image_url": remembered.image_url if remembered else None,
        "updated_at": iso8601(remembered.updated_at) if remembered else None,
    }


@bp.delete("/nanobanana/history/<path:user_id>")
def forget_history(user_id: str):
    user_id = checked_user_id(user_id)
    service().store.forget(conversation_key(g.owner, user_id))
    return {"user_id": user_id, "cleared": True}


@bp.get("/nanobanana/credits")
def credits():
    keys = service().client.credits()
    return {"keys": [{"key": k.key, "credits": k.credits, "usable": k.usable} for k in keys]}


@bp.get("/metrics")
def metrics():
    return telemetry.exposition(current_app)


@bp.get("/openapi.json", endpoint="openapi")
def openapi_document():
    return openapi.document(request.host_url, tokens_required=bool(service().settings.access_tokens))


@bp.get("/healthz")
def healthz():
    settings = service().settings
    return {
        "status": "ok",
        "configured": settings.configured,
        "api_keys": len(settings.api_keys),
        "store": settings.store_name,
    }


# -- reading requests ------------------------------------------------------------------


def request_values() -> dict[str, list[str]]:
    """Query string, form and JSON body merged into one mapping of names to lists of strings."""
    if "values" not in g:
        g.values = _merged_values()
    return g.values


def _merged_values() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    sources = [request.args.to_dict(flat=False)]
    if request.method == "POST":
        sources.append(request.form.to_dict(flat=False))
        sources.append(json_body_values())
    for source in sources:
        for name, items in source.items():
            values.setdefault(name, []).extend(items)
    return values


def json_body_values() -> dict[str, list[str]]:
    if not request.is_json:
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidParameter('The request body must be a JSON object, like {"prompt": "a red apple"}.')
    return {name: _as_strings(value) for name, value in body.items() if value is not None}


def _as_strings(value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(item).lower() if isinstance(item, bool) else str(item) for item in items if item is not None]


def checked_user_id(user_id: str) -> str:
    checked = parse_user_id({"user_id": [user_id]})
    if checked is None:
        raise InvalidParameter("Please name the user, for example /nanobanana/history/alice.")
    return checked


# -- writing answers -------------------------------------------------------------------


def render_task(record: TaskRecord, elapsed: float):
    """The answer for a task: 200 with its pictures, 202 while pending, 502 when it failed."""
    fmt = g.get("response_format", "json")
    g.task_id = record.task_id
    if record.state == "success":
        if fmt == "redirect":
            return redirect(record.image_urls[0], code=302)
        if fmt == "text":
            return text_response("\n".join(record.image_urls) + "\n", 200)
        return jsonify(
            status="success",
            task_id=record.task_id,
            mode=record.mode,
            image_url=record.image_urls[0],
            image_urls=list(record.image_urls),
            source_image_urls=list(record.source_image_urls),
            used_previous_image=record.used_previous_image,
            user_id=record.user_id,
            elapsed_seconds=round(elapsed, 2),
        )
    if record.state == "failed":
        message = record.error_message or "The image could not be made."
        if fmt == "text":
            return text_response(message + "\n", 502)
        body = {
            "status": "failed",
            "task_id": record.task_id,
            "error": {"code": "generation_failed", "message": message},
        }
        return jsonify(body), 502
    return render_pending(record, fmt)


def render_pending(record: TaskRecord, fmt: str):
    status_url = url_for("nanobanana.task_status", task_id=record.task_id, _external=True)
    message = f"Your picture is still being made. It will be ready at {status_url} in a few seconds."
    if fmt == "text":
        response = text_response(message + "\n", 202)
    else:
        response = jsonify(status="pending", task_id=record.task_id, status_url=status_url, message=message)
        response.status_code = 202
    response.headers["Location"] = status_url
    return response


def text_response(text: str, status: int):
    response = make_response(text, status)
    response.mimetype = "text/plain"
    return response


def iso8601(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# -- errors: the one place where exceptions become statuses ----------------------------

HTTP_ERRORS = {
    400: ("invalid_request", "The request could not be read. Please check its parameters and body."),
    404: ("not_found", "There is nothing at this address. Try /nanobanana?prompt=a+red+apple"),
    405: ("method_not_allowed", "This address does not take {method} requests. Use {allowed}."),
    413: ("too_large", "The request body is larger than 1 MiB. Please send a shorter request."),
    429: (
        "rate_limited",
        "Too many pictures asked for in a short time. Please wait a little and try again "
        "(the Retry-After header says how many seconds).",
    ),
}


def handle_error(error: Exception):
    api_error = to_api_error(error)
    if g.get("response_format") == "text":
        response = text_response(api_error.message + "\n", api_error.status)
    else:
        response = jsonify(error_body(api_error))
        response.status_code = api_error.status
    response.headers.update(api_error.headers)
    return response


def error_body(api_error: ApiError) -> dict:
    return {"status": "error", "error": {"code": api_error.code, "message": api_error.message}}


def to_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidParameter):
        return ApiError(400, "invalid_request", error.message)
    if isinstance(error, UpstreamRejected):
        return ApiError(400, "invalid_request", error.message)
    if isinstance(error, UpstreamUnavailable):
        headers = {"Retry-After": str(round(error.retry_after))} if error.retry_after else {}
        return ApiError(503, "upstream_unavailable", error.message, headers)
    if isinstance(error, UpstreamError):
        return ApiError(502, "upstream_error", error.message)
    if isinstance(error, StoreUnavailable):
        log.error("store unavailable: %s", error)
        message = "The service cannot reach its memory (Redis) right now. Please try again in a minute."
        return ApiError(503, "store_unavailable", message, {"Retry-After": "30"})
    if isinstance(error, HTTPException):
        return http_api_error(error)
    log.exception("unexpected error", exc_info=error)
    return ApiError(500, "internal_error", "Something went wrong on our side. Please try again in a minute.")


def http_api_error(error: HTTPException) -> ApiError:
    status = error.code or 500
    code, message = HTTP_ERRORS.get(
        status, ("invalid_request" if status < 500 else "internal_error", error.description)
    )
    if status == 405:
        allowed = " or ".join(sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"})) or "GET"
        message = message.format(method=request.method, allowed=allowed)
    headers = {"Allow": ", ".join(error.valid_methods)} if status == 405 and error.valid_methods else {}
    return ApiError(status, code, message, headers)
