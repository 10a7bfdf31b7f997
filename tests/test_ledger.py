"""Nothing lost: the ledger under kill -9, restarts, reloads, store outages and hung submissions.

Real processes throughout: gunicorn as the Procfile starts it, the emulator on a free port, a real
redis-server. Every wait is on a condition, with a bound.
"""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import pytest
import requests

from tests.helpers import served_environ, store_environ
from tools.processes import Service, free_port, wait_until

pytestmark = pytest.mark.slow

RECOVERY_BOUND = 30  # seconds from /healthz answering again to every paid picture remembered (CONTRACT §7)


def settings_for(upstream, **extra) -> dict[str, str]:
    return served_environ(upstream, POLL_INTERVAL="0.2", **extra)


@pytest.fixture(scope="module")
def service(served_upstream, tmp_path_factory):
    running = Service(settings_for(served_upstream), tmp_path_factory.mktemp("ledger") / "service.log").wait_ready()
    yield running
    running.stop()


def generate(service: Service, timeout: float = 30, headers=None, **params) -> requests.Response:
    return requests.get(f"{service.url}/nanobanana", params=params, headers=headers or {}, timeout=timeout)


def upstream_tasks_for(upstream, marker: str) -> list:
    """The tasks the upstream made (and charged for) whose prompt carries `marker`."""
    with upstream.lock:
        return [task for task in upstream.tasks.values() if marker in task.params["prompt"]]


def remembered(service: Service, user_id: str) -> str | None:
    return service.get(f"/nanobanana/history/{user_id}").json()["last_image_url"]


def start_twenty_generations(service: Service, upstream, run: str, pool: ThreadPoolExecutor | None) -> dict[str, str]:
    """Twenty paid generations in flight: with a pool, ten have their callers waiting; the others asked wait=0.

    Returns each user's picture as the upstream made it, once every task is paid and in the ledger.
    """
    users = [f"{run}-{n}" for n in range(20)]
    waiting = users[:10] if pool else []
    for user in waiting:
        pool.submit(generate, service, prompt=f"[delay=3] picture for {user}", user_id=user)
    for user in users[len(waiting) :]:
        assert generate(service, prompt=f"[delay=3] picture for {user}", user_id=user, wait="0").status_code == 202
    tasks = wait_until(lambda: len(found := upstream_tasks_for(upstream, run)) == 20 and found, timeout=15)
    # each task answers to the upstream's id only once its follower wrote it into the ledger
    wait_until(lambda: all(service.get(f"/nanobanana/tasks/{t.task_id}").status_code == 202 for t in tasks))
    return {task.params["prompt"].rsplit(" ", 1)[1]: task.image_urls[0] for task in tasks}


@pytest.mark.parametrize("store", ["sqlite", "redis", "postgres"])
def test_kill_9_with_tasks_in_flight_then_restart_remembers_every_paid_picture(
    served_upstream, tmp_path, store, request
):
    extra = store_environ(store, request, tmp_path)
    first = Service(settings_for(served_upstream, **extra), tmp_path / "first.log").wait_ready()
    run = f"crash-{store}-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(10) as callers:
        pictures = start_twenty_generations(first, served_upstream, run, callers)
        first.kill()
    second = Service(settings_for(served_upstream, **extra), tmp_path / "second.log", port=first.port).wait_ready()
    try:
        back = time.monotonic()
        wait_until(lambda: all(remembered(second, u) == url for u, url in pictures.items()), timeout=RECOVERY_BOUND)
        print(f"{store}: every paid picture remembered {time.monotonic() - back:.1f} s after /healthz answered")
        for task in upstream_tasks_for(served_upstream, run):
            assert second.get(f"/nanobanana/tasks/{task.task_id}").json()["status"] == "success"
    finally:
        second.stop()


def test_a_restart_keeps_conversations_and_status_urls(served_upstream, tmp_path):
    environ = settings_for(served_upstream, DATABASE_PATH=str(tmp_path / "db.sqlite3"))
    first = Service(environ, tmp_path / "first.log").wait_ready()
    cat = generate(first, prompt="a cat", user_id="returning").json()
    first.stop()
    second = Service(environ, tmp_path / "second.log", port=first.port).wait_ready()
    try:
        assert second.get(f"/nanobanana/tasks/{cat['task_id']}").json()["image_url"] == cat["image_url"]
        edit = generate(second, prompt="make it blue", user_id="returning").json()
        assert edit["used_previous_image"] is True and edit["source_image_urls"] == [cat["image_url"]]
    finally:
        second.stop()


