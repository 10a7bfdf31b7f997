"""The service's one error vocabulary: what may go wrong, in the words a caller hears.

Every failure of the service itself is a `ServiceError` carrying its HTTP status, a stable code and
a plain sentence. The upstream client has a root of its own (`NanoBananaError`, nanobanana_client.py)
and start-up another (`ConfigError`, config.py); `web/errors.py` is the one place that turns any of
them into an answer. Nothing here knows Flask.
"""

from __future__ import annotations

from config import IDEMPOTENCY_TTL, MAX_BODY_BYTES, TASK_TTL, in_words, size_in_words


class ServiceError(Exception):
    """An error a caller hears of: `status`, `code` and `message`, plus any headers the answer needs."""

    status = 500
    code = "internal_error"
    message = "Something went wrong on our side. Please try again in a minute."
    headers: dict[str, str] = {}

    def __init__(
        self,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
    ):
        """The kind's own words, status and code, unless this one says otherwise."""
        self.message = message or type(self).message
        self.headers = {**type(self).headers, **(headers or {})}
        self.status = status or type(self).status
        self.code = code or type(self).code
        super().__init__(self.message)


class InvalidRequest(ServiceError):
    """Something the caller sent is missing or wrong; the message names it and says how to fix it."""

    status, code = 400, "invalid_request"
    message = "The request could not be read. Please check its parameters and body."


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    message = (
        "This service needs an access token. Send it as the header 'Authorization: Bearer <token>' "
        "or add ?token=<token> to the address."
    )
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status, code = 404, "not_found"
    message = "There is nothing at this address. Try /nanobanana?prompt=a+red+apple"


class UnknownTask(NotFound):
    message = f"There is no task with this id here. Tasks are kept for {in_words(TASK_TTL)}."


class UnknownSourceTask(NotFound):
    """from_task names no finished picture of this caller."""

    message = f"from_task names no finished picture of yours. Tasks are kept for {in_words(TASK_TTL)}."


class NothingToUndo(ServiceError):
    status, code = 409, "nothing_to_undo"
    message = "There is no picture to undo: this conversation has none yet."


class AlreadySubmitted(ServiceError):
    """Cancel asked for a task that has left the queue."""

    status, code = 409, "already_submitted"
    message = "This picture has already gone to the image service, so it can no longer be cancelled."


class QueueFull(ServiceError):
    """QUEUE_MAX tasks are queued: nothing is recorded, nothing is paid."""

    status, code = 503, "upstream_unavailable"
    message = (
        "So many pictures are waiting for the image service that no more can join the line right now. "
        "Nothing was started and nothing was charged. Please try again in a minute."
    )
    headers = {"Retry-After": "60"}


class NoKeyUsable(ServiceError):
    """Every API key is out of credits or refused, so nothing is recorded; the client's message says so."""

    status, code = 503, "upstream_unavailable"


class TooLarge(ServiceError):
    status, code = 413, "too_large"
    message = f"The request body is larger than {size_in_words(MAX_BODY_BYTES)}. Please send a shorter request."


class NotAPicture(ServiceError):
    """An upload that is no PNG, JPEG, WebP or GIF (by its bytes)."""

    status, code = 415, "not_a_picture"
    message = (
        "This is not a picture the image service can use. Please send a PNG, JPEG, WebP or GIF "
        "(an SVG or a document will not do)."
    )


class UploadsUnavailable(ServiceError):
    """Uploads would land where the upstream cannot fetch them, or could not be stored."""

    status, code = 503, "uploads_unavailable"
    message = (
        "This service cannot take pictures yet: the image service could not fetch them from here. "
        "Its owner needs to set PUBLIC_BASE_URL (this service's public address), or MEDIA_STORE=s3://… ."
    )


class IdempotencyConflict(ServiceError):
    """An idempotency key was used before with other parameters."""

    status, code = 422, "idempotency_conflict"
    message = (
        f"This idempotency key was already used in the last {in_words(IDEMPOTENCY_TTL)} for a different picture. "
        "Use a new key for each new picture, and the same key only to retry the same request."
    )


class NotConfigured(ServiceError):
    """No API key is configured, so nothing can be made."""

    status, code = 503, "not_configured"
    message = "This service has no API key yet. Its owner needs to set API_KEYS_1."


class StoreUnavailable(ServiceError):
    """The store cannot be reached right now; `detail` says why, for the log only."""

    status, code = 503, "store_unavailable"
    message = (
        "The service cannot reach its records right now, so nothing was started and nothing was charged. "
        "Please try again in a minute."
    )
    headers = {"Retry-After": "30"}

    def __init__(self, detail: str = ""):
        super().__init__()
        self.detail = detail

    def __str__(self) -> str:
        return self.detail or self.message
