"""Shared fixtures: settings for tests, and the emulator reached through `responses`."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import responses

from app import create_app
from config import Settings
from emulator import Upstream, create_emulator

UPSTREAM = "http://upstream.test"
KEYS = ("key-one", "key-two")


@pytest.fixture
def upstream() -> Upstream:
    """The emulator's state: two keys with credits, generations that finish at once."""
    return Upstream(delay=0.0, keys={key: 100.0 for key in KEYS})


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def emulated(mocked, upstream):
    """Every request to UPSTREAM is answered by the emulator, in process, at the HTTP layer."""
    emulator = create_emulator(upstream).test_client()

    def forward(prepared):
        url = urlsplit(prepared.url)
        answer = emulator.open(
            url.path,
            base_url=UPSTREAM,
            method=prepared.method,
            query_string=url.query,
            headers=dict(prepared.headers),
            data=prepared.body,
        )
        return answer.status_code, dict(answer.headers), answer.get_data()

    for method in (responses.GET, responses.POST):
        mocked.add_callback(method, re.compile(re.escape(UPSTREAM) + "/.*"), callback=forward)
    return upstream


@pytest.fixture
def settings() -> Settings:
    return Settings(api_keys=KEYS, api_base=UPSTREAM, poll_interval=0.05, poll_max_attempts=30)


@pytest.fixture
def app(settings, emulated):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()
