"""The queue with real processes (CONTRACT §11): gunicorn against an emulator with the provider's limits, bursts
beyond them, workers and instances sharing one pacing through Redis, and a kill -9 with tasks in the queue."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import emulated_upstream, served_environ, store_environ
from tools.processes import Service, wait_until

pytestmark = pytest.mark.slow

LIMIT = "5/2s"  # the emulator's limit per key, as the scenario has it
SHORT_WAIT = "3"  # a chat platform's patience: longer waits go on at status_url


@pytest.fixture
def limited():
    with emulated_upstream(delay=0.2, keys={"served-key": 1_000_000}) as state:
        state.rate = (5, 2.0)
        yield state


def picture(service: Service, **params) -> requests.Response:
    """Ask with a short wait, then follow status_url until the picture is made, as a patient caller does."""
    return follow(service.get("/nanobanana", params={"wait": SHORT_WAIT, **params}))


def follow(answer: requests.Response) -> requests.Response:
    if answer.status_code != 202:
        return answer
    status_url = answer.json()["status_url"]
    return wait_until(lambda: (done := requests.get(status_url, timeout=10)).status_code != 202 and done, 120, 0.2)


def submission_times(upstream, run: str) -> dict[str, float]:
    with upstream.lock:
        return {task.params["prompt"]: task.created for task in upstream.tasks.values() if run in task.params["prompt"]}


def prompts_in_order(upstream, run: str) -> list[str]:
    """The prompts of this run, in the order the upstream accepted them."""
    with upstream.lock:
        tasks = sorted(upstream.tasks.values(), key=lambda task: task.created)
    return [task.params["prompt"] for task in tasks if run in task.params["prompt"]]


def test_sixty_at_once_beyond_the_limit_all_succeed_fairly_and_the_upstream_never_refuses(limited, tmp_path):
    service = Service(served_environ(limited, UPSTREAM_RATE=LIMIT), tmp_path / "paced.log").wait_ready()
    run = uuid.uuid4().hex[:6]
    try:
        # alice's fifty in the order she sent them (each recorded before the next is sent), then ten other users
        alice = [
            service.get("/nanobanana", params={"prompt": f"{run} alice {n}", "user_id": "alice", "wait": "0"})
            for n in range(50)
        ]
        others_asked = time.monotonic()
        with ThreadPoolExecutor(60) as callers:
            others = [callers.submit(picture, service, prompt=f"{run} other {n}", user_id=f"u{n}") for n in range(10)]
            alices = list(callers.map(follow, alice))
            answers = [*alices, *(future.result() for future in others)]
    finally:
        service.stop()
    assert [answer.status_code for answer in answers] == [200] * 60
    assert limited.refused == 0  # the upstream never saw more than 5 in any 2 s
    order = prompts_in_order(limited, run)
    assert len(order) == 60 and len(set(order)) == 60  # each submitted once
    sent_at = submission_times(limited, run)
    for n in range(49):  # one conversation keeps its order (tasks sent in the same turn may arrive in any order)
        assert sent_at[f"{run} alice {n + 1}"] > sent_at[f"{run} alice {n}"] - 0.5
    last_other = max(sent_at[f"{run} other {n}"] for n in range(10))
    alice_ahead = [p for p in order if " alice " in p and others_asked < sent_at[p] < last_other]
    print(f"fairness: {len(alice_ahead)} of alice's went out between the ten others' asking and the last one's turn")
    # the ten others went before alice's queued ones: only hers already under way (one window's 5) reached the
    # upstream meanwhile, and at most one turn of hers besides
    assert len(alice_ahead) <= 5 + 1


def test_without_pacing_the_upstreams_refusals_are_waited_out(limited, tmp_path):
    service = Service(served_environ(limited), tmp_path / "unpaced.log").wait_ready()
    run = uuid.uuid4().hex[:6]
    try:
        with ThreadPoolExecutor(20) as callers:
            answers = list(callers.map(lambda n: picture(service, prompt=f"{run} {n}"), range(20)))
    finally:
        service.stop()
    assert [answer.status_code for answer in answers] == [200] * 20
    assert limited.refused > 0
    print(f"without UPSTREAM_RATE: {limited.refused} submissions refused with 429 on the way")
    assert len(prompts_in_order(limited, run)) == 20  # each made once


@pytest.mark.parametrize("store", ["redis", "postgres", "sqlite"])  # SQLite: four processes on one file
def test_two_instances_with_two_workers_each_share_one_pacing(limited, tmp_path, store, request):
    environ = served_environ(
        limited, UPSTREAM_RATE=LIMIT, WEB_CONCURRENCY="2", **store_environ(store, request, tmp_path)
    )
    instances = [Service(environ, tmp_path / f"instance-{n}.log") for n in (1, 2)]
    run = uuid.uuid4().hex[:6]
    try:
        for instance in instances:
            instance.wait_ready()
        with ThreadPoolExecutor(30) as callers:
            answers = list(callers.map(lambda n: picture(instances[n % 2], prompt=f"{run} {n}"), range(30)))
    finally:
        for instance in instances:
            instance.stop()
    assert [answer.status_code for answer in answers] == [200] * 30
    assert limited.refused == 0
    assert len(prompts_in_order(limited, run)) == 30


def test_kill_9_with_twenty_queued_then_restart_submits_each_once(limited, tmp_path):
    database = {"DATABASE_PATH": str(tmp_path / "queue.sqlite3")}
    first = Service(served_environ(limited, UPSTREAM_RATE="2/30s", **database), tmp_path / "first.log").wait_ready()
    run = uuid.uuid4().hex[:6]
    queued = [first.get("/nanobanana", params={"prompt": f"{run} {n}", "wait": "0"}).json() for n in range(22)]
    wait_until(lambda: len(prompts_in_order(limited, run)) == 2, timeout=10)
    assert sum(1 for task in queued if task["queue_position"]) >= 20
    first.kill()
    assert len(prompts_in_order(limited, run)) == 2  # the other twenty were never sent
    # a deploy that also raised the pace (the first two still count against the key's window)
    second = Service(served_environ(limited, UPSTREAM_RATE="10/1s", **database), tmp_path / "second.log")
    try:
        second.wait_ready()
        for task in queued:
            assert follow(second.get(f"/nanobanana/tasks/{task['task_id']}")).json()["status"] == "success"
    finally:
        second.stop()
    assert sorted(prompts_in_order(limited, run)) == sorted(f"{run} {n}" for n in range(22))  # each exactly once
