"""An offline emulator of the NanoBanana API, for the demo mode, the tests and the benchmarks.

It speaks the upstream as UPSTREAM.md describes it: the three generate endpoints with their
own field names, record-info, callbacks in both shapes, the credit endpoint, and placeholder
pictures (SVG) that show the prompt and what an edit was made from.

Behaviour is chosen per task by markers in the prompt:
  [delay=S]          generation takes S seconds (default: --delay)
  [fail]             the generation fails (successFlag 3)
  [create-fail]      the task cannot be created (successFlag 2)
  [flaky-polls=N]    the first N status polls of the task answer HTTP 500 with an HTML page
  [poll-hang=S]      every status poll of the task is answered only after S seconds
  [submit-code=C]    the submission answers body code C with HTTP 200 (429, 455, 500, 501, ...)
  [submit-http=C]    the submission answers HTTP C with a non-JSON page
  [submit-hang=S]    the task is created, but the answer is held back S seconds
  [callback=never|twice]   the callback is skipped, or delivered twice
  [callback-delay=S] the callback comes S seconds after the result
  [file-lifetime=S]  the picture's file is gone S seconds after the result (the real one lives ~14 days)
  [file-type=T]      the picture's file is served as content type T (text/html, say: not a picture)
  [file-redirect=U]  the picture's file answers 302 to the address U
  [file-delay=S]     the picture's file is sent only after S seconds
  [result-url=U]     the result's address is U instead of the emulator's own file
  [shape=S]          record-info (and the callback) answer in another shape seen in the wild: urls
                     (response.resultUrls), json (a resultJson string), or state (`state` instead of successFlag)

Limits, like the provider's sister platforms (the excess is answered code 429, not queued):
  --rate N/Ss        at most N submissions per key in any S seconds (say 20/10s)
  --max-running N    at most N tasks per key submitted and not yet finished
Both can be read and changed while it runs: GET and POST /_config ({"rate": "5/2s", "max_running": 10});
GET /_config also says how many submissions were refused for a limit.

Run it alone:  python -m tools.emulator --port 9000 --delay 3 --key demo-key=100 --key empty-key=0
(served by gunicorn with gevent, like the service)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import html
import json
import os
import re
import textwrap
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from flask import Flask, Response, jsonify, request

BASE_RATIOS = {"1:1", "9:16", "16:9", "3:4", "4:3", "3:2", "2:3", "5:4", "4:5", "21:9"}
RATIOS_2 = BASE_RATIOS | {"auto", "1:4", "4:1", "1:8", "8:1"}
COLOURS = {
    "red": "#d62828",
    "blue": "#1d4ed8",
    "green": "#2a9d8f",
    "yellow": "#f4c430",
    "orange": "#f77f00",
    "purple": "#7b2cbf",
    "pink": "#ff70a6",
    "black": "#222222",
    "white": "#f5f5f5",
    "grey": "#8d99ae",
}
MARKER = re.compile(r"\[([a-z-]+)(?:=([^\]]*))?\]")


@dataclass
class EmulatedTask:
    task_id: str
    key: str
    endpoint: str
    params: dict
    created: float
    ready_at: float
    flag_when_done: int  # 1 success, 2 not created, 3 failed
    image_urls: list[str]
    markers: dict[str, str]
    polls: int = 0
    polls_told_the_end: int = 0  # polls answered with the result

    @property
    def ready_wall_time(self) -> float:
        """When the result exists, on the wall clock, for benchmarks in other processes."""
        return time.time() + (self.ready_at - time.monotonic())


@dataclass
class Upstream:
    """The emulator's state: keys and their credits, tasks, and every call received."""

    delay: float = 3.0
    keys: dict[str, float] | None = None  # None: any key works, with unlimited credits
    tasks: dict[str, EmulatedTask] = field(default_factory=dict)
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)  # (path, key, task id)
    lock: threading.Lock = field(default_factory=threading.Lock)
    state_path: str | None = None  # tasks kept in this file (JSON lines) live on across restarts (demo mode)
    url: str | None = None  # where it listens, once served
    rate: tuple[int, float] | None = None  # at most this many submissions per key in any window of seconds
    max_running: int | None = None  # at most this many tasks per key submitted and not yet finished
    refused: int = 0  # submissions answered 429 for a limit
    files_served: dict[str, int] = field(default_factory=dict)  # requests for each task's picture files
    submitted_at: dict[str, deque] = field(default_factory=dict)  # each key's recent submissions (monotonic)

    def __post_init__(self):
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as lines:
                for line in lines:
                    task = _task_from_state(json.loads(line))
                    self.tasks[task.task_id] = task

    def keep(self, task: EmulatedTask) -> None:
        """Write a new task to the state file, if there is one."""
        if self.state_path:
            with open(self.state_path, "a") as lines:
                lines.write(json.dumps(_task_state(task)) + "\n")

    def over_limit(self, key: str) -> bool:
        """Whether a submission with this key now would break a limit (call under the lock)."""
        now = time.monotonic()
        if self.rate is not None:
            count, seconds = self.rate
            recent = self.submitted_at.setdefault(key, deque())
            while recent and recent[0] <= now - seconds:
                recent.popleft()
            if len(recent) >= count:
                return True
        if self.max_running is not None:
            running = sum(1 for task in self.tasks.values() if task.key == key and now < task.ready_at)
            if running >= self.max_running:
                return True
        return False

    def config(self) -> dict:
        rate = f"{self.rate[0]}/{self.rate[1]:g}s" if self.rate else None
        return {"rate": rate, "max_running": self.max_running, "refused": self.refused}

    def polls_of(self, task_id: str) -> int:
        with self.lock:
            return sum(1 for path, _, tid in self.calls if path.endswith("record-info") and tid == task_id)

    def submissions(self) -> list[tuple[str, str | None]]:
        """(key, task id) of every submission received, in order."""
        with self.lock:
            return [(key, tid) for path, key, tid in self.calls if "/generate" in path]


