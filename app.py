"""The Flask app: the factory, the routes, how answers are rendered, and the one mapping of errors to statuses."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time

from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

from channels.telegram import BotApi, TelegramBot, first_update
from config import Settings, load_settings
from domain.lifecycle import Lifecycle, NotConfigured, UnknownTask, conversation_key
from domain.media import CACHE_CONTROL, LocalMedia, open_media
from domain.params import json_values, parse_format, parse_generation, parse_user_id
from domain.webhooks import Webhooks
from errors import InvalidRequest
from nanobanana_client import NanoBananaClient, NanoBananaError, UpstreamRejected, UpstreamUnavailable
from stores.records import IdempotencyConflict, Picture, Store, StoreUnavailable, TaskRecord
from stores.redis import RedisStore
from stores.sqlite import SqliteStore
from web import openapi, telemetry
from web.access import Unauthorized, init_access, limit_spender, retry_after
from web.upstream_callbacks import MAX_BODY_BYTES, BodyTooLarge, CallbackReceiver

log = logging.getLogger(__name__)

bp = Blueprint("nanobanana", __name__)

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
MEDIA_MAX_AGE = 365 * 24 * 3600


class ApiError(Exception):
    """An error answer: HTTP status, stable code, plain message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def create_app(settings: Settings | None = None, *, session=None, store: Store | None = None) -> Flask:
    """Build the app; tests pass their own settings, HTTP session and store.

    The background work (lease renewal, taking over orphaned tasks, webhooks) starts with
    start_background(app); under gunicorn, gunicorn.conf.py does it in each worker.
    """
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    metrics = telemetry.init_app(app, settings.metrics_dir)
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
    store = store or open_store(settings)
    lifecycle = Lifecycle(settings, client, store, open_media(settings))
    app.extensions["lifecycle"] = lifecycle
    hops = settings.proxy_hops
    proxied = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.wsgi_app = CallbackReceiver(proxied, lifecycle, metrics, describe_error)
    app.register_blueprint(bp)
    limiter_storage = {"connection_pool": store.pool} if isinstance(store, RedisStore) else {}
    init_access(app, settings, request_values, limiter_storage)
    bot = None
    if settings.telegram_bot_token:
        api = BotApi(settings.telegram_api_base, settings.telegram_bot_token)
        bot = TelegramBot(settings, lifecycle, api, limit_spender(app, settings))
    app.extensions["telegram"] = bot
    webhooks = Webhooks(settings, store, webhook_body, on_outcome=metrics.webhook_outcome, chat=bot)
    app.extensions["webhooks"] = webhooks
    app.register_error_handler(Exception, handle_error)
    if not settings.configured:
        log.warning("No API key is configured (API_KEYS_1, ...): generation requests will answer 503.")
    return app


BACKGROUND = ("lifecycle", "webhooks", "telegram")  # the work each process does apart from requests


def start_background(app: Flask) -> None:
    """Follow tasks, take over orphaned ones, deliver webhooks, set the bot's webhook: in each gunicorn worker."""
    for part in BACKGROUND:
        if app.extensions[part] is not None:
            app.extensions[part].start()


def stop_background(app: Flask) -> None:
    for part in reversed(BACKGROUND):
        if app.extensions[part] is not None:
            app.extensions[part].stop()


def open_store(settings: Settings) -> Store:
    """Redis with REDIS_URL; otherwise the SQLite file at DATABASE_PATH."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.history_ttl)
    return SqliteStore(settings.database_path, settings.history_ttl, settings.history_max_users)


def lifecycle() -> Lifecycle:
    return current_app.extensions["lifecycle"]


# -- routes ----------------------------------------------------------------------------


@bp.get("/", endpoint="home")
def home():
    """The page to try it: a prompt box, the picture, and this browser's conversation."""
    return render_template("index.html")


