"""Bad input at volume: whatever a caller sends, the answer is a result or a plain 4xx, never a 500."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app import create_app
from domain.params import GenerationRequest, parse_generation
from errors import InvalidRequest

FIELDS = [
    "prompt", "image_url", "image", "imageUrl", "image_urls", "model", "resolution", "user_id", "user", "userId",
    "aspect_ratio", "num_images", "reset", "wait", "format", "token", "unknown",
]  # fmt: skip
EXAMPLES = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
any_values = st.dictionaries(st.sampled_from(FIELDS), st.lists(st.text(max_size=60), min_size=1, max_size=3))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(any_values)
@hypothesis_settings(max_examples=500, deadline=None)
def test_parsing_gives_a_request_or_a_clear_error(values):
    try:
        parsed = parse_generation(values, polling_window=60)
    except InvalidRequest as error:
        assert error.message and "\n" not in error.message
    else:
        assert isinstance(parsed, GenerationRequest)
        assert 0 <= parsed.wait <= 60
        assert parsed.generation.prompt.strip() == parsed.generation.prompt


@pytest.fixture
def client(settings, session):
    return create_app(replace(settings, rate_limit=None, poll_max_attempts=2), session=session).test_client()


def assert_sane(answer) -> None:
    assert answer.status_code < 500 or answer.status_code in (502, 503), answer.text
    if answer.status_code >= 400 and answer.mimetype == "application/json":
        assert answer.json["status"] in ("error", "failed")
        assert answer.json["error"]["message"]


@given(values=any_values)
@EXAMPLES
def test_any_query_string_is_answered_sanely(client, values):
    answer = client.get("/nanobanana", query_string=values)
    assert_sane(answer)
    assert answer.status_code != 500


@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values))
@EXAMPLES
def test_any_json_body_is_answered_sanely(client, body):
    answer = client.post("/nanobanana", data=json.dumps(body), content_type="application/json")
    assert_sane(answer)
    assert answer.status_code != 500


@given(raw=st.binary(max_size=200))
@EXAMPLES
def test_any_raw_body_is_answered_sanely(client, raw):
    answer = client.post("/nanobanana", data=raw, content_type="application/json")
    assert answer.status_code == 400 or answer.status_code < 300, answer.text


@given(user_id=st.text(min_size=1, max_size=200).filter(lambda s: "/" not in s and s not in (".", "..")))
@EXAMPLES
def test_any_user_id_in_the_path_is_answered_sanely(client, user_id):
    for answer in (client.get(f"/nanobanana/history/{user_id}"), client.delete(f"/nanobanana/history/{user_id}")):
        assert answer.status_code in (200, 400, 404), answer.text
        assert answer.mimetype == "application/json"