def create_emulator(upstream: Upstream | None = None) -> Flask:
    upstream = upstream or Upstream()
    callbacks = CallbackSender()
    app = Flask("emulator")
    app.extensions["upstream"] = upstream

    def envelope(code: int, message: str, data=None, message_key: str = "msg"):
        return jsonify({"code": code, message_key: message, "data": data})

    def caller_key() -> str | None:
        auth = request.headers.get("Authorization", "")
        return auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None

    def key_problem(key: str | None, cost: float = 0.0):
        if not key or (upstream.keys is not None and key not in upstream.keys):
            return 401, "You do not have access permissions"
        if upstream.keys is not None and upstream.keys[key] < cost:
            return 402, "Credits insufficient"
        return None

    def submit(endpoint: str):
        key = caller_key()
        message_key = "message" if endpoint == "generate-pro" else "msg"
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return envelope(400, "body must be JSON", message_key=message_key)
        prompt = body.get("prompt")
        markers = dict(MARKER.findall(prompt)) if isinstance(prompt, str) else {}
        with upstream.lock:
            upstream.calls.append((request.path, key or "", None))
            call_index = len(upstream.calls) - 1
        if "submit-http" in markers:
            return Response("<html><body>Bad gateway</body></html>", int(markers["submit-http"]), mimetype="text/html")
        if "submit-code" in markers:
            return envelope(int(markers["submit-code"]), "injected error", message_key=message_key)
        problem = validate(endpoint, body)
        if problem:
            return envelope(problem[0], problem[1], message_key=message_key)
        count = int(body.get("numImages", 1)) if endpoint == "generate" else 1
        with upstream.lock:
            refused = key_problem(key, cost=count)
            if refused:
                return envelope(*refused, message_key=message_key)
            if upstream.over_limit(key):
                upstream.refused += 1
                return envelope(429, "Too many requests, please slow down", message_key=message_key)
            upstream.submitted_at.setdefault(key, deque()).append(time.monotonic())
            if upstream.keys is not None:
                upstream.keys[key] -= count
            task = new_task(endpoint, key, body, markers, count)
            upstream.tasks[task.task_id] = task
            upstream.keep(task)
            upstream.calls[call_index] = (request.path, key, task.task_id)
        callbacks.schedule(task, upstream)
        if "submit-hang" in markers:
            time.sleep(float(markers["submit-hang"]))
        return envelope(200, "success", {"taskId": task.task_id}, message_key=message_key)

    def new_task(endpoint: str, key: str, body: dict, markers: dict, count: int) -> EmulatedTask:
        task_id = uuid.uuid4().hex
        delay = float(markers.get("delay", upstream.delay))
        flag = 3 if "fail" in markers else 2 if "create-fail" in markers else 1
        urls = [markers.get("result-url") or f"{request.host_url}files/{task_id}/{n}.svg" for n in range(count)]
        now = time.monotonic()
        return EmulatedTask(task_id, key, endpoint, body, now, now + delay, flag, urls, markers)

    app.add_url_rule("/api/v1/nanobanana/generate", "generate", lambda: submit("generate"), methods=["POST"])
    app.add_url_rule(
        "/api/v1/nanobanana/generate-pro", "generate_pro", lambda: submit("generate-pro"), methods=["POST"]
    )
    app.add_url_rule("/api/v1/nanobanana/generate-2", "generate_2", lambda: submit("generate-2"), methods=["POST"])

    @app.get("/api/v1/nanobanana/record-info")
    def record_info():
        key = caller_key()
        task_id = request.args.get("taskId")
        with upstream.lock:
            upstream.calls.append((request.path, key or "", task_id))
            if task_id is None:
                return envelope(500, "Server error")  # what the upstream does with `task_id`
            refused = key_problem(key)
            if refused:
                return envelope(*refused)
            task = upstream.tasks.get(task_id)
            if task is None or task.key != key:
                return envelope(404, "task not found")
            task.polls += 1
            if task.polls <= int(task.markers.get("flaky-polls", 0)):
                return Response("<html>Internal Server Error</html>", 500, mimetype="text/html")
        if "poll-hang" in task.markers:
            time.sleep(float(task.markers["poll-hang"]))
        if time.monotonic() >= task.ready_at:
            task.polls_told_the_end += 1
        return envelope(200, "success", record(task))

    @app.get("/api/v1/common/credit")
    def credit():
        key = caller_key()
        refused = key_problem(key)
        if refused and refused[0] == 401:
            return envelope(*refused)
        with upstream.lock:
            credits = upstream.keys[key] if upstream.keys is not None else 1000.0
        return envelope(200, "success", credits)

    @app.route("/_config", methods=["GET", "POST"])
    def limits_config():
        """Not part of the upstream: its limits, read and set while it runs."""
        wanted = request.get_json(silent=True) if request.method == "POST" else None
        with upstream.lock:
            if isinstance(wanted, dict):
                if "rate" in wanted:
                    upstream.rate = parse_rate(wanted["rate"])
                if "max_running" in wanted:
                    upstream.max_running = wanted["max_running"]
            return jsonify(upstream.config())

    @app.get("/emulator/tasks")
    def task_report():
        """Not part of the upstream: when each task's result existed and how often it was polled."""
        with upstream.lock:
            tasks = list(upstream.tasks.values())
        return jsonify({t.task_id: {"ready_at": t.ready_wall_time, "polls": t.polls} for t in tasks})

    @app.get("/files/<task_id>/<int:number>.svg")
    def picture(task_id: str, number: int):
        task = upstream.tasks.get(task_id)
        if task is None or task.flag_when_done != 1 or time.monotonic() < task.ready_at:
            return Response("not found", 404, mimetype="text/plain")
        if time.monotonic() > task.ready_at + float(task.markers.get("file-lifetime", "inf")):
            return Response("gone", 404, mimetype="text/plain")
        with upstream.lock:
            upstream.files_served[task_id] = upstream.files_served.get(task_id, 0) + 1
        if "file-delay" in task.markers:
            time.sleep(float(task.markers["file-delay"]))
        if "file-redirect" in task.markers:
            return Response("moved", 302, {"Location": task.markers["file-redirect"]}, mimetype="text/plain")
        return Response(placeholder_svg(task, number), content_type=task.markers.get("file-type", "image/svg+xml"))

    return app


