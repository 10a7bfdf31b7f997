"""Signed webhooks to the caller (CONTRACT §8): which targets are allowed, and delivery with retries.

When a task with a `callback_url` ends, its record says a webhook is due (`webhook_state` "pending").
Every process runs a `Webhooks` loop: it leases the due webhooks from the store (so no two processes
send the same one at once), posts each in a thread of its own (a slow receiver holds up nobody), and
records how it went: delivered, due again after the next delay, or failed after the last. The store
holds them, so a restart or a crash loses none. Each is signed per Standard Webhooks (the
`standardwebhooks` library) with WEBHOOK_SECRET; the `webhook-id` is the same on every attempt.

Targets are the caller's: only http(s), and never, unless WEBHOOK_ALLOW_PRIVATE=1, an address inside
(loopback, private, link-local, multicast, reserved, their IPv6 forms and IPv4-mapped ones). The host
is checked when the request comes, and the address actually connected to is checked again on every
attempt, so a name that later resolves inside is refused too. Redirects are not followed.
"""

from __future__ import annotations

import _thread
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from standardwebhooks.webhooks import Webhook
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from config import Settings
from errors import InvalidRequest
from stores.records import Store, StoreUnavailable, TaskRecord

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CHAT_PREFIX = "telegram:"  # a bot task: its end goes to the chat, not to a web address
LOOK_EVERY = 1.0  # seconds between two looks at the store for due webhooks, when nothing wakes the loop
BATCH = 100


class RefusedTarget(InvalidRequest):
    """A callback_url the service will not post to."""


def check_target(url: str, allow_private: bool) -> None:
    """Refuse a callback_url that is not http(s), cannot be found, or (unless allowed) points inside."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedTarget("callback_url must be a web address that starts with https:// (or http://).")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        raise RefusedTarget(f"callback_url's host {parts.hostname!r} cannot be found; please check it.") from None
    if not allow_private and any(inside(address) for address in addresses):
        raise RefusedTarget(
            "callback_url points at a private or local address, and webhooks go only to public ones. "
            "For a receiver on the same machine or network, the service's owner can set WEBHOOK_ALLOW_PRIVATE=1."
        )


def inside(address: str) -> bool:
    """Loopback, private, link-local, multicast, reserved or otherwise not a public internet address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class _PublicPeersOnly:
    """Checks the address a connection actually reached, right after connecting (before TLS, before a byte)."""

    def _new_conn(self):
        sock = super()._new_conn()
        if inside(sock.getpeername()[0]):
            sock.close()
            raise RefusedTarget("callback_url now leads to a private or local address; it was not called.")
        return sock


class _PublicHTTPConnection(_PublicPeersOnly, HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicPeersOnly, HTTPSConnection):
    pass


class _PublicHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PublicHTTPConnection


class _PublicHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PublicHTTPSConnection


class PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _PublicHTTPConnectionPool,
            "https": _PublicHTTPSConnectionPool,
        }


def webhook_session(allow_private: bool) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter() if allow_private else PublicOnlyAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Webhooks:
    """Delivers the webhooks the store says are due, from this process, until stop()."""

    def __init__(
        self, settings: Settings, store: Store, body_of: Callable[[TaskRecord], dict], on_outcome=None, chat=None
    ):
        """`body_of(record)` is the JSON body of GET /nanobanana/tasks/<task_id> for the record; `chat`
        delivers the tasks of the Telegram bot (their callback_url is telegram:<chat>:<message>)."""
        self.settings = settings
        self.store = store
        self.body_of = body_of
        self.on_outcome = on_outcome  # (outcome) for metrics: delivered, retry, failed
        self.chat = chat
        self.session = webhook_session(settings.webhook_allow_private)
        self._signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.on_notify(lambda task_id: self._wake.set())  # a task ended somewhere: a webhook may be due

    def start(self) -> None:
        if (self._signer is not None or self.chat is not None) and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.time()
            try:
                due = self.store.due_webhooks(now, now + CONNECT_TIMEOUT + self.settings.webhook_timeout + 10, BATCH)
            except StoreUnavailable:
                due = []  # they wait in the store
            for record in due:
                _thread.start_new_thread(self._attempt, (record,))
            if len(due) < BATCH:
                self._wake.wait(LOOK_EVERY)

    def _attempt(self, record: TaskRecord) -> None:
        """One attempt: a 2xx answer within the time-out delivers it; anything else is retried later."""
        attempts = record.webhook_attempts + 1
        try:
            if record.callback_url.startswith(CHAT_PREFIX):
                delivered = self.chat is not None and self.chat.deliver(record)
            else:
                delivered = self._post(record)
        except RefusedTarget as refused:
            log.warning("webhook of task %s not sent: %s", record.task_id, refused.message)
            self._record(record, "failed", attempts, None)
            return
        except Exception:
            log.exception("webhook of task %s: the attempt broke off", record.task_id)
            delivered = False
        if delivered:
            self._record(record, "delivered", attempts, None)
        elif attempts <= len(self.settings.webhook_retry_delays):
            self._record(record, "pending", attempts, time.time() + self.settings.webhook_retry_delays[attempts - 1])
        else:
            self._record(record, "failed", attempts, None)

    def _post(self, record: TaskRecord) -> bool:
        payload = json.dumps(event(record, self.body_of(record)))
        sent_at = datetime.now(tz=UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": record.webhook_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(record.webhook_id, sent_at, payload),
        }
        try:
            with self.session.post(
                record.callback_url,
                data=payload.encode(),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, self.settings.webhook_timeout),
                allow_redirects=False,
                stream=True,  # the status is all we need; the body is never read
            ) as answer:
                return 200 <= answer.status_code < 300
        except requests.RequestException as failure:
            log.info("webhook of task %s: no answer (%s)", record.task_id, type(failure).__name__)
            return False

    def _record(self, record: TaskRecord, state: str, attempts: int, due: float | None) -> None:
        try:
            self.store.webhook_attempted(record.task_id, record.webhook_id, state, attempts, due)
        except StoreUnavailable:
            log.warning("webhook of task %s: could not record the attempt; it will be made again", record.task_id)
        if self.on_outcome:
            self.on_outcome("retry" if state == "pending" else state)


def event(record: TaskRecord, body: dict) -> dict:
    """The webhook's JSON: what happened, when, and the task's answer as GET /nanobanana/tasks gives it."""
    kind = "generation.succeeded" if record.state == "success" else "generation.failed"
    moment = datetime.fromtimestamp(record.completed_at or time.time(), tz=UTC).isoformat().replace("+00:00", "Z")
    return {"type": kind, "timestamp": moment, "data": body}


def webhook_due(record: TaskRecord) -> dict:
    """The fields that make a webhook due for a task that just ended, when it has a callback_url."""
    if record.callback_url is None:
        return {}
    return {
        "webhook_id": f"msg_{record.task_id}_{record.state}",
        "webhook_state": "pending",
        "webhook_attempts": 0,
        "webhook_due": time.time(),
    }
