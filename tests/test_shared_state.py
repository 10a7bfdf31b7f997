"""Several workers and instances sharing one real Redis, over real HTTP."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.helpers import emulated_upstream
from tools.processes import RedisServer, Service, wait_until

pytestmark = pytest.mark.slow

KEY = "shared-state-key"


@pytest.fixture(scope="module")
def upstream():
    with emulated_upstream(delay=0.1, keys={KEY: 1000}) as state:
        yield state


@pytest.fixture(scope="module")
def instances(upstream, redis_server, tmp_path_factory):
    """Two instances on different ports, two workers each, one Redis."""
    environ = {
        "API_KEYS_1": KEY,
        "NANOBANANA_API_BASE": upstream.url,
        "POLL_INTERVAL": "0.05",
        "POLL_MAX_ATTEMPTS": "20",
        "REDIS_URL": redis_server.url,
        "WEB_CONCURRENCY": "2",
        "UPSTREAM_RATE": "off",  # this emulator has no limits (tests/test_queue_processes.py gives it some)
    }
    logs = tmp_path_factory.mktemp("shared")
    running = [Service(environ, logs / f"instance-{n}.log") for n in (1, 2)]
    for instance in running:
        instance.wait_ready()
    yield running
    for instance in running:
        instance.stop()


def generate(instance: Service, **params) -> requests.Response:
    return instance.get("/nanobanana", params=params)


def test_each_instance_runs_two_workers_on_redis(instances):
    for instance in instances:
        assert instance.get("/healthz").json()["store"] == "redis"
        assert len(psutil.Process(instance.process.pid).children()) == 2


def test_conversation_continues_across_instances(instances):
    first, second = instances
    cat = generate(first, prompt="a cat", user_id="wanderer").json()
    blue = generate(second, prompt="make it blue", user_id="wanderer").json()
    assert blue["used_previous_image"] is True
    assert blue["source_image_urls"] == [cat["image_url"]]
    assert first.get("/nanobanana/history/wanderer").json()["last_image_url"] == blue["image_url"]


def test_conversation_continues_across_workers(instances):
    instance = instances[0]
    previous = generate(instance, prompt="a boat", user_id="sailor").json()["image_url"]
    for step in range(8):  # whichever worker takes each step, it edits the step before
        body = generate(instance, prompt=f"edit {step}", user_id="sailor").json()
        assert body["source_image_urls"] == [previous]
        previous = body["image_url"]


def test_late_result_completed_by_one_is_visible_to_all(instances):
    first, second = instances
    pending = generate(first, prompt="[delay=0.5] a late bird", user_id="owl", wait="0")
    assert pending.status_code == 202
    task_path = f"/nanobanana/tasks/{pending.json()['task_id']}"
    done = wait_until(lambda: (r := second.get(task_path)).status_code == 200 and r, timeout=10)
    assert first.get(task_path).json()["image_url"] == done.json()["image_url"]
    assert first.get("/nanobanana/history/owl").json()["last_image_url"] == done.json()["image_url"]


def test_redis_away_gives_503_spends_nothing_then_recovers(instances, redis_server, upstream):
    instance = instances[0]
    redis_server.stop()
    try:
        unrecorded = generate(instance, prompt="an unrecorded cat", user_id="lost")
        for answer in (unrecorded, instance.get("/nanobanana/history/lost")):
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "store_unavailable"
            assert "Traceback" not in answer.text
        assert not [t for t in upstream.tasks.values() if "unrecorded" in t.params["prompt"]]  # no charge
        health = instance.get("/healthz")
        assert health.status_code == 503
        assert (health.json()["status"], health.json()["store_ok"]) == ("degraded", False)
    finally:
        redis_server.start()
    assert wait_until(lambda: generate(instance, prompt="a cat", user_id="found").status_code == 200, timeout=10)
    assert instance.get("/healthz").json()["store_ok"] is True


def requests_answered(instance: Service) -> float:
    """nanobanana_http_requests_total for successful generations, as /metrics reports it."""
    for line in instance.get("/metrics").text.splitlines():
        if (
            line.startswith("nanobanana_http_requests_total")
            and 'route="/nanobanana"' in line
            and 'status="200"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_add_up_every_worker(instances):
    instance = instances[1]
    before = requests_answered(instance)
    with ThreadPoolExecutor(max_workers=20) as pool:  # enough at once to keep both workers busy
        answers = list(pool.map(lambda n: generate(instance, prompt=f"[delay=0.3] count {n}"), range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert requests_answered(instance) == before + 20


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """redis-server speaking only TLS with a self-signed certificate, as managed Redis (Heroku's) does."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=redis.invalid"]
        + ["-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True,
        capture_output=True,
    )
    server = RedisServer(tls=folder).start()
    yield server
    server.stop()


def test_managed_redis_over_tls_with_a_self_signed_certificate(upstream, tls_redis, tmp_path):
    environ = {"API_KEYS_1": KEY, "NANOBANANA_API_BASE": upstream.url, "POLL_INTERVAL": "0.05"}
    environ.update(REDIS_URL=f"{tls_redis.url}?ssl_cert_reqs=none", RATE_LIMIT="2/minute", WEB_CONCURRENCY="2")
    service = Service(environ, tmp_path / "tls.log").wait_ready()
    try:
        assert service.get("/healthz").json()["store"] == "redis"
        assert generate(service, prompt="a cat over tls", user_id="secure").status_code == 200
        assert generate(service, prompt="make it blue", user_id="secure").json()["used_previous_image"] is True
        limited = generate(service, prompt="make it green", user_id="secure")  # the count is kept in Redis too
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    finally:
        service.stop()
    verifying = Service({**environ, "REDIS_URL": tls_redis.url}, tmp_path / "verifying.log")
    try:  # without ssl_cert_reqs=none the certificate is checked, and this one is nobody's
        wait_until(lambda: health_of(verifying) == 503, timeout=30)
    finally:
        log = verifying.stop()
    assert "certificate verify failed" in log and "Traceback" not in log


def health_of(service: Service) -> int | None:
    try:
        return service.get("/healthz").status_code
    except requests.ConnectionError:  # not listening yet
        return None
