"""A thin client for the NanoBanana API: submit a generation, read its status, and when to ask next.

It knows the upstream's field names, its error envelope, its key rules and its polling schedule,
and nothing of Flask or of users. Every upstream failure leaves it as a `NanoBananaError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NameResolutionError, NewConnectionError

from config import DEFAULTS, Settings

log = logging.getLogger(__name__)

MODEL_PATHS = {
    "nano-banana": "/api/v1/nanobanana/generate",
    "nano-banana-pro": "/api/v1/nanobanana/generate-pro",
    "nano-banana-2": "/api/v1/nanobanana/generate-2",
}
RECORD_INFO_PATH = "/api/v1/nanobanana/record-info"
# The upstream requires a callback address; this one is never reachable from outside the upstream.
CALLBACK_PLACEHOLDER = "http://localhost/nanobanana/callback"

SUBMIT_RETRIES = 2
KEY_BENCH_SECONDS = 600
MAX_POLL_GAP = 600.0  # past the polling window, the gap between two polls doubles up to this
RETRYABLE_SUBMIT_CODES = frozenset({500, 502, 504})
BUSY_CODES = frozenset({429, 455, 503})  # nothing was created: the task waits its turn again
KEY_REFUSED_CODES = frozenset({401, 402, 433})  # a bad key, no credits, or the key's own limit reached
FEATURE_DISABLED = 505
PENDING_STATES = ("waiting", "queuing", "generating")  # `state`, where a record has no `successFlag`


class NanoBananaError(Exception):
    """Root of every upstream failure; `message` is a plain sentence for the caller, `code` names the failure."""

    code = "upstream_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UpstreamError(NanoBananaError):
    """The API call failed, or the upstream answered something unusable."""


class SubmissionUncertain(UpstreamError):
    """A submission timed out after it was sent: the task may exist, so it is not retried."""


class TaskNotFound(UpstreamError):
    """record-info does not know the task."""


class UpstreamRejected(NanoBananaError):
    """The upstream refused the request itself (bad parameters, content policy)."""

    code = "invalid_request"


class UpstreamUnavailable(NanoBananaError):
    """No key is usable, or the upstream is down or rate-limiting us."""

    code = "upstream_unavailable"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamBusy(UpstreamUnavailable):
    """The upstream limits us (429, 455, 503): nothing was created; `retry_after` when it said."""


class KeyRefused(UpstreamUnavailable):
    """The upstream refused the key (401), found it out of credits (402) or at its own limit (433); the key is
    set aside and nothing was made."""


class _NotSent(UpstreamUnavailable):
    """The connection failed before the request left: certainly nothing was created."""


class _KeyRefused(NanoBananaError):
    """The upstream's answer about the key, before the key is set aside."""


@dataclass(frozen=True)
class Generation:
    """What to make: the caller's choices, in the service's own words."""

    prompt: str
    model: str = "nano-banana"
    image_urls: tuple[str, ...] = ()
    aspect_ratio: str | None = None
    resolution: str | None = None
    num_images: int = 1


@dataclass(frozen=True)
class Task:
    """A task the upstream accepted, the number (1-based) of the key that owns it, and when (wall clock)."""

    task_id: str
    key_number: int
    submitted_at: float


@dataclass(frozen=True)
class TaskStatus:
    state: str  # "pending", "success" or "failed"
    image_urls: tuple[str, ...] = ()
    error_message: str | None = None

    @property
    def done(self) -> bool:
        return self.state != "pending"


PENDING = TaskStatus("pending")


@dataclass(frozen=True)
class KeyCredit:
    key: int
    credits: float | None
    usable: bool


@dataclass(frozen=True)
class _Answer:
    code: int  # the body's `code` when there is one, else the HTTP status; 0 when unreadable
    message: str
    data: Any = None
    retry_after: float | None = None