@bp.route("/nanobanana", methods=["GET", "POST"])
def generate():
    if request.method == "HEAD":  # Flask adds HEAD to every GET route; here it would start a paid picture
        raise MethodNotAllowed(valid_methods=["GET", "POST"])
    values = request_values()
    g.response_format = parse_format(values)
    wanted = parse_generation(
        values,
        lifecycle().settings.polling_window,
        idempotency_header=request.headers.get("Idempotency-Key"),
        prefer_header=request.headers.get("Prefer"),
    )
    with current_app.extensions["metrics"].in_flight.track_inprogress():
        record = lifecycle().generate(wanted, g.owner)
    response = render_task(record, elapsed=time.monotonic() - g.started)
    if wanted.preference_applied:
        response.headers["Preference-Applied"] = wanted.preference_applied
    return response


@bp.get("/nanobanana/tasks/<task_id>")
def task_status(task_id: str):
    g.response_format = parse_format(request_values())
    record = lifecycle().task(task_id, g.owner)
    if record is None:
        raise ApiError(404, "not_found", "There is no task with this id here. Tasks are kept for 24 hours.")
    return render_task(record, elapsed=(record.completed_at or time.time()) - record.created_at)


@bp.post("/nanobanana/callback")
def upstream_callback():
    """In the route map for OpenAPI and for 405 on other methods; CallbackReceiver answers the POSTs."""
    raise ApiError(500, "internal_error", "The callback receiver was bypassed.")


@bp.get("/nanobanana/history/<path:user_id>")
def history(user_id: str):
    user_id = checked_user_id(not_the_undo_address(user_id))
    return history_body(user_id, lifecycle().store.chain(conversation_key(g.owner, user_id)))


@bp.post("/nanobanana/history/<path:user_id>/undo")
def undo(user_id: str):
    """The remembered picture steps back to the one before it; the last one leaves the chain."""
    user_id = checked_user_id(user_id)
    conversation = conversation_key(g.owner, user_id)
    if lifecycle().store.undo(conversation) is None:
        raise ApiError(409, "nothing_to_undo", "There is no picture to undo: this conversation has none yet.")
    return history_body(user_id, lifecycle().store.chain(conversation))


@bp.delete("/nanobanana/history/<path:user_id>")
def forget_history(user_id: str):
    """Forget the chain, and remove the lasting copies of its pictures."""
    user_id = checked_user_id(not_the_undo_address(user_id))
    dropped = lifecycle().store.forget(conversation_key(g.owner, user_id))
    if lifecycle().media is not None:
        lifecycle().media.delete([picture.image_url for picture in dropped])
    return {"user_id": user_id, "cleared": True}


@bp.post("/telegram/webhook")
def telegram_webhook():
    """Telegram's updates: only with the secret it was given; answered at once, handled in the background."""
    bot, settings = current_app.extensions["telegram"], lifecycle().settings
    if bot is None:
        raise ApiError(404, "not_found", "This service runs no Telegram bot.")
    given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), settings.telegram_webhook_secret.encode()):
        raise ApiError(401, "unauthorized", "This address takes updates only from Telegram.")
    update = request.get_json(silent=True)
    if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
        raise InvalidRequest("A Telegram update is a JSON object with an update_id.")
    if first_update(lifecycle().store, update["update_id"]):
        bot.receive(update)
    return {"ok": True}


@bp.get("/media/<name>", endpoint="media")
def media_file(name: str):
    """A lasting copy (MEDIA_STORE=local): never changes, so it may be cached for a year."""
    media = lifecycle().media
    path = media.path(name) if isinstance(media, LocalMedia) else None
    if path is None or not os.path.isfile(path):
        raise ApiError(404, "not_found", "There is no picture at this address.")
    response = send_file(path, max_age=MEDIA_MAX_AGE, conditional=True)
    response.headers["Cache-Control"] = CACHE_CONTROL
    # The file came from elsewhere: an SVG must not run anything in this origin.
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/nanobanana/credits")
def credits():
    keys = lifecycle().client.credits()
    return {"keys": [{"key": k.key, "credits": k.credits, "usable": k.usable} for k in keys]}


@bp.get("/metrics")
def metrics():
    return telemetry.exposition(current_app)


@bp.get("/openapi.json", endpoint="openapi")
def openapi_document():
    return openapi.document(request.host_url, tokens_required=bool(lifecycle().settings.access_tokens))


