"""gunicorn settings for the Procfile and `make run`.

WEB_CONCURRENCY gevent workers (every store serves several): a request that waits a minute for its
picture holds a greenlet (a few KB), not a thread. Measured with `make bench` against threads (gthread),
gevent used about half the CPU per request and kept the added delay under one poll interval at 1,000
requests in flight; see docs/benchmark.md.

The worker timeout only watches the worker's heartbeat, so a request inside its wait is never
killed for being slow, and a restart lets waiting requests finish (graceful_timeout).
"""

import glob
import logging
import os
import resource
import shutil
import sqlite3
import sys
import tempfile

# Every worker writes its metrics to this folder, and /metrics adds them up (prometheus-client multiprocess
# mode); a fresh folder per start, so counts of an earlier run never leak in, removed when the service stops.
# Set before prometheus_client is first imported (by telemetry), which reads it then.
METRICS_PREFIX = "nanobanana-metrics-"
MAX_CLIENT_CONNECTIONS = 15_000  # waiting requests and callbacks; docs/benchmark.md: 10,000 waiting in one process
FILES_KEPT_FREE = 3_000  # for connections to the upstream (its pool keeps up to 1,024), Redis, the database


def remove_stale_metrics() -> None:
    """The folders of earlier starts whose master is gone (killed, so on_exit never ran): named by its pid."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), METRICS_PREFIX + "*-*")):
        pid = os.path.basename(folder)[len(METRICS_PREFIX) :].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    remove_stale_metrics()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")

from config import ConfigError, load_settings  # noqa: E402
from stores.sqlite import check_database, open_database  # noqa: E402
from web.telemetry import OneLineFormatter  # noqa: E402

try:
    settings = load_settings()
    if settings.store_name == "sqlite":  # check, then create or migrate the schema once, before any worker starts
        warning = check_database(settings.database_path)
        if warning:
            print(f"Warning: {warning}", file=sys.stderr)
        open_database(settings.database_path).close()
except ConfigError as error:
    sys.exit(f"Configuration error: {error}")
except sqlite3.Error as error:
    sys.exit(f"Configuration error: DATABASE_PATH={settings.database_path!r} cannot be used: {error}")


def connections_per_worker() -> int:
    """As many as the open-file limit allows (raised to its hard limit), keeping room for upstream calls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return max(1000, min(MAX_CLIENT_CONNECTIONS, hard - FILES_KEPT_FREE))


# No thread name in any log line: asked for in a greenlet, it costs a dummy thread object per request.
logging.logThreads = False
log_handler = logging.StreamHandler()
log_handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
logging.basicConfig(level=logging.INFO, handlers=[log_handler])

bind = f"0.0.0.0:{settings.port}"
workers = settings.web_concurrency
worker_class = "web.worker.Worker"  # gevent, with the service's own answers at the HTTP edge
worker_connections = connections_per_worker()  # requests one worker holds at once, waiting ones included
backlog = 4096
graceful_timeout = int(settings.polling_window + settings.submit_read_timeout + 10)
# A GET may carry a 20,000-character prompt, percent-encoded to six times that; gunicorn's own limit stops
# at 8 KB. 0 lifts it, and worker.py puts its own (REQUEST_LINE_LIMIT) in its place.
limit_request_line = 0
accesslog = None  # the app writes its own, cheaper line per request
# X-Forwarded-* are the app's business (PROXY_HOPS); gunicorn must not take the scheme from them too.
secure_scheme_headers = {}
# gunicorn's control socket lives at one path per user; instances on one machine would share it.
control_socket_disable = True


def post_worker_init(worker):
    """Each worker renews its lease, takes over orphaned tasks and delivers webhooks from the start."""
    from app import start_background

    start_background(worker.wsgi)


def worker_exit(server, worker):
    """A worker that stops (a deploy, a reload) hands its pending tasks over at once."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        from app import stop_background

        stop_background(app)


def on_exit(server):
    """Remove the metrics folder this start made (one given in the environment is the owner's to keep)."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if os.path.basename(folder).startswith(METRICS_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