@dataclass
class KeyRing:
    """The configured keys in order; a key the upstream refused is set aside for a while."""

    keys: tuple[str, ...]
    bench_seconds: float = KEY_BENCH_SECONDS
    clock: Callable[[], float] = time.time
    _benched_until: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def key(self, number: int) -> str:
        if not 1 <= number <= len(self.keys):
            raise UpstreamError("The API key that created this task is no longer configured.")
        return self.keys[number - 1]

    def __post_init__(self):
        # Fingerprints are looked up on every submission and status poll: made once, not hashed each time.
        self._ids = tuple(hashlib.sha256(key.encode()).hexdigest()[:16] for key in self.keys)

    def key_id(self, number: int) -> str:
        """A fingerprint of the key, to find it again after the keys were renumbered; never the key."""
        self.key(number)  # a number that names no key is an UpstreamError
        return self._ids[number - 1]

    def number_of(self, key_id: str | None) -> int | None:
        """The number of the key with this fingerprint, if it is still configured."""
        return self._ids.index(key_id) + 1 if key_id in self._ids else None

    def is_usable(self, number: int) -> bool:
        with self._lock:
            return self._benched_until.get(number, 0.0) <= self.clock()

    def usable(self) -> list[tuple[int, str]]:
        return [(n, key) for n, key in enumerate(self.keys, start=1) if self.is_usable(n)]

    def seconds_until_usable(self) -> float:
        """How long until the first set-aside key may be tried again."""
        with self._lock:
            now = self.clock()
            return max(0.0, min(self._benched_until.values(), default=now) - now)

    def bench(self, number: int) -> None:
        with self._lock:
            self._benched_until[number] = self.clock() + self.bench_seconds


