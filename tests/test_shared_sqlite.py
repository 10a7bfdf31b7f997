"""Two workers on one SQLite file (WEB_CONCURRENCY=2 with the embedded store), over real HTTP under gunicorn:
a callback taken by one worker wakes the request waiting in the other, and RATE_LIMIT counts for both."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.helpers import served_environ
from tools.processes import Service, free_port

pytestmark = pytest.mark.slow

GENERATION = 1.0  # seconds each picture takes upstream
# Polls every 10 s for 60 s, so with callbacks on, the fallback polls come every 20 s: an answer within
# a few seconds of the picture can only have come from the callback's wake-up.
SPARSE_POLLS = {"POLL_INTERVAL": "10", "POLL_MAX_ATTEMPTS": "6"}


@pytest.fixture(scope="module")
def two_workers(served_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-sqlite")
    port = free_port()
    environ = served_environ(served_upstream, WEB_CONCURRENCY="2", RATE_LIMIT="3/minute", **SPARSE_POLLS)
    environ["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"  # the emulator calls back here, reaching either worker
    running = Service(environ, folder / "service.log", port=port).wait_ready()
    yield running
    running.stop()


def test_two_workers_start_on_one_file(two_workers):
    assert two_workers.get("/healthz").json()["store"] == "sqlite"
    assert len(psutil.Process(two_workers.process.pid).children()) == 2


def test_a_callback_taken_by_either_worker_wakes_the_waiting_request(two_workers):
    run = uuid.uuid4().hex[:6]

    def picture(n: int) -> tuple[int, float]:
        started = time.monotonic()
        answer = two_workers.get("/nanobanana", params={"prompt": f"[delay={GENERATION}] {run} {n}", "user_id": n})
        return answer.status_code, time.monotonic() - started

    with ThreadPoolExecutor(20) as callers:  # enough at once to keep both workers waiting
        answers = list(callers.map(picture, range(20)))
    assert [status for status, _ in answers] == [200] * 20
    assert max(elapsed for _, elapsed in answers) < GENERATION + 5  # far before the first fallback poll (20 s)


def test_the_rate_limit_counts_across_workers(two_workers):
    user = f"counted-{uuid.uuid4().hex[:6]}"
    # one after another (a request is counted once answered), each on a new connection, which either worker takes
    answers = [two_workers.get("/nanobanana", params={"prompt": "a cat", "user_id": user}) for _ in range(10)]
    assert [answer.status_code for answer in answers] == [200] * 3 + [429] * 7