def _task_state(task: EmulatedTask) -> dict:
    """A task as JSON, its times on the wall clock (monotonic times mean nothing to another process)."""
    state = {name: getattr(task, name) for name in ("task_id", "key", "endpoint", "params", "image_urls", "markers")}
    offset = time.time() - time.monotonic()
    return {**state, "flag": task.flag_when_done, "created": task.created + offset, "ready": task.ready_at + offset}


def _task_from_state(state: dict) -> EmulatedTask:
    offset = time.time() - time.monotonic()
    return EmulatedTask(
        state["task_id"],
        state["key"],
        state["endpoint"],
        state["params"],
        state["created"] - offset,
        state["ready"] - offset,
        state["flag"],
        state["image_urls"],
        state["markers"],
    )


def validate(endpoint: str, body: dict) -> tuple[int, str] | None:
    """The upstream's checks of each endpoint's own fields."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return 400, "prompt is required"
    images = body.get("imageUrls") or []
    if not isinstance(images, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in images
    ):
        return 400, "imageUrls must be a list of http(s) URLs"
    if endpoint == "generate":
        if body.get("type") not in ("TEXTTOIAMGE", "IMAGETOIAMGE"):
            return 422, "type must be TEXTTOIAMGE or IMAGETOIAMGE"
        if body["type"] == "IMAGETOIAMGE" and not images:
            return 400, "imageUrls is required for IMAGETOIAMGE"
        if body.get("numImages", 1) not in (1, 2, 3, 4):
            return 400, "numImages must be 1 to 4"
        if "image_size" in body and body["image_size"] not in BASE_RATIOS:
            return 400, "image_size is not supported"
        if "aspectRatio" in body:
            return 422, "aspectRatio is not a field of this endpoint"
        return None
    ratios = BASE_RATIOS | {"auto"} if endpoint == "generate-pro" else RATIOS_2
    limit = 8 if endpoint == "generate-pro" else 14
    if "type" in body or "image_size" in body or "numImages" in body:
        return 422, "unknown field for this endpoint"
    if len(images) > limit:
        return 400, f"at most {limit} imageUrls"
    if "aspectRatio" in body and body["aspectRatio"] not in ratios:
        return 400, "aspectRatio is not supported"
    if "resolution" in body and body["resolution"] not in ("1K", "2K", "4K"):
        return 400, "resolution must be 1K, 2K or 4K"
    if endpoint == "generate-2" and len(prompt) > 20000:
        return 400, "prompt is too long"
    return None


def record(task: EmulatedTask) -> dict:
    """record-info's `data` for a task, as the upstream would show it now."""
    done = time.monotonic() >= task.ready_at
    flag = task.flag_when_done if done else 0
    data = {
        "taskId": task.task_id,
        "paramJson": json.dumps(task.params),
        "createTime": int(task.created * 1000),
        "completeTime": int(task.ready_at * 1000) if done else None,
        "successFlag": flag,
        "response": None,
        "errorCode": None,
        "errorMessage": None,
    }
    if flag == 1:
        data["response"] = {"originImageUrl": task.image_urls[0], "resultImageUrl": task.image_urls[0]}
        if len(task.image_urls) > 1:
            data["response"]["resultUrls"] = task.image_urls
            data["response"]["resultImageUrl"] = task.image_urls
    elif flag in (2, 3):
        data["errorCode"] = 400 if flag == 2 else 501
        data["errorMessage"] = "the task could not be created" if flag == 2 else "the picture could not be generated"
    return reshaped(data, task.markers.get("shape"), task.image_urls)


