"""The one place where any exception becomes an answer: a status, a stable code and a plain message.

The service's own errors carry all three (errors.py); the upstream client's, Flask-Limiter's and
werkzeug's are translated by the table below. Flask's error handler, the upstream callback receiver
and the gunicorn worker all answer through `describe_error`, so even malformed HTTP gets this JSON.
"""

from __future__ import annotations

import logging

from flask import g, jsonify, request
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from errors import InvalidRequest, NotFound, ServiceError, StoreUnavailable, TooLarge
from nanobanana_client import NanoBananaError, UpstreamRejected, UpstreamUnavailable
from web.access import retry_after
from web.render import text_response

log = logging.getLogger(__name__)

RATE_LIMITED = (
    "Too many pictures asked for in a short time. Please wait a little and try again "
    "(the Retry-After header says how many seconds)."
)
# The code, and the words, for each HTTP error werkzeug raises (None: the words the error itself carries).
HTTP_ERRORS = {
    400: ("invalid_request", InvalidRequest.message),
    404: ("not_found", NotFound.message),
    405: ("method_not_allowed", "This address does not take {method} requests. Use {allowed}."),
    408: ("request_timeout", None),
    413: ("too_large", TooLarge.message),
    414: ("too_large", None),
    429: ("rate_limited", RATE_LIMITED),
    431: ("too_large", None),
    500: ("internal_error", ServiceError.message),
}
# The status of each kind of upstream failure (the most specific first).
UPSTREAM_STATUSES = ((UpstreamRejected, 400), (UpstreamUnavailable, 503), (NanoBananaError, 502))


def error_codes() -> list[str]:
    """Every `error.code` an error answer may carry: the service's kinds, the upstream client's, and HTTP's."""
    kinds = [*_kinds_of(ServiceError), *_kinds_of(NanoBananaError)]
    return sorted({kind.code for kind in kinds} | {code for code, _ in HTTP_ERRORS.values()})


def _kinds_of(root: type) -> list[type]:
    return [root, *(kind for sub in root.__subclasses__() for kind in _kinds_of(sub))]


def handle_error(error: Exception):
    """Flask's error handler: the answer for any exception, in the format the caller asked for."""
    failure = to_service_error(error)
    g.error_code = failure.code
    if requested_format() == "text":
        response = text_response(failure.message + "\n", failure.status)
    else:
        response = jsonify(error_body(failure))
        response.status_code = failure.status
    response.headers.update(failure.headers)
    return response


def describe_error(error: BaseException) -> tuple[int, dict]:
    """The status and JSON body for an error, for answers written below Flask."""
    failure = to_service_error(error)
    return failure.status, error_body(failure)


def error_body(failure: ServiceError) -> dict:
    return {"status": "error", "error": {"code": failure.code, "message": failure.message}}


def requested_format() -> str:
    """The answer's format, also for errors raised before the route read its parameters (429, 413)."""
    chosen = g.get("response_format") or request.args.get("format", "")
    return "text" if chosen.strip().lower() == "text" else "json"


def to_service_error(error: BaseException) -> ServiceError:
    if isinstance(error, StoreUnavailable):
        log.error("store unavailable: %s", error)
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, NanoBananaError):
        return upstream_error(error)
    if isinstance(error, RateLimitExceeded):
        return http_error(error, {"Retry-After": str(retry_after())})
    if isinstance(error, HTTPException):
        return http_error(error)
    log.exception("unexpected error", exc_info=error)
    return ServiceError()


def upstream_error(error: NanoBananaError) -> ServiceError:
    status = next(status for kind, status in UPSTREAM_STATUSES if isinstance(error, kind))
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(round(retry_after))} if retry_after else None
    return ServiceError(error.message, headers, status=status, code=error.code)


def http_error(error: HTTPException, headers: dict[str, str] | None = None) -> ServiceError:
    status = error.code or 500
    code, message = HTTP_ERRORS.get(status, ("invalid_request" if status < 500 else "internal_error", None))
    message = message or error.description
    headers = dict(headers or {})
    if status == 405:
        allowed = " or ".join(sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"})) or "GET"
        message = message.format(method=request.method, allowed=allowed)
        if error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
    return ServiceError(message, headers, status=status, code=code)
