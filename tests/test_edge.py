"""The HTTP edge over real sockets: malformed HTTP, long lines, slow clients, proxies, logs, make run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client import CONTENT_TYPE_LATEST

from config import BODY_TIMEOUT, REQUEST_LINE_LIMIT
from tests.helpers import png, served_environ
from tools.processes import ROOT, Service, free_port, wait_until

pytestmark = pytest.mark.slow

TOKEN = "edge-token-do-not-log"


@pytest.fixture(scope="module")
def service(served_upstream, tmp_path_factory):
    running = Service(served_environ(served_upstream), tmp_path_factory.mktemp("edge") / "service.log").wait_ready()
    yield running
    running.stop()


def raw(service: Service, data: bytes, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer (sending may be cut off)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=timeout) as sock:
        sender = threading.Thread(target=send_quietly, args=(sock, data), daemon=True)
        sender.start()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sender.join(timeout)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the service answered and closed before reading everything
        sock.sendall(data)


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


# -- malformed HTTP gets the service's JSON, and the log keeps nothing of it -------------------------


@pytest.mark.parametrize(
    "request_bytes, status, code",
    [
        (f"GET /nanobanana?prompt=a+secret+plan&token={TOKEN} HTTP/1.1 junk\r\n\r\n".encode(), 400, "invalid_request"),
        (b"HELLO\r\n\r\n", 400, "invalid_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "too_large"),
        (b"POST /nanobanana HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n", 400, "invalid_request"),
        (b"POST /nanobanana HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "invalid_request"),
    ],
)
def test_malformed_http_is_answered_in_json(service, request_bytes, status, code):
    answered, headers, body = raw(service, request_bytes)
    assert (answered, headers["Content-Type"], error_code(body)) == (status, "application/json", code)
    assert json.loads(body)["status"] == "error"


def test_a_chunked_body_over_a_megabyte_is_413(service):
    chunk = b"a" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
    head = (
        b"POST /nanobanana HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answered, _, body = raw(service, head + body)
    assert (answered, error_code(body)) == (413, "too_large")


def test_the_log_never_holds_a_raw_request_line(served_upstream, tmp_path):
    watched = Service(served_environ(served_upstream), tmp_path / "watched.log").wait_ready()
    raw(watched, f"GET /nanobanana?prompt=a+secret+plan&token={TOKEN} HTTP/1.1 junk\r\n\r\n".encode())
    raw(watched, f"BREW /pot?token={TOKEN} HTCPCP/1.0\r\n\r\n".encode())
    output = watched.stop()
    assert "refused a request that is not valid HTTP" in output
    assert TOKEN not in output and "secret" not in output


def test_a_long_prompt_fits_and_a_longer_line_is_414(service):
    fits = requests.get(f"{service.url}/nanobanana", params={"prompt": "é" * 20000, "model": "nano-banana-2"})
    assert fits.status_code == 200
    status, headers, body = raw(
        service, b"GET /nanobanana?prompt=" + b"a" * (REQUEST_LINE_LIMIT + 10) + b" HTTP/1.1\r\n\r\n"
    )
    assert (status, error_code(body)) == (414, "too_large") and "POST" in json.loads(body)["error"]["message"]


def test_a_megabyte_request_line_is_refused_without_reading_it(service):
    started = time.monotonic()
    status, _, body = raw(service, b"GET /?" + b"a" * 1_500_000 + b" HTTP/1.1\r\n\r\n")
    assert (status, error_code(body)) == (414, "too_large")
    assert time.monotonic() - started < 5


# -- slow clients are cut off, and do not block anyone else ------------------------------------------


async def trickle(port: int, head: bytes, piece: bytes) -> tuple[int, float]:
    """Send a head, then one piece of body a second, until the service answers; its status and when."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)

    async def drip():
        try:
            while True:
                await asyncio.sleep(1)
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    dripping = asyncio.create_task(drip())
    answer = await asyncio.wait_for(reader.read(4096), timeout=BODY_TIMEOUT + 20)
    dripping.cancel()
    writer.close()
    return int(answer.split(b" ")[1]), time.monotonic() - started


