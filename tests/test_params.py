"""The parameter checks: whatever a caller sends, the answer is a result or a plain 4xx, never a 500; each
model's limits and every alias hold; and the try-it page offers what the checks take."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from domain.params import (
    ACCEPTED_NAMES,
    DEFAULT_MODEL,
    FIELDS,
    MAX_NUM_IMAGES,
    MAX_USER_ID,
    MODEL_TABLE,
    MODELS,
    RESOLUTION_MODELS,
    GenerationRequest,
    parse_generation,
)
from errors import InvalidRequest
from nanobanana_client import MODEL_PATHS

NAMES = [*ACCEPTED_NAMES, "unknown"]
EXAMPLES = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
any_values = st.dictionaries(st.sampled_from(NAMES), st.lists(st.text(max_size=60), min_size=1, max_size=3))
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
def client(make_app):
    return make_app(rate_limit=None, poll_max_attempts=2).test_client()


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


@given(body=st.dictionaries(st.sampled_from(NAMES), json_values))
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


# -- one table: the models, the names, the page ----------------------------------------------------


def refusal(values: dict[str, str]) -> str:
    with pytest.raises(InvalidRequest) as refused:
        parse_generation({name: [value] for name, value in values.items()}, polling_window=60)
    return refused.value.message


def test_every_model_the_client_can_call_has_its_limits():
    assert tuple(MODEL_PATHS) == MODELS
    assert set(MODEL_TABLE) == set(MODELS)


def test_an_unknown_model_is_refused_naming_every_model():
    message = refusal({"prompt": "a cat", "model": "banana-max"})
    assert all(model in message for model in MODELS)


@pytest.mark.parametrize("model", [name for name in MODELS if name not in RESOLUTION_MODELS])
def test_resolution_with_a_model_without_it_names_the_models_that_take_it(model):
    message = refusal({"prompt": "a cat", "model": model, "resolution": "2K"})
    assert all(f"model={name}" in message for name in RESOLUTION_MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_each_model_takes_exactly_its_prompt_limit(model):
    limit = MODEL_TABLE[model].max_prompt
    assert parse_generation({"prompt": ["x" * limit], "model": [model]}, polling_window=60)
    assert str(limit) in refusal({"prompt": "x" * (limit + 1), "model": model})


@pytest.mark.parametrize("model", MODELS)
def test_each_model_takes_exactly_its_image_limit(model):
    limit = MODEL_TABLE[model].max_images
    images = [f"https://x.test/{n}.png" for n in range(limit + 1)]
    assert parse_generation({"prompt": ["a"], "model": [model], "image_url": images[:limit]}, polling_window=60)
    assert f"at most {limit}" in refusal({"prompt": "a", "model": model, "image_url": ",".join(images)})


EXAMPLE_VALUES = {"image_url": "https://x.test/a.png", "user_id": "alice", "callback_url": "https://hooks.test/done"}


@pytest.mark.parametrize(
    "name, alias", [(field.name, alias) for field in FIELDS for alias in field.aliases], ids=lambda name: name
)
def test_an_alias_means_the_same_as_its_name(name, alias):
    def parsed(key: str) -> GenerationRequest:
        return parse_generation({"prompt": ["a cat"], key: [EXAMPLE_VALUES[name]]}, polling_window=60)

    assert parsed(alias) == parsed(name) != parse_generation({"prompt": ["a cat"]}, polling_window=60)


class PageForm(HTMLParser):
    """The prompt box's maxlength and the model choices of the try-it page."""

    def __init__(self, html: str):
        super().__init__()
        self.maxlength: str | None = None
        self.options: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "textarea" and attributes.get("id") == "prompt":
            self.maxlength = attributes.get("maxlength")
        if tag == "option":
            self.options.append(attributes)


def test_the_page_takes_prompts_as_long_as_the_longest_model_does(app):
    page = PageForm(app.test_client().get("/").text)
    assert page.maxlength == str(max(model.max_prompt for model in MODEL_TABLE.values()))


def test_the_page_offers_every_model_with_the_default_chosen(app):
    page = PageForm(app.test_client().get("/").text)
    assert [option["value"] for option in page.options] == list(MODELS)
    assert [option["value"] for option in page.options if "selected" in option] == [DEFAULT_MODEL]
    assert parse_generation({"prompt": ["a cat"]}, polling_window=60).generation.model == DEFAULT_MODEL


# -- the documentation's table of parameters (docs/api.md) ---------------------------------------------------------


def documented_parameters() -> dict[str, str]:
    """The rows of docs/api.md's table of generation parameters: name -> the rest of its row."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|(.*)$", text, flags=re.MULTILINE)
    return {name: rest for name, rest in rows if name in ACCEPTED_NAMES}


def test_the_documentation_lists_every_parameter_with_its_aliases():
    rows = documented_parameters()
    assert set(rows) == {field.name for field in FIELDS}
    for field in FIELDS:
        aliases_cell = rows[field.name].split("|")[0]
        assert set(re.findall(r"`(\w+)`", aliases_cell)) == set(field.aliases), field.name


def test_the_documentation_quotes_the_limits_of_every_model():
    rows = documented_parameters()
    for model in MODEL_TABLE.values():
        assert str(model.max_prompt) in rows["prompt"] and str(model.max_images) in rows["image_url"], model.name
    assert str(MAX_USER_ID) in rows["user_id"] and str(MAX_NUM_IMAGES) in rows["num_images"]


@pytest.mark.parametrize("name", ["image_url", "callback_url"])
def test_an_address_that_cannot_be_read_is_a_clear_400_not_a_500(client, name):
    answer = client.get("/nanobanana", query_string={"prompt": "a cat", name: "http://[x"})
    assert answer.status_code == 400 and "not a web address" in answer.json["error"]["message"]