STATES = {0: "generating", 1: "success", 2: "fail", 3: "fail"}


def reshaped(data: dict, shape: str | None, urls: list[str]) -> dict:
    """The record in a shape seen in the wild ([shape=urls|json|state]), or as record-info documents it."""
    if shape is None or data["successFlag"] not in (0, 1, 2, 3):
        return data
    done = data["successFlag"] == 1
    if shape == "urls":
        return {**data, "response": {"resultUrls": urls} if done else None}
    result = {"resultJson": json.dumps({"resultUrls": urls}) if done else None}
    if shape == "json":
        return {**data, "response": None, **result}
    state = {key: value for key, value in data.items() if key not in ("successFlag", "response", "errorMessage")}
    return {**state, "state": STATES[data["successFlag"]], "failMsg": data["errorMessage"], **result}


def callback_body(task: EmulatedTask) -> dict:
    """The callback, in the shape of the endpoint that created the task."""
    data = record(task)
    if task.endpoint == "generate-2" or "shape" in task.markers:
        return {"code": 200, "msg": "success", "data": {**data, "operationType": "generate"}}
    code = {1: 200, 2: 400, 3: 501}[task.flag_when_done]
    info = {"resultImageUrl": task.image_urls[0]} if code == 200 else None
    return {
        "code": code,
        "msg": "success" if code == 200 else data["errorMessage"],
        "data": {"taskId": task.task_id, "info": info},
    }


