"""Shared fixtures: settings for tests, and the emulator reached through a swapped transport."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
import requests
import responses
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from app import create_app, start_background, stop_background
from config import Settings
from stores.interface import Store
from stores.postgres import PostgresStore
from stores.redis import RedisStore
from stores.sqlite import SqliteStore
from tests.helpers import SERVED_KEY, Served, emulated_upstream
from tools.emulator import Upstream, create_emulator
from tools.processes import PostgresServer, RedisServer, free_port, serving

UPSTREAM = "http://upstream.test"
KEYS = ("key-one", "key-two")


class EmulatorTransport(BaseAdapter):
    """A requests transport that hands every request to the emulator's WSGI app, in process.

    Each app under test gets its own session with this transport, so a background poll
    left over from one test can never reach the next test's upstream.
    """

    def __init__(self, upstream: Upstream):
        super().__init__()
        self.emulator = create_emulator(upstream).test_client()

    def send(self, request, **kwargs):
        url = urlsplit(request.url)
        answer = self.emulator.open(
            url.path,
            base_url=f"{url.scheme}://{url.netloc}",
            method=request.method,
            query_string=url.query,
            headers=dict(request.headers),
            data=request.body,
        )
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers = CaseInsensitiveDict(answer.headers)
        response._content = answer.get_data()
        response.url = request.url
        response.request = request
        return response

    def close(self):
        pass


class Clock:
    """A wall clock that moves only when a test moves it."""

    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def started(start):
    """A real server, started by `start()`; missing, it skips the test, or fails it when CI is set."""
    try:
        return start()
    except FileNotFoundError as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the whole run."""
    server = started(lambda: RedisServer().start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the whole run, with the service's database and user."""
    server = started(lambda: PostgresServer().start().create_database())
    yield server
    server.stop()
    server.remove()


@pytest.fixture(scope="module")
def served_upstream() -> Upstream:
    """The emulator on a port of its own, for services under gunicorn (`upstream` serves the test client)."""
    with emulated_upstream(delay=0.2, keys={SERVED_KEY: 1_000_000}) as state:
        yield state


@pytest.fixture
def upstream() -> Upstream:
    """The emulator's state: two keys with credits, generations that finish at once."""
    return Upstream(delay=0.0, keys={key: 100.0 for key in KEYS})


@pytest.fixture
def emulated(upstream) -> Upstream:
    return upstream


@pytest.fixture
def session(upstream) -> requests.Session:
    session = requests.Session()
    session.mount(UPSTREAM, EmulatorTransport(upstream))
    return session


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def settings() -> Settings:
    return Settings(
        api_keys=KEYS,
        api_base=UPSTREAM,
        poll_interval=0.01,  # a picture of the emulator, made at once, is answered at the first poll
        poll_max_attempts=150,
        submit_retry_backoff=0.01,
        database_path=":memory:",
        upstream_rate=None,  # the emulator has no limits unless a test gives it some (tests/test_queue.py)
        upstream_max_running=None,
    )


@pytest.fixture
def make_app(settings, session):
    """Apps with adjusted settings (and any parts handed in, like a store); each is stopped after the test.

    The upstream is the in-process emulator; with another `api_base` (a served emulator) it is real HTTP.
    """
    made = []

    def make(*, store=None, **changes):
        app = create_app(replace(settings, **changes), session=session, store=store)
        made.append(app)
        return app

    yield make
    for app in made:
        stop_background(app)


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def serve_app(make_app, served_upstream):
    """`serve(public=False, **changes)`: an app served over real HTTP on a port of its own, in this process, with
    its background work started, against the served emulator: what gunicorn does, without starting a process.
    `public` makes its own address PUBLIC_BASE_URL (callbacks, and lasting copies the upstream can fetch)."""
    with ExitStack() as serving_apps:

        def serve(public: bool = False, **changes) -> Served:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if public:
                changes["public_base_url"] = url
            app = make_app(api_keys=(SERVED_KEY,), api_base=served_upstream.url, poll_interval=0.1, **changes)
            start_background(app)
            serving_apps.enter_context(serving(app, port))
            return Served(app, url)

        yield serve


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def sqlite_store(clock, tmp_path) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "store.sqlite3"), history_ttl=3600, max_users=3, clock=clock)
    yield store
    store.close()


@pytest.fixture
def redis_store(redis_server, clock):
    store = RedisStore(redis_server.url, history_ttl=3600, clock=clock)
    store.redis.flushdb()
    yield store
    store.close()


@pytest.fixture
def postgres_store(postgres_server, clock):
    postgres_server.reset()
    store = PostgresStore(postgres_server.url, history_ttl=3600, max_users=3, clock=clock)
    yield store
    store.close()


@pytest.fixture(
    params=["sqlite", pytest.param("redis", marks=pytest.mark.slow), pytest.param("postgres", marks=pytest.mark.slow)]
)
def store(request) -> Store:
    """The behaviour every store shares, checked on each of them."""
    return request.getfixturevalue(f"{request.param}_store")