def test_sighup_with_pending_tasks_loses_nothing(served_upstream, tmp_path):
    reloading = Service(settings_for(served_upstream), tmp_path / "reload.log").wait_ready()
    try:
        pictures = start_twenty_generations(reloading, served_upstream, f"reload-{uuid.uuid4().hex[:6]}", pool=None)
        old_workers = {worker.pid for worker in reloading.workers()}
        reloading.process.send_signal(signal.SIGHUP)  # a deploy: new workers, and the old ones stop
        wait_until(lambda: not old_workers & {worker.pid for worker in reloading.workers()}, timeout=10)
        wait_until(lambda: all(remembered(reloading, u) == url for u, url in pictures.items()), timeout=30)
    finally:
        output = reloading.stop()
    assert "took over 20 pending tasks" in output


def test_redis_stopped_and_started_mid_flight_loses_nothing(served_upstream, redis_server, tmp_path):
    shared = Service(settings_for(served_upstream, REDIS_URL=redis_server.url), tmp_path / "redis.log").wait_ready()
    run = f"outage-{uuid.uuid4().hex[:6]}"
    users = [f"{run}-{n}" for n in range(10)]
    try:
        with ThreadPoolExecutor(10) as callers:
            answers = [
                callers.submit(generate, shared, prompt=f"[delay=2] picture for {user}", user_id=user) for user in users
            ]
            tasks = wait_until(
                lambda: len(found := upstream_tasks_for(served_upstream, run)) == 10 and found, timeout=10
            )
            wait_until(lambda: all(shared.get(f"/nanobanana/tasks/{t.task_id}").status_code == 202 for t in tasks))
            redis_server.stop()
            try:
                pictures = [answer.result(timeout=30) for answer in answers]  # the results reach their callers
                assert [picture.status_code for picture in pictures] == [200] * 10
            finally:
                redis_server.start()  # empty: this Redis keeps nothing on disk
        for user, picture in zip(users, pictures, strict=True):
            wait_until(lambda u=user, p=picture: remembered(shared, u) == p.json()["image_url"], timeout=30)
            assert shared.get(f"/nanobanana/tasks/{picture.json()['task_id']}").status_code == 200
    finally:
        shared.stop()


def test_a_full_disk_turns_health_red_reads_still_answer_and_nothing_is_lost(served_upstream, tmp_path):
    full = Service(settings_for(served_upstream), tmp_path / "full.log").wait_ready()
    run = f"full-{uuid.uuid4().hex[:6]}"
    try:
        pending = generate(full, prompt=f"[delay=2] {run} made before the disk filled", wait="0").json()
        wait_until(lambda: full.get(f"/nanobanana/tasks/{pending['task_id']}").json()["upstream_task_id"])
        with disk_full(full):
            health = full.get("/healthz")
            assert health.status_code == 503 and health.json()["store_ok"] is False
            assert full.get(f"/nanobanana/tasks/{pending['task_id']}").status_code in (200, 202)
            refused = generate(full, prompt=f"{run} asked while the disk is full", wait="0")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            [task] = upstream_tasks_for(served_upstream, run)
            wait_until(lambda: task.polls_told_the_end, timeout=10)  # the service heard the end, and cannot write it
        wait_until(lambda: full.get("/healthz").status_code == 200, timeout=10)
        ended = wait_until(lambda: (answer := full.get(f"/nanobanana/tasks/{pending['task_id']}")).ok and answer)
        assert ended.json()["status"] == "success" and ended.json()["image_url"]
        assert len(upstream_tasks_for(served_upstream, run)) == 1  # the refused one was never paid for
    finally:
        full.stop()


@contextmanager
def disk_full(service: Service):
    """Every write the service's processes make to a file fails (RLIMIT_FSIZE of 0), as on a full disk."""
    processes = [psutil.Process(service.process.pid), *service.workers()]
    for process in processes:
        process.rlimit(psutil.RLIMIT_FSIZE, (0, process.rlimit(psutil.RLIMIT_FSIZE)[1]))
    try:
        yield
    finally:
        for process in processes:
            process.rlimit(psutil.RLIMIT_FSIZE, (psutil.RLIM_INFINITY, process.rlimit(psutil.RLIMIT_FSIZE)[1]))


