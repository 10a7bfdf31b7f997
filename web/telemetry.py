"""What the service tells its operators: Prometheus metrics and one log line per request.

Under gunicorn, `gunicorn.conf.py` points PROMETHEUS_MULTIPROC_DIR at a fresh folder, so the
counts of every worker are added up at `/metrics` (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from errors import StoreUnavailable

request_log = logging.getLogger("nanobanana.requests")
log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
GENERATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120)
QUEUED_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 900)


GENERATE_ENDPOINT = "generation.generate"  # the route whose answers are timed, and rate limited (web/access.py)


class Metrics:
    def __init__(self, registry: CollectorRegistry, metrics_dir: str | None = None):
        self.registry = registry
        self.metrics_dir = metrics_dir  # PROMETHEUS_MULTIPROC_DIR: every worker's counts, summed
        self.requests = Counter(
            "nanobanana_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=registry
        )
        self.generation_seconds = Histogram(
            "nanobanana_generation_seconds",
            "Time from a generation request to its answer, by HTTP status",
            ["status"],
            buckets=GENERATION_BUCKETS,
            registry=registry,
        )
        self.upstream_calls = Counter(
            "nanobanana_upstream_calls", "Calls to the upstream API", ["endpoint", "outcome"], registry=registry
        )
        self.webhooks = Counter(
            "nanobanana_webhook_attempts", "Webhook attempts to callers, by outcome", ["outcome"], registry=registry
        )
        self.in_flight = Gauge(
            "nanobanana_generations_in_flight",
            "Generation requests being served now",
            registry=registry,
            multiprocess_mode="livesum",
        )

        self.queued_seconds = Histogram(
            "nanobanana_queued_seconds",
            "Time generations waited in the queue for their turn at the upstream",
            buckets=QUEUED_BUCKETS,
            registry=registry,
        )

        self._failing = False

    def waited_in_queue(self, seconds: float) -> None:
        self._safely(self.queued_seconds.observe, seconds)

    def upstream_call(self, endpoint: str, outcome: str) -> None:
        self._safely(lambda: self.upstream_calls.labels(endpoint, outcome).inc())

    def webhook_outcome(self, outcome: str) -> None:
        self._safely(lambda: self.webhooks.labels(outcome).inc())

    def generation_answered(self, status: int, duration: float) -> None:
        self._safely(lambda: self.generation_seconds.labels(str(status)).observe(duration))

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Count a generation request in flight while the block runs."""
        self._safely(self.in_flight.inc)
        try:
            yield
        finally:
            self._safely(self.in_flight.dec)

    def answered(self, route: str, method: str, path: str, status: int, duration: float, request_id: str, task_id):
        """Count a request and write its one log line."""
        self._safely(lambda: self.requests.labels(route, method, str(status)).inc())
        # The path only: query strings carry prompts, tokens and callback secrets. Shortened: paths are the caller's.
        request_log.info(
            "request_id=%s method=%s path=%s status=%d duration_ms=%.0f task_id=%s",
            request_id,
            method,
            path[:200],
            status,
            duration * 1000,
            (task_id or "-")[:100],
        )

    def _safely(self, record: Callable, *args) -> None:
        """Metrics never fail a request (a paid picture's answer least of all). Under gunicorn each worker writes
        them into files in `metrics_dir`; if a /tmp cleaner took that folder, it is made again."""
        try:
            record(*args)
        except OSError as failure:
            if not self._failing:
                log.warning("metrics could not be recorded (%s); the folder is made again", failure)
            self._failing = True
            if self.metrics_dir:
                os.makedirs(self.metrics_dir, exist_ok=True)
        else:
            self._failing = False


class OneLineFormatter(logging.Formatter):
    """Each record is one line: control characters in a message (anything a caller sent) are escaped.

    Request paths, task ids, header values and callback bodies reach log messages; a newline or an
    escape sequence in them must not forge a line or rewrite the terminal. Tracebacks keep their lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def printable(text: str, limit: int = 2000) -> str:
    """The text with control and other unprintable characters escaped, shortened to `limit` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def request_id(incoming: str) -> str:
    """The caller's X-Request-ID when it is a sane one, else a new id."""
    return incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def init_app(app: Flask, metrics_dir: str | None) -> Metrics:
    """Attach metrics, request ids and the request log to the app."""
    metrics = Metrics(CollectorRegistry(), metrics_dir)

    @app.before_request
    def start_request() -> None:
        g.started = time.monotonic()
        g.request_id = request_id(request.headers.get("X-Request-ID", ""))

    @app.after_request
    def finish_request(response: Response) -> Response:
        duration = time.monotonic() - g.get("started", time.monotonic())
        if request.endpoint == GENERATE_ENDPOINT:
            metrics.generation_answered(response.status_code, duration)
        response.headers["X-Request-ID"] = g.get("request_id", "")
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.answered(
            route,
            request.method,
            request.path,
            response.status_code,
            duration,
            g.get("request_id", "-"),
            g.get("task_id"),
        )
        return response

    return metrics


def exposition(metrics: Metrics, queue_depth: Callable[[], int]) -> Response:
    """The metrics in Prometheus text format, summed over every worker when there are several, and the depth of
    the queue as the store counts it now (one figure for every worker and instance)."""
    if metrics.metrics_dir:
        os.makedirs(metrics.metrics_dir, exist_ok=True)  # a /tmp cleaner may have taken it
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics.metrics_dir)
    else:
        registry = metrics.registry
    now = CollectorRegistry()
    now.register(QueueDepth(queue_depth))
    return Response(generate_latest(registry) + generate_latest(now), content_type=CONTENT_TYPE_LATEST)


class QueueDepth(Collector):
    """The queue's depth, read from the store at each scrape (a gauge no worker has to keep up to date)."""

    def __init__(self, depth: Callable[[], int]):
        self.depth = depth

    def collect(self):
        try:
            depth = self.depth()
        except StoreUnavailable:
            return
        yield GaugeMetricFamily("nanobanana_queue_depth", "Generations waiting in the queue now", value=depth)