def test_slow_bodies_are_cut_off_and_leave_everyone_else_answered(service):
    slow_head = (
        b"POST /nanobanana HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    endless_head = (
        b"POST /nanobanana HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    others: dict[str, int] = {}

    def meanwhile():
        time.sleep(2)  # the slow clients are all connected and dripping by now
        others["healthz"] = requests.get(f"{service.url}/healthz", timeout=5).status_code
        others["generation"] = requests.get(
            f"{service.url}/nanobanana", params={"prompt": "a cat"}, timeout=10
        ).status_code

    async def crowd():
        slow = [trickle(service.port, slow_head, b" ") for _ in range(2100)]
        endless = trickle(service.port, endless_head, b"1\r\n \r\n")
        return await asyncio.gather(endless, *slow)

    checker = threading.Thread(target=meanwhile)
    checker.start()
    answers = asyncio.run(crowd())
    checker.join()
    assert others == {"healthz": 200, "generation": 200}
    assert {status for status, _ in answers} == {408}
    assert max(elapsed for _, elapsed in answers) < BODY_TIMEOUT + 10


# -- answers as documented, over HTTP --------------------------------------------------------------


def test_json_fields_are_checked_by_type_over_http(service, served_upstream):
    marker = "typed-" + str(time.monotonic())
    answer = requests.post(f"{service.url}/nanobanana", json={"prompt": [marker, "a dog"]}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["message"].startswith("prompt")
    assert not [task for task in served_upstream.tasks.values() if marker in str(task.params["prompt"])]


def test_rate_limit_over_http(served_upstream, tmp_path):
    limited = Service(served_environ(served_upstream, RATE_LIMIT="2/minute"), tmp_path / "limited.log").wait_ready()
    try:
        refused = [limited.get("/nanobanana", params={"prompt": "a cat", "format": "xml"}) for _ in range(4)]
        assert [answer.status_code for answer in refused] == [400] * 4
        answers = [limited.get("/nanobanana", params={"prompt": "a cat", "format": "text"}) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200, 200, 429]
        assert not [name for name in answers[0].headers if name.lower().startswith(("x-ratelimit", "retry-after"))]
        assert int(answers[2].headers["Retry-After"]) > 0
        assert answers[2].headers["Content-Type"].startswith("text/plain") and answers[2].text.startswith("Too many")
    finally:
        limited.stop()


# -- proxies, callbacks and the log ---------------------------------------------------------------------


def test_forwarded_headers_count_only_behind_proxy_hops(served_upstream, tmp_path):
    base = served_environ(served_upstream, RATE_LIMIT="2/minute")
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    for hops, trusted in (("0", False), ("1", True)):
        edge = Service({**base, "PROXY_HOPS": hops}, tmp_path / f"hops-{hops}.log").wait_ready()
        try:
            pending = edge.get("/nanobanana", params={"prompt": "[delay=1] a cat", "wait": "0"}, headers=forged)
            assert pending.json()["status_url"].startswith("https://evil.example/") is trusted
            edge.get("/nanobanana", params={"prompt": "a cat"}, headers=forged)
            # a third request from the same client, claiming yet another address
            third = edge.get("/nanobanana", params={"prompt": "a cat"}, headers={"X-Forwarded-For": "198.51.100.1"})
            assert (third.status_code == 429) is not trusted
        finally:
            edge.stop()


def test_callbacks_with_any_secret_or_task_id_are_answered_and_logged_on_one_line(served_upstream, tmp_path):
    environ = served_environ(served_upstream, PUBLIC_BASE_URL="http://127.0.0.1:1")
    receiving = Service(environ, tmp_path / "callbacks.log").wait_ready()
    callback = f"{receiving.url}/nanobanana/callback"
    forged = {"code": 200, "data": {"taskId": "evil\nFORGED LINE", "info": {"resultImageUrl": "https://x.test/a"}}}
    answers = [
        requests.post(callback, params={"secret": "sécret ☃", "task": "t\x00"}, json=forged, timeout=5),
        requests.post(f"{callback}?secret=%FF%FE%00", json=forged, timeout=5),
    ]
    output = receiving.stop()
    assert [answer.status_code for answer in answers] == [200, 200]
    assert "Traceback" not in output
    assert not [line for line in output.splitlines() if line.startswith("FORGED LINE")]
    assert "evil\\nFORGED LINE" in output


def test_healthz_and_metrics_over_http(service):
    health = service.get("/healthz").json()
    assert health == {
        "status": "ok",
        "configured": True,
        "api_keys": 1,
        "store": "sqlite",
        "store_ok": True,
        "demo": False,  # an emulator on this machine, but not started by `make run` for want of a key
    }
    metrics = service.get("/metrics")
    assert metrics.headers["Content-Type"] == CONTENT_TYPE_LATEST and CONTENT_TYPE_LATEST.count("charset") == 1


def test_the_metrics_folder_goes_when_the_service_stops(served_upstream, tmp_path):
    running = Service(served_environ(served_upstream), tmp_path / "m.log").wait_ready()
    made = set(running.tmp_dir.glob("nanobanana-metrics-*"))
    running.stop()
    assert len(made) == 1 and not made.pop().exists()


def test_metrics_folders_left_by_a_killed_service_are_removed_at_the_next_start(served_upstream, tmp_path):
    killed = Service(served_environ(served_upstream), tmp_path / "killed.log").wait_ready()
    killed.kill()
    [left] = killed.tmp_dir.glob("nanobanana-metrics-*")
    another = killed.tmp_dir / f"nanobanana-metrics-{os.getpid()}-running"  # a service still running: kept
    another.mkdir()
    again = Service({**served_environ(served_upstream), "TMPDIR": str(killed.tmp_dir)}, tmp_path / "again.log")
    again.wait_ready()
    try:
        assert not left.exists() and another.exists()
        assert len(list(killed.tmp_dir.glob("nanobanana-metrics-*"))) == 2  # its own, and the running one's
    finally:
        again.stop()


# -- make run ---------------------------------------------------------------------------------------


def make_run(tmp_path: Path, port: int, name: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("API_KEYS_")}
    environ.update(PORT=str(port), DATABASE_PATH=str(tmp_path / "run.sqlite3"), MEDIA_DIR=str(tmp_path / "media"))
    with open(tmp_path / name, "w") as output:  # the child keeps its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "tools.serve"], cwd=ROOT, env=environ, stdout=output, stderr=output
        )


def test_make_run_stops_everything_it_started_and_refuses_a_busy_port(tmp_path):
    port = free_port()
    running = make_run(tmp_path, port, "first.log")
    wait_until(lambda: _answers(port), timeout=30)
    started = psutil.Process(running.pid).children(recursive=True)
    assert len(started) >= 4  # the service and the emulator, each a gunicorn and a worker

    second = make_run(tmp_path, port, "second.log")
    assert second.wait(timeout=30) != 0
    output = (tmp_path / "second.log").read_text().strip()
    assert len(output.splitlines()) == 1 and f"Port {port} is already in use" in output

    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=60) == 0
    wait_until(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], timeout=30)


def test_make_run_without_a_key_is_a_demo_whose_pictures_come_by_callback(tmp_path):
    port = free_port()
    running = make_run(tmp_path, port, "demo.log")
    try:
        wait_until(lambda: _answers(port), timeout=30)
        service = f"http://127.0.0.1:{port}"
        assert requests.get(f"{service}/healthz", timeout=5).json()["demo"] is True
        body = requests.get(f"{service}/nanobanana", params={"prompt": "a cat"}, timeout=30).json()
        assert body["status"] == "success" and body["image_url"].startswith(f"{service}/media/")  # downloadable
        emulated = requests.get(f"http://127.0.0.1:{port + 1}/emulator/tasks", timeout=5).json()
        assert emulated[body["upstream_task_id"]]["polls"] == 0  # the emulator called back: nobody had to ask
        upload = requests.post(
            f"{service}/nanobanana/uploads", data=png(), headers={"Content-Type": "image/png"}, timeout=10
        )
        assert upload.status_code == 201 and upload.json()["url"].startswith(f"{service}/media/")
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(timeout=60)
    assert "calls the service back" in (tmp_path / "demo.log").read_text()


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False