def test_a_cut_off_request_retried_with_its_key_pays_once(service, served_upstream):
    key, prompt = uuid.uuid4().hex, f"[delay=1] a kite {uuid.uuid4().hex}"
    with pytest.raises(requests.ReadTimeout):
        generate(service, timeout=0.3, headers={"Idempotency-Key": key}, prompt=prompt, user_id="kiter")
    retried = generate(service, headers={"Idempotency-Key": key}, prompt=prompt, user_id="kiter")
    assert retried.status_code == 200
    assert len(upstream_tasks_for(served_upstream, prompt)) == 1
    again = generate(service, idempotency_key=key, prompt=prompt, user_id="kiter")  # the parameter works too
    assert again.json()["task_id"] == retried.json()["task_id"]


def test_the_same_key_for_another_picture_is_refused(service, served_upstream):
    key = uuid.uuid4().hex
    assert generate(service, idempotency_key=key, prompt="a red boat").status_code == 200
    other = generate(service, idempotency_key=key, prompt="a green boat")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_conflict"
    assert upstream_tasks_for(served_upstream, "a green boat") == []


def test_concurrent_requests_with_one_key_make_one_submission(service, served_upstream):
    key, prompt = uuid.uuid4().hex, f"[delay=0.5] twins {uuid.uuid4().hex}"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: generate(service, idempotency_key=key, prompt=prompt), range(10)))
    assert [answer.status_code for answer in answers] == [200] * 10
    assert len({answer.json()["task_id"] for answer in answers}) == 1
    assert len(upstream_tasks_for(served_upstream, prompt)) == 1


def test_head_never_submits(service, served_upstream):
    marker = uuid.uuid4().hex
    answer = requests.head(f"{service.url}/nanobanana", params={"prompt": f"a cat {marker}"}, timeout=10)
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET, POST"
    assert upstream_tasks_for(served_upstream, marker) == []


def test_hung_submissions_never_delay_other_generations_or_outlast_the_wait(served_upstream, tmp_path):
    busy = Service(settings_for(served_upstream), tmp_path / "hung.log").wait_ready()
    try:
        with ThreadPoolExecutor(300) as pool:
            hung = [pool.submit(generate, busy, prompt=f"[submit-hang=30] hung {n}", wait="2") for n in range(300)]
            answers = [answer.result(timeout=30) for answer in hung]
        assert [answer.status_code for answer in answers] == [202] * 300
        assert max(answer.elapsed.total_seconds() for answer in answers) < 2 + 3  # the wait, and some slack
        wait_until(
            lambda: len(upstream_tasks_for(served_upstream, "hung")) == 300, timeout=10
        )  # all 300 hang served_upstream
        normal = generate(busy, prompt="[delay=0.5] a normal cat", wait="10")
        assert normal.status_code == 200, "a normal generation waited behind hung submissions"
    finally:
        busy.stop()


def test_kill_9_with_submissions_unanswered_the_callbacks_still_end_them_by_our_ids(served_upstream, tmp_path):
    """The answers to ten submissions are held back when the service is killed, so their upstream ids never
    reached the ledger. With callbacks on, each upstream callback names our own task: every one ends a success."""
    database = str(tmp_path / "db.sqlite3")
    port = free_port()
    environ = settings_for(served_upstream, DATABASE_PATH=database, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}")
    first = Service(environ, tmp_path / "first.log", port=port).wait_ready()
    run = f"unanswered-{uuid.uuid4().hex[:6]}"
    prompt = "[submit-hang=3][callback-delay=8] picture {n} of " + run
    tasks = [generate(first, prompt=prompt.format(n=n), wait="0").json() for n in range(10)]
    wait_until(lambda: len(upstream_tasks_for(served_upstream, run)) == 10, timeout=10)
    first.kill()  # before any submission's answer came back: no upstream id is in the ledger
    second = Service(environ, tmp_path / "second.log", port=port).wait_ready()
    try:
        for task in tasks:
            done = wait_until(
                lambda t=task: (
                    (a := second.get(f"/nanobanana/tasks/{t['task_id']}").json())["status"] == "success" and a
                ),
                timeout=30,
            )
            assert done["upstream_task_id"] in {t.task_id for t in upstream_tasks_for(served_upstream, run)}
    finally:
        second.stop()
    assert len(upstream_tasks_for(served_upstream, run)) == 10  # each paid once
