"""Who may use the service, and how often: access tokens, and RATE_LIMIT with Flask-Limiter."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import limits
from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter
from limits.storage import MemoryStorage, Storage

from config import Settings
from domain.conversations import conversation_key
from domain.params import parse_user_id
from errors import InvalidRequest, StoreUnavailable, Unauthorized
from stores.interface import Store
from web.telemetry import GENERATE_ENDPOINT
from web.uploads import UPLOAD_ENDPOINT

OPEN_ENDPOINTS = {  # CONTRACT §5: every other route needs a token when ACCESS_TOKENS is set
    "generation.upstream_callback",
    "ops.healthz",
    "ops.openapi",
    "ops.home",
    "ops.media",
    "chats.telegram",  # its own secret guards it
    "chats.discord",  # its signature guards it
    "chats.slack",  # its signature guards it
    "static",
}
LIMITED_ENDPOINTS = (GENERATE_ENDPOINT, UPLOAD_ENDPOINT)  # RATE_LIMIT counts these
# Answers that spent nothing upstream, though they are 5xx: they do not count against RATE_LIMIT.
NOTHING_SPENT = ("not_configured", "store_unavailable", "internal_error", "uploads_unavailable")

RequestValues = Callable[[], Mapping[str, Sequence[str]]]


class StoreCounters(Storage):
    """RATE_LIMIT's counters in the service's SQL store, so that every process on it counts together (fixed
    windows, Flask-Limiter's default strategy)."""

    STORAGE_SCHEME = ["nanobanana-store"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, store=None, **options):
        super().__init__(uri, wrap_exceptions)
        self.store = store

    @property
    def base_exceptions(self) -> type[Exception]:
        return StoreUnavailable

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.store.count(key, expiry, amount)

    def get(self, key: str) -> int:
        return self.store.counter(key)[0]

    def get_expiry(self, key: str) -> float:
        return self.store.counter(key)[1]

    def check(self) -> bool:
        return self.store.ping()

    def reset(self) -> None:
        return None  # counters expire by themselves; Flask-Limiter never resets them all here

    def clear(self, key: str) -> None:
        self.store.clear_counter(key)


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process counters, swept for expired ones once a second instead of 10 ms after every hit.

    Each sweep visits every counter: with 10,000 users in a minute, sweeping after every hit cost
    0.5 ms of CPU per request (docs/benchmark.md). A counter is also expired when it is read,
    so the sweep only frees memory, and once a second is often enough.
    """

    STORAGE_SCHEME = ["swept-memory"]
    SWEEP_EVERY = 1.0
    _sweep_due = False  # a sweep is scheduled, though under gevent its timer may not have started yet

    def _MemoryStorage__schedule_expiry(self) -> None:  # the private hook incr() calls, in limits 5
        # Not timer.is_alive(): a timer that has not started yet is not alive, and under gevent every request
        # served before it starts would make another (a profile at 10,000 waiting found thousands a minute).
        if self._sweep_due:
            return
        self._sweep_due = True
        self.timer = threading.Timer(self.SWEEP_EVERY, self._sweep)
        self.timer.daemon = True
        self.timer.start()

    def _sweep(self) -> None:
        self._sweep_due = False
        self._MemoryStorage__expire_events()


def init_access(app: Flask, settings: Settings, values: RequestValues, store: Store) -> None:
    """Tokens on every route but the open ones (checked first: strangers spend nobody's quota), then the limit."""

    def require_access_token() -> None:
        g.owner = ""
        if not settings.access_tokens or request.endpoint is None or request.endpoint in OPEN_ENDPOINTS:
            return
        token = matching_token(presented_token(values), settings.access_tokens)
        if token is None:
            raise Unauthorized()
        g.owner = hashlib.sha256(token.encode()).hexdigest()[:16]

    app.before_request(require_access_token)
    init_rate_limit(app, settings, values, store)


def presented_token(values: RequestValues) -> str:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return (values().get("token") or [""])[0]


def matching_token(given: str, tokens: tuple[str, ...]) -> str | None:
    """Compare with every token in constant time, so timing tells nothing about any of them."""
    found = None
    for token in tokens:
        if hmac.compare_digest(given.encode(), token.encode()):
            found = token
    return found


def counters(settings: Settings, store: Store) -> tuple[str, dict]:
    """Where RATE_LIMIT counts: in Redis when there is one (sharing the store's pool when Redis is the store);
    else in the SQL store when several processes use it; else in this process's memory."""
    if settings.redis_url:
        return settings.redis_url, ({"connection_pool": store.pool} if settings.store_name == "redis" else {})
    if settings.store_name == "postgres" or settings.web_concurrency > 1:
        return "nanobanana-store://", {"store": store}
    return "swept-memory://", {}


def init_rate_limit(app: Flask, settings: Settings, values: RequestValues, store: Store) -> None:
    """RATE_LIMIT on generation requests and uploads, per user (within its token), else per client address."""

    def rate_limit_key() -> str:
        try:
            user_id = parse_user_id(values())
        except InvalidRequest:
            user_id = None
        if user_id:
            return f"user:{conversation_key(g.get('owner', ''), user_id)}"
        return address_key()

    storage_uri, storage_options = counters(settings, store)
    limiter = Limiter(
        key_func=rate_limit_key,
        app=app,
        storage_uri=storage_uri,
        storage_options=storage_options,
        headers_enabled=False,  # only the 429 says when to come back (Retry-After), see retry_after()
        key_prefix="nanobanana-limits",
        enabled=settings.rate_limit is not None,
        # The counters' store away: count in memory meanwhile; the request itself gets the store's clear 503.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    app.extensions["limiter_instance"] = limiter
    limiter.request_filter(lambda: request.endpoint not in LIMITED_ENDPOINTS)  # others skip the limiter at once
    if settings.rate_limit:  # an upload and a generation each count as one request, against one limit
        limited = limiter.shared_limit(settings.rate_limit, scope="pictures", deduct_when=counts_against_limit)
        for endpoint in LIMITED_ENDPOINTS:
            app.view_functions[endpoint] = limited(app.view_functions[endpoint])
        # An upload costs room, not credits: counted per address too, so a new user_id each time gains nothing.
        per_address = limiter.limit(settings.rate_limit, key_func=address_key, deduct_when=counts_against_limit)
        app.view_functions[UPLOAD_ENDPOINT] = per_address(app.view_functions[UPLOAD_ENDPOINT])


def address_key() -> str:
    return f"address:{request.remote_addr}"


def limit_spender(app: Flask, settings: Settings) -> Callable[[str], bool]:
    """`spend(key)`: one request of RATE_LIMIT for `key` outside HTTP (a Telegram chat); False when none is left."""
    limiter = app.extensions["limiter_instance"]
    items = limits.parse_many(settings.rate_limit) if settings.rate_limit else []

    def spend(key: str) -> bool:
        try:
            return all([limiter.limiter.hit(item, "nanobanana-limits", key) for item in items])
        except Exception:  # the counters' store is away: let it through, as for HTTP requests
            return True

    return spend


def counts_against_limit(response: Response) -> bool:
    """A request counts if it reached the image service: refused requests (4xx) and our own outages do not."""
    if response.status_code < 400:
        return True
    return response.status_code >= 500 and g.get("error_code") not in NOTHING_SPENT


def retry_after() -> int:
    """Seconds until the limit the current request broke lets it through again."""
    limit = current_app.extensions["limiter_instance"].current_limit
    return max(1, int(limit.reset_at - time.time())) if limit else 60