def build_session(pool_size: int = 1024) -> requests.Session:
    """One pooled session shared by the whole process, keeping up to `pool_size` upstream connections.

    A call never waits for a connection another call holds: a hung upstream call must not delay
    any other task's. Beyond `pool_size` calls at once, extra connections are opened and dropped.
    """
    session = requests.Session()
    # Not from the environment: proxy variables and ~/.netrc would be looked up again on every call,
    # which cost about half the CPU of a status poll; the upstream is reached directly.
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, pool_block=False)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class NanoBananaClient:
    def __init__(
        self,
        api_base: str,
        keys: Iterable[str],
        *,
        session: requests.Session | None = None,
        poll_interval: float = DEFAULTS.poll_interval,
        poll_max_attempts: int = DEFAULTS.poll_max_attempts,
        connect_timeout: float = DEFAULTS.connect_timeout,
        submit_read_timeout: float = DEFAULTS.submit_read_timeout,
        poll_read_timeout: float = DEFAULTS.poll_read_timeout,
        credit_path: str = DEFAULTS.credit_path,
        retry_backoff: float = DEFAULTS.submit_retry_backoff,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        on_call: Callable[[str, str], None] | None = None,
    ):
        self.api_base = api_base.rstrip("/")
        self.keys = KeyRing(tuple(keys), clock=clock)
        self.session = session or build_session()
        self.poll_interval = poll_interval
        self.poll_max_attempts = poll_max_attempts
        self.connect_timeout = connect_timeout
        self.submit_read_timeout = submit_read_timeout
        self.poll_read_timeout = poll_read_timeout
        self.credit_path = credit_path
        self.retry_backoff = retry_backoff
        self.clock = clock
        self.sleep = sleep
        self.on_call = on_call  # (endpoint, outcome) of every upstream call, for metrics

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> NanoBananaClient:
        """The client the settings describe; `options` (session, on_call, ...) as for the constructor."""
        poll_interval, poll_max_attempts = settings.poll_schedule
        return cls(
            settings.api_base,
            settings.api_keys,
            poll_interval=poll_interval,
            poll_max_attempts=poll_max_attempts,
            connect_timeout=settings.connect_timeout,
            submit_read_timeout=settings.submit_read_timeout,
            poll_read_timeout=settings.poll_read_timeout,
            credit_path=settings.credit_path,
            retry_backoff=settings.submit_retry_backoff,
            **options,
        )

    # -- submit -------------------------------------------------------------------------

    def submit(self, generation: Generation, callback_url: str = CALLBACK_PLACEHOLDER, key_number: int = 0) -> Task:
        """Create a task with key `key_number` (0: the first usable one). A busy upstream raises UpstreamBusy, and
        a refused key KeyRefused after it is set aside: in both cases nothing was made."""
        path, body = submission(generation, callback_url)
        number = key_number or self.first_usable_key()
        try:
            task_id = self._submit_with_key(path, body, self.keys.key(number))
        except _KeyRefused as refused:
            log.warning("API key %d set aside for %ds: %s", number, self.keys.bench_seconds, refused.message)
            self.keys.bench(number)
            raise KeyRefused(refused.message) from None
        return Task(task_id, number, self.clock())

    def first_usable_key(self) -> int:
        usable = self.keys.usable()
        if not usable:
            raise UpstreamUnavailable(
                "None of the service's API keys can be used right now: they are out of credits or were "
                "rejected by the image service. Please tell the owner of this service.",
                retry_after=self.keys.seconds_until_usable() or None,
            )
        return usable[0][0]

    def _submit_with_key(self, path: str, body: dict, key: str) -> str:
        """Send one submission, retrying only when the task was certainly not created and the upstream is not
        merely busy (a busy upstream is the queue's to wait for, domain/queue.py)."""
        timeout = (self.connect_timeout, self.submit_read_timeout)
        for attempt in range(SUBMIT_RETRIES + 1):
            try:
                answer = self._send("POST", path, key, timeout, json=body)
            except _NotSent as not_sent:
                failure: NanoBananaError = not_sent
            except UpstreamError:
                raise SubmissionUncertain(
                    "The image service did not answer in time, so we cannot tell whether your picture "
                    "was started. It was not retried, to avoid paying twice; please try again in a minute."
                ) from None
            else:
                if answer.code == 200:
                    return _task_id(answer)
                if answer.code in KEY_REFUSED_CODES:
                    raise _KeyRefused(answer.message)
                failure = _error_for(answer)
                if answer.code not in RETRYABLE_SUBMIT_CODES:
                    raise failure
            if attempt < SUBMIT_RETRIES:
                self.sleep(min(self.retry_backoff * 2**attempt, 5.0))
        raise failure

    # -- status and wait ----------------------------------------------------------------

    def status(self, task: Task, read_timeout: float | None = None) -> TaskStatus:
        """Ask the upstream once, with the task's own key, how the task is doing."""
        timeout = (self.connect_timeout, read_timeout or self.poll_read_timeout)
        params = {"taskId": task.task_id}
        answer = self._send("GET", RECORD_INFO_PATH, self.keys.key(task.key_number), timeout, params=params)
        if answer.code == 404:
            raise TaskNotFound("The image service has no record of this picture.")
        if answer.code != 200:
            raise _error_for(answer)
        return parse_record(answer.data)

    def next_poll(self, submitted_at: float, after: float) -> float:
        """When a task submitted at `submitted_at` is next to be asked about, after the moment `after`.

        Polls fall every `poll_interval` seconds after submission for `poll_max_attempts` polls
        (the polling window), then further and further apart, the gap doubling up to MAX_POLL_GAP.
        Each task keeps its own schedule, so a thousand tasks never queue behind each other.
        """
        slot = math.floor((after - submitted_at) / self.poll_interval + 1e-9) + 1
        if slot > self.poll_max_attempts:
            slot = self.poll_max_attempts + 1
            while self._poll_time(submitted_at, slot) <= after:
                slot += 1
        return self._poll_time(submitted_at, slot)

    def _poll_time(self, submitted_at: float, slot: int) -> float:
        window = self.poll_max_attempts
        if slot <= window:
            return submitted_at + slot * self.poll_interval
        moment, gap = submitted_at + window * self.poll_interval, self.poll_interval
        for _ in range(slot - window):
            gap = min(gap * 2, MAX_POLL_GAP)
            moment += gap
        return moment

    # -- credits ------------------------------------------------------------------------

    def credits(self) -> list[KeyCredit]:
        """The remaining credits of each key, by its number; a key that cannot answer is unusable."""
        return [self._credit(number, key) for number, key in enumerate(self.keys.keys, start=1)]

    def _credit(self, number: int, key: str) -> KeyCredit:
        try:
            answer = self._send("GET", self.credit_path, key, (self.connect_timeout, self.poll_read_timeout))
        except NanoBananaError:
            return KeyCredit(number, None, False)
        if answer.code in KEY_REFUSED_CODES:
            self.keys.bench(number)
        if answer.code != 200 or isinstance(answer.data, bool) or not isinstance(answer.data, (int, float)):
            return KeyCredit(number, None, False)
        return KeyCredit(number, answer.data, answer.data > 0 and self.keys.is_usable(number))

    # -- transport ----------------------------------------------------------------------

    def _send(self, method: str, path: str, key: str, timeout: tuple[float, float], **kwargs) -> _Answer:
        """The one place where transport errors and the upstream's envelope are translated."""
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        endpoint = path.rsplit("/", 1)[-1]
        url = self.api_base + path
        try:
            # Straight to the session's transport: no cookies, redirects, hooks or settings to merge, which
            # made up most of the CPU of a call through Session.request (docs/benchmark.md).
            prepared = requests.Request(method, url, headers=headers, **kwargs).prepare()
            response = self.session.get_adapter(url).send(prepared, timeout=timeout)
        except requests.RequestException as error:
            if _certainly_not_sent(error):
                self._observe(endpoint, "unreachable")
                raise _NotSent("The image service cannot be reached right now. Please try again in a minute.") from None
            self._observe(endpoint, "no_answer")
            raise UpstreamError("The image service did not answer in time. Please try again in a minute.") from None
        answer = _answer(response)
        self._observe(endpoint, "ok" if answer.code == 200 else f"code_{answer.code}")
        return answer

    def _observe(self, endpoint: str, outcome: str) -> None:
        if self.on_call:
            self.on_call(endpoint, outcome)