@bp.get("/healthz")
def healthz():
    """200 while the service can record generations; 503 "degraded" while its store cannot be reached."""
    settings = lifecycle().settings
    store_ok = lifecycle().store.ping()
    body = {
        "status": "ok" if store_ok else "degraded",
        "configured": settings.configured,
        "api_keys": len(settings.api_keys),
        "store": settings.store_name,
        "store_ok": store_ok,
        "demo": settings.demo,
    }
    return body, 200 if store_ok else 503


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
        sources.append(body_values())
    for source in sources:
        for name, items in source.items():
            values.setdefault(name, []).extend(items)
    return values


def body_values() -> dict[str, list[str]]:
    """The fields of a form or JSON body; a body of another kind is refused, not silently ignored."""
    if request.is_json:
        raw = request.get_data(cache=True)
        return json_values(parse_json(raw)) if raw.strip() else {}
    if request.mimetype in FORM_TYPES:
        return request.form.to_dict(flat=False)
    if request.content_length or request.get_data(cache=True):
        sent_as = request.mimetype or "without a Content-Type"
        raise InvalidRequest(
            f"The body was sent {'as ' + sent_as if request.mimetype else sent_as}; send it as JSON "
            "(Content-Type: application/json) or as a form (Content-Type: application/x-www-form-urlencoded)."
        )
    return {}


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError as error:
        where = f" ({error.msg} at line {error.lineno}, column {error.colno})" if hasattr(error, "msg") else ""
        raise InvalidRequest(
            f"The request body is not valid JSON{where}. Check its quotes, commas and brackets, "
            'like {"prompt": "a red apple"}.'
        ) from None


def history_body(user_id: str, chain: list[Picture]) -> dict:
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


# -- writing answers -------------------------------------------------------------------


def render_task(record: TaskRecord, elapsed: float):
    """The answer for a task: 200 with its pictures, 202 while pending, 502 when it failed."""
    fmt = g.get("response_format", "json")
    g.task_id = record.task_id
    status_url = None
    if record.state == "pending":
        status_url = url_for("nanobanana.task_status", task_id=record.task_id, _external=True)
    status, body = task_answer(record, elapsed, status_url)
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


def task_answer(record: TaskRecord, elapsed: float, status_url: str | None = None) -> tuple[int, dict]:
    """The status and JSON body that answer for a task, here and in its webhook."""
    if record.state == "success":
        status, body = (
            200,
            {
                "status": "success",
                "task_id": record.task_id,
                "upstream_task_id": record.upstream_task_id,
                "mode": record.mode,
                "image_url": record.image_urls[0],
                "image_urls": list(record.image_urls),
                "upstream_image_url": (record.upstream_image_urls or record.image_urls)[0],
                "source_image_urls": list(record.source_image_urls),
                "used_previous_image": record.used_previous_image,
                "user_id": record.user_id,
                "elapsed_seconds": round(elapsed, 2),
            },
        )
    elif record.state in ("failed", "unconfirmed"):
        message = record.error_message or "The image could not be made."
        status, body = (
            502,
            {
                "status": "failed",
                "task_id": record.task_id,
                "upstream_task_id": record.upstream_task_id,
                "error": {"code": record.error_code or "generation_failed", "message": message},
            },
        )
    else:
        status, body = (
            202,
            {
                "status": "pending",
                "task_id": record.task_id,
                "upstream_task_id": record.upstream_task_id,
                "status_url": status_url,
                "message": f"Your picture is still being made. It will be ready at {status_url} in a few seconds.",
            },
        )
    if record.callback_url:
        body["webhook"] = {"state": record.webhook_state or "pending", "attempts": record.webhook_attempts}
    return status, body


def webhook_body(record: TaskRecord) -> dict:
    """What a webhook carries: the body GET /nanobanana/tasks/<task_id> answers for the ended task."""
    return task_answer(record, (record.completed_at or time.time()) - record.created_at)[1]


def answer_text(body: dict) -> str:
    """format=text: the picture addresses one per line, or the message."""
    if body["status"] == "success":
        return "\n".join(body["image_urls"]) + "\n"
    return (body.get("message") or body["error"]["message"]) + "\n"


def text_response(text: str, status: int):
    response = make_response(text, status)
    response.mimetype = "text/plain"
    return response