class CallbackSender:
    """Posts each task's callback when it is due, each in its own thread (a greenlet under gevent),
    as the upstream does: a slow receiver delays no other callback. Its thread ends after a minute
    with nothing to send, and starts again with the next callback."""

    IDLE_SECONDS = 60.0

    def __init__(self):
        self._due: list[tuple[float, str, EmulatedTask]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pool = None
        self._post_errors: type[Exception] = OSError

    def schedule(self, task: EmulatedTask, upstream: Upstream) -> None:
        url = task.params.get("callBackUrl")
        mode = task.markers.get("callback", "once")
        if not isinstance(url, str) or not url.startswith("http") or mode == "never":
            return
        at = task.ready_at + float(task.markers.get("callback-delay", 0))
        with self._wake:
            for _ in range(2 if mode == "twice" else 1):
                heapq.heappush(self._due, (at, task.task_id, task))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="emulator-callbacks", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        import urllib3  # here, not at the top: under gunicorn, gevent patches ssl before this runs

        # urllib3 rather than requests: a burst of a thousand callbacks must leave on time
        self._pool = urllib3.PoolManager(maxsize=64, block=True, timeout=urllib3.Timeout(connect=2, read=15))
        self._post_errors = urllib3.exceptions.HTTPError
        while (task := self._next_due()) is not None:
            threading.Thread(target=self._post, args=(task,), daemon=True).start()

    def _next_due(self) -> EmulatedTask | None:
        """The next callback once it is due; None (and the thread ends) after IDLE_SECONDS with none to send."""
        with self._wake:
            while not self._due or self._due[0][0] > time.monotonic():
                pause = self._due[0][0] - time.monotonic() if self._due else self.IDLE_SECONDS
                if not self._wake.wait(timeout=pause) and not self._due:
                    self._thread = None
                    return None
            return heapq.heappop(self._due)[2]

    def _post(self, task: EmulatedTask) -> None:
        # The real upstream retries a few times; the service polls as a fallback anyway.
        with contextlib.suppress(self._post_errors):
            self._pool.request("POST", task.params["callBackUrl"], json=callback_body(task), retries=False)


def placeholder_svg(task: EmulatedTask, number: int) -> str:
    """A picture that shows its prompt, and for an edit the pictures it was made from."""
    prompt = xml_text(MARKER.sub("", task.params.get("prompt", "")).strip())
    words = prompt.lower().split()
    colour = next((COLOURS[w] for w in words if w in COLOURS), None)
    colour = colour or "#" + hashlib.sha256(prompt.encode()).hexdigest()[:6]
    lines = textwrap.wrap(prompt, 34)[:8]
    sources = task.params.get("imageUrls") or []
    if sources:
        lines += ["", f"edited from {len(sources)} picture(s):"]
        names = [url.rstrip("/").rsplit("/files/", 1)[-1] for url in sources[:4]]
        lines += [xml_text(name if len(name) <= 30 else name[:29] + "…") for name in names]
    text = "".join(
        f'<text x="32" y="{80 + 34 * i}" font-size="26">{html.escape(line)}</text>' for i, line in enumerate(lines)
    )
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512" viewBox="0 0 512 512">'
        f'<rect width="512" height="512" fill="{colour}"/>'
        '<rect x="16" y="16" width="480" height="480" rx="24" fill="white" fill-opacity="0.82"/>'
        f'<g font-family="sans-serif" fill="#111">{text}'
        f'<text x="32" y="480" font-size="16" fill="#555">NanoBanana emulator · image {number + 1}</text></g></svg>'
    )