def submission(generation: Generation, callback_url: str) -> tuple[str, dict]:
    """The upstream path and JSON body for a generation; each model has its own field names."""
    g = generation
    body: dict[str, Any] = {"prompt": g.prompt, "callBackUrl": callback_url}
    if g.model == "nano-banana":
        body["type"] = "IMAGETOIAMGE" if g.image_urls else "TEXTTOIAMGE"  # misspelled on purpose upstream
        body["numImages"] = g.num_images
        if g.image_urls:
            body["imageUrls"] = list(g.image_urls)
        if g.aspect_ratio:
            body["image_size"] = g.aspect_ratio
    else:
        if g.image_urls or g.model == "nano-banana-2":
            body["imageUrls"] = list(g.image_urls)
        if g.aspect_ratio:
            body["aspectRatio"] = g.aspect_ratio
        if g.resolution:
            body["resolution"] = g.resolution
    return MODEL_PATHS[g.model], body


def parse_record(data: Any) -> TaskStatus:
    """Read record-info's `data` by a closed mapping of `successFlag` (or of `state`, where a record has no
    `successFlag`, as the provider's other endpoints answer); anything unknown raises."""
    if not isinstance(data, dict):
        raise UpstreamError("The image service sent a status we could not read.")
    if "successFlag" not in data and "state" in data:
        return _parse_state(data)
    flag = data.get("successFlag")
    if flag in (0, "0"):
        return PENDING
    if flag in (1, "1"):
        return _success(data)
    if flag in (2, 3, "2", "3"):
        return TaskStatus("failed", error_message=_failure_message(data, created=flag not in (2, "2")))
    raise UpstreamError(f"The image service sent a status we do not know ({flag!r}).")


def _parse_state(data: dict) -> TaskStatus:
    state = data["state"]
    if state in PENDING_STATES:
        return PENDING
    if state == "success":
        return _success(data)
    if state == "fail":
        return TaskStatus("failed", error_message=_failure_message(data, created=True))
    raise UpstreamError(f"The image service sent a status we do not know ({state!r}).")


def _success(data: dict) -> TaskStatus:
    urls = result_urls(data.get("response")) or result_urls(data)
    if not urls:
        raise UpstreamError("The image service said the picture was ready but sent no address for it.")
    return TaskStatus("success", urls)


