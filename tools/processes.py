"""Real processes for the tests and the benchmark: free ports, bounded waiting, a WSGI app served in a
thread, redis-server, and the service under gunicorn exactly as the Procfile runs it."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import redis
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
SERVE_POLL = 0.05  # how often a served app looks for its stop: werkzeug's 0.5 s made every teardown slow


def wait_until(condition, timeout: float = 5.0, every: float = 0.02):
    """Return condition()'s first truthy value, failing if none comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app, port: int = 0) -> Iterator[str]:
    """Serve a WSGI app on 127.0.0.1 (on `port`, or any free one) in a thread; yields its base URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(SERVE_POLL,), name="serving", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def procfile_command() -> list[str]:
    """The Procfile's `web:` command, as a PaaS runs it."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    return shlex.split(line.removeprefix("web:"))


class RedisServer:
    """A real redis-server on a free port; it can be stopped and started again. With `tls` (a folder holding
    cert.pem and key.pem), it speaks only TLS, as managed Redis does, and its url says rediss://."""

    MISSING = "redis-server is not installed (Debian: apt-get install redis-server)"

    def __init__(self, tls: Path | None = None):
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError(self.MISSING)
        self.executable = executable
        self.port = free_port()
        self.tls = tls
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        command = [self.executable, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.tls / "cert.pem"), "--tls-key-file", str(self.tls / "key.pem")]
        else:
            command += ["--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url + ("?ssl_cert_reqs=none" if self.tls else ""))
        wait_until(lambda: _pings(client), timeout=10)
        client.close()
        return self

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


class Service:
    """gunicorn running the Procfile's command with the given environment.

    Each one gets a temporary folder of its own beside its log (`tmp_dir`), so what a crash leaves
    behind (gunicorn's clean-up is skipped) never lands in /tmp.
    """

    def __init__(self, environ: dict[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_KEYS_")}
        env["DATABASE_PATH"] = str(log_path.with_suffix(".sqlite3"))  # each service its own, unless told
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"{log_path.stem}-tmp-", dir=log_path.parent))
        env["TMPDIR"] = str(self.tmp_dir)
        env.update(environ, PORT=str(self.port), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            procfile_command(), cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> Service:
        def ready():
            assert self.process.poll() is None, f"gunicorn exited: {self.log_path.read_text()}"
            try:
                return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except requests.RequestException:  # not listening yet, or still loading (a busy machine)
                return False

        try:
            wait_until(ready, timeout=30)
        except BaseException:
            self.kill()  # a service that never came up must not outlive the test that started it
            raise
        return self

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()
        return self.log_path.read_text()

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def kill(self) -> None:
        """A crash: SIGKILL to gunicorn and its workers at once, so nothing gets to clean up."""
        with contextlib.suppress(psutil.NoSuchProcess):  # it may have exited already
            for process in [psutil.Process(self.process.pid), *self.workers()]:
                process.kill()
        self.process.wait(timeout=30)
        self.log.close()


class PostgresServer:
    """A real PostgreSQL server in a folder of its own, on a free port, with a database and a user that has a
    password (so that tests can look for it where it must never be). PostgreSQL refuses to run as root: as
    root, the server runs as the `postgres` user that Debian's package creates."""

    MISSING = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    USER, PASSWORD, DATABASE = "nanobanana", "pg-test-password-never-shown", "nanobanana"

    def __init__(self):
        self.bin = _postgres_bin()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="nanobanana-pg-"))
        self.data = self.folder / "data"
        self.url = f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{self.DATABASE}"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.folder, self._user)
        self._pg(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        self._options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        )

    def start(self) -> PostgresServer:
        self._pg(["pg_ctl", "-D", str(self.data), "-o", self._options, "-l", str(self.folder / "log"), "-w", "start"])
        return self

    def create_database(self) -> PostgresServer:
        """The service's user (with its password) and an empty database it owns."""
        import psycopg

        with psycopg.connect(host=str(self.folder), port=self.port, user="postgres", autocommit=True) as db:
            db.execute(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.PASSWORD}'")
            db.execute(f"CREATE DATABASE {self.DATABASE} OWNER {self.USER}")
        return self

    def reset(self) -> None:
        """An empty database again (the tables are made by the next store that connects)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    def stop(self) -> None:
        self._pg(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _pg(self, command: list[str]) -> None:
        command = [str(self.bin / command[0]), *command[1:]]
        subprocess.run(command, check=True, capture_output=True, user=self._user, cwd=self.folder)


def _postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: on the PATH, else where Debian puts them (the newest version)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise FileNotFoundError(PostgresServer.MISSING)
    return versions[-1].parent