def xml_text(text: str) -> str:
    """The text with what XML 1.0 cannot hold (NUL and other controls, lone surrogates) made a visible "?"."""
    return "".join("?" if _not_xml(c) else c for c in text)


def _not_xml(c: str) -> bool:
    return (c < " " and c not in "\t\n\r") or "\ud800" <= c <= "\udfff" or c in "\ufffe\uffff"


def parse_rate(value: str | None) -> tuple[int, float] | None:
    """`N/Ss` (say 20/10s) as (N, S); None or "off": no limit."""
    if value in (None, "", "off"):
        return None
    count, _, seconds = str(value).partition("/")
    return int(count), float(seconds.rstrip("s") or 1)


def parse_keys(pairs: list[str]) -> dict[str, float] | None:
    """`NAME=CREDITS` pairs; none means any key is accepted."""
    if not pairs:
        return None
    keys = {}
    for pair in pairs:
        name, _, credits = pair.partition("=")
        keys[name] = float(credits or 1000)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description="Offline emulator of the NanoBanana API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay", type=float, default=3.0, help="seconds a generation takes")
    parser.add_argument("--key", action="append", default=[], help="NAME=CREDITS; repeat; none: any key works")
    parser.add_argument("--state", help="a file that keeps the tasks across restarts (JSON lines)")
    parser.add_argument("--rate", help="at most N submissions per key in any S seconds: N/Ss, like 20/10s")
    parser.add_argument("--max-running", type=int, help="at most N tasks per key submitted and not yet finished")
    args = parser.parse_args()

    from gunicorn.app.base import BaseApplication

    class EmulatorServer(BaseApplication):
        """gunicorn with gevent, so the emulator keeps up with a thousand waiting requests in benchmarks."""

        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("worker_class", "gevent")
            self.cfg.set("worker_connections", 20000)
            # Keep idle connections as long as web servers commonly do (nginx: 75 s). gunicorn's 2 s closes
            # them so often that a client now and then sends on one just being closed, which a real
            # upstream would seldom make it do.
            self.cfg.set("keepalive", 75)
            self.cfg.set("backlog", 4096)
            self.cfg.set("control_socket_disable", True)

        def load(self):  # in the worker, after gevent has patched the standard library
            limits = {"rate": parse_rate(args.rate), "max_running": args.max_running}
            upstream = Upstream(delay=args.delay, keys=parse_keys(args.key), state_path=args.state, **limits)
            return create_emulator(upstream)

    print(f"NanoBanana emulator on http://{args.host}:{args.port} (generation {args.delay:g} s)", flush=True)
    EmulatorServer().run()


if __name__ == "__main__":
    main()