def result_urls(found: Any) -> tuple[str, ...]:
    """Result addresses from `resultImageUrl` (a string or a list), else `resultUrls`, else `resultJson` (a JSON
    string holding `resultUrls`)."""
    if not isinstance(found, dict):
        return ()
    for name in ("resultImageUrl", "resultUrls"):
        value = found.get(name)
        urls = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        urls = [url for url in urls if isinstance(url, str) and url.startswith(("http://", "https://"))]
        if urls:
            return tuple(urls)
    if isinstance(found.get("resultJson"), str):
        try:
            return result_urls(json.loads(found["resultJson"]))
        except ValueError:
            return ()
    return ()


def callback_task_id(body: Any) -> str | None:
    """The task a callback speaks of (both shapes carry `data.taskId`)."""
    data = body.get("data") if isinstance(body, dict) else None
    task_id = data.get("taskId") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def parse_callback(body: Any) -> TaskStatus | None:
    """How a task ended, as its callback tells it, in either shape; None when that cannot be read.

    `/generate` sends `{"code", "msg", "data": {"taskId", "info": {"resultImageUrl"}}}`; `/generate-2`
    sends record-info's `data` (with `successFlag`). Only call this once the callback is known to be genuine.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return None
    if "successFlag" in data or "state" in data:
        try:
            status = parse_record(data)
        except UpstreamError:
            return None
        return status if status.done else None
    code = body.get("code")
    if code == 200:
        urls = result_urls(data.get("info"))
        return TaskStatus("success", urls) if urls else None
    if isinstance(code, int) and not isinstance(code, bool):
        reason = _short(str(body.get("msg") or body.get("message") or ""))
        message = f"The image could not be made: {reason}" if reason else "The image could not be made."
        return TaskStatus("failed", error_message=message)
    return None


def _failure_message(data: dict, created: bool) -> str:
    reason = data.get("errorMessage") or data.get("failMsg") or ""
    opening = "The image could not be made" if created else "The image service could not start this picture"
    return f"{opening}: {_short(reason)}" if reason else f"{opening}. Please try a different prompt or image."


def _task_id(answer: _Answer) -> str:
    data = answer.data if isinstance(answer.data, dict) else {}
    task_id = data.get("taskId")
    if not isinstance(task_id, str) or not task_id:
        raise SubmissionUncertain(
            "The image service accepted the request but sent no task id, so it cannot be followed."
        )
    return task_id


def _answer(response: requests.Response) -> _Answer:
    retry_after = _retry_after(response.headers.get("Retry-After"))
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        code = response.status_code if response.status_code >= 300 else 0
        return _Answer(code, "", None, retry_after)
    code = body.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = response.status_code
    message = body.get("msg") or body.get("message") or ""
    return _Answer(code, _short(str(message)), body.get("data"), retry_after)


def _error_for(answer: _Answer) -> NanoBananaError:
    """The exception for an upstream answer that is not a success."""
    detail = f" ({answer.message})" if answer.message else ""
    if answer.code in (400, 413):
        return UpstreamRejected(
            f"The image service did not accept this request{detail}. Please change it and try again."
        )
    if answer.code in BUSY_CODES:
        return UpstreamBusy(
            "The image service is busy right now. Please try again in a minute.", retry_after=answer.retry_after
        )
    if answer.code in KEY_REFUSED_CODES:
        return UpstreamError(f"The image service refused the service's API key{detail}.")
    if answer.code == FEATURE_DISABLED:
        return UpstreamError(
            f"The image service has turned this off for the service's account{detail}. "
            "Please tell the owner of this service."
        )
    if answer.code == 0:
        return UpstreamError("The image service sent an answer we could not read. Please try again in a minute.")
    return UpstreamError(f"The image service reported a problem (code {answer.code}{detail}). Please try again later.")


def _certainly_not_sent(error: requests.RequestException) -> bool:
    if isinstance(error, requests.ConnectTimeout):
        return True
    if not isinstance(error, requests.ConnectionError):
        return False
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, (NewConnectionError, NameResolutionError))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
