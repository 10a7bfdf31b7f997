"""Signed webhooks to the caller (CONTRACT §8): the channel of deliveries whose target is a web address.

Each is signed per Standard Webhooks (the `standardwebhooks` library) with WEBHOOK_SECRET; the
`webhook-id` is the same on every attempt of one event. Targets are the caller's, so they go only
where domain/netguard.py allows, and redirects are not followed. Retries are the outbox's
(domain/deliveries.py).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import requests
from standardwebhooks.webhooks import Webhook

from config import Settings
from domain.answers import ended_task_body
from domain.deliveries import Undeliverable
from domain.netguard import RefusedTarget, check_target, public_session
from stores.records import TaskRecord, TaskState

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
SCHEMES = ("http", "https")
EVENT_TYPES = {  # any other end is "generation.failed"
    TaskState.SUCCESS: "generation.succeeded",
    TaskState.CANCELLED: "generation.cancelled",
}


class WebhookChannel:
    """POSTs the ended task's answer, signed, to the caller's callback_url."""

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.allow_private = settings.webhook_allow_private
        self.timeout = settings.webhook_timeout
        self.attempt_time = CONNECT_TIMEOUT + settings.webhook_timeout
        self.session = session or public_session(settings.webhook_allow_private)
        self._signer = Webhook(settings.webhook_secret)

    def check(self, target: str) -> None:
        check_target(target, self.allow_private)

    def deliver(self, record: TaskRecord) -> bool:
        """One attempt: a 2xx answer within the time-out delivers it."""
        payload = json.dumps(event(record))
        sent_at = datetime.now(tz=UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": record.webhook_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(record.webhook_id, sent_at, payload),
        }
        try:
            with self.session.post(
                record.deliver_to,
                data=payload.encode(),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, self.timeout),
                allow_redirects=False,
                stream=True,  # the status is all we need; the body is never read
            ) as answer:
                return 200 <= answer.status_code < 300
        except RefusedTarget as refused:
            raise Undeliverable(refused.message) from None
        except requests.RequestException as failure:
            log.info("webhook of task %s: no answer (%s)", record.task_id, type(failure).__name__)
            return False


def event(record: TaskRecord) -> dict:
    """The webhook's JSON: what happened, when, and the task's answer as GET /nanobanana/tasks gives it."""
    moment = datetime.fromtimestamp(record.completed_at or time.time(), tz=UTC).isoformat().replace("+00:00", "Z")
    kind = EVENT_TYPES.get(record.state, "generation.failed")
    return {"type": kind, "timestamp": moment, "data": ended_task_body(record)}