def iso8601(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# -- errors: the one place where exceptions become statuses ----------------------------

INTERNAL_ERROR = "Something went wrong on our side. Please try again in a minute."
# The code, and the words, for each HTTP error (None: the words the error itself carries).
HTTP_ERRORS = {
    400: ("invalid_request", "The request could not be read. Please check its parameters and body."),
    404: ("not_found", "There is nothing at this address. Try /nanobanana?prompt=a+red+apple"),
    405: ("method_not_allowed", "This address does not take {method} requests. Use {allowed}."),
    408: ("request_timeout", None),
    413: ("too_large", "The request body is larger than 1 MiB. Please send a shorter request."),
    414: ("too_large", None),
    429: (
        "rate_limited",
        "Too many pictures asked for in a short time. Please wait a little and try again "
        "(the Retry-After header says how many seconds).",
    ),
    431: ("too_large", None),
    500: ("internal_error", INTERNAL_ERROR),
}


def handle_error(error: Exception):
    api_error = to_api_error(error)
    g.error_code = api_error.code
    if requested_format() == "text":
        response = text_response(api_error.message + "\n", api_error.status)
    else:
        response = jsonify(error_body(api_error))
        response.status_code = api_error.status
    response.headers.update(api_error.headers)
    return response


def requested_format() -> str:
    """The answer's format, also for errors raised before the route read its parameters (429, 413)."""
    chosen = g.get("response_format") or request.args.get("format", "")
    return "text" if chosen.strip().lower() == "text" else "json"


def describe_error(error: Exception) -> tuple[int, dict]:
    """The status and JSON body for an error, for answers written below Flask."""
    api_error = to_api_error(error)
    return api_error.status, error_body(api_error)


def error_body(api_error: ApiError) -> dict:
    return {"status": "error", "error": {"code": api_error.code, "message": api_error.message}}


def to_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequest):
        return ApiError(400, "invalid_request", error.message)
    if isinstance(error, Unauthorized):
        message = (
            "This service needs an access token. Send it as the header 'Authorization: Bearer <token>' "
            "or add ?token=<token> to the address."
        )
        return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
    if isinstance(error, IdempotencyConflict):
        message = (
            "This idempotency key was already used in the last 24 hours for a different picture. "
            "Use a new key for each new picture, and the same key only to retry the same request."
        )
        return ApiError(422, "idempotency_conflict", message)
    if isinstance(error, BodyTooLarge):
        return ApiError(413, *HTTP_ERRORS[413])
    if isinstance(error, UnknownTask):
        return ApiError(404, "not_found", "from_task names no finished picture of yours. Tasks are kept for 24 hours.")
    if isinstance(error, NotConfigured):
        return ApiError(503, "not_configured", "This service has no API key yet. Its owner needs to set API_KEYS_1.")
    if isinstance(error, UpstreamRejected):
        return ApiError(400, error.code, error.message)
    if isinstance(error, UpstreamUnavailable):
        headers = {"Retry-After": str(round(error.retry_after))} if error.retry_after else {}
        return ApiError(503, error.code, error.message, headers)
    if isinstance(error, NanoBananaError):
        return ApiError(502, error.code, error.message)
    if isinstance(error, StoreUnavailable):
        log.error("store unavailable: %s", error)
        message = (
            "The service cannot reach its records right now, so nothing was started and nothing was charged. "
            "Please try again in a minute."
        )
        return ApiError(503, "store_unavailable", message, {"Retry-After": "30"})
    if isinstance(error, RateLimitExceeded):
        return ApiError(429, *HTTP_ERRORS[429], {"Retry-After": str(retry_after())})
    if isinstance(error, HTTPException):
        return http_api_error(error)
    log.exception("unexpected error", exc_info=error)
    return ApiError(500, "internal_error", INTERNAL_ERROR)


def http_api_error(error: HTTPException) -> ApiError:
    status = error.code or 500
    code, message = HTTP_ERRORS.get(status, ("invalid_request" if status < 500 else "internal_error", None))
    message = message or error.description
    if status == 405:
        allowed = " or ".join(sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"})) or "GET"
        message = message.format(method=request.method, allowed=allowed)
    headers = {"Allow": ", ".join(error.valid_methods)} if status == 405 and error.valid_methods else {}
    return ApiError(status, code, message, headers)
