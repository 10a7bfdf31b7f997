"""/openapi.json describes every route and says what the parameter checks do, and the live service
conforms to it (schemathesis)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from config import IDEMPOTENCY_TTL, MAX_BODY_BYTES, in_words, size_in_words
from domain.params import (
    ACCEPTED_NAMES,
    FALSE_WORDS,
    FORMATS,
    MODEL_TABLE,
    MODELS,
    RESOLUTIONS,
    TRUE_WORDS,
    json_values,
    parse_format,
    parse_generation,
)
from errors import InvalidRequest
from tests.helpers import emulated_upstream
from tools.processes import Service, free_port


def test_document_is_valid_openapi(client):
    validate(client.get("/openapi.json").json)


def test_every_route_is_documented(app, client):
    documented = client.get("/openapi.json").json["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<task_id>", "{task_id}").replace("<path:user_id>", "{user_id}")
        path = path.replace("<name>", "{name}")
        assert path in documented, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in documented[path], f"{method} {rule.rule} is not in /openapi.json"


def test_security_is_declared_only_when_tokens_are_on(make_app, client):
    assert "securitySchemes" not in client.get("/openapi.json").json["components"]
    guarded = make_app(access_tokens=("t",)).test_client()
    document = guarded.get("/openapi.json").json
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/nanobanana"]["get"]["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


# -- the generation parameters: the document says what the parser does -------------------------------


def body_fields(document: dict) -> dict[str, dict]:
    return document["paths"]["/nanobanana"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]


def documented_names(schemas: dict[str, dict]) -> set[str]:
    return {name for own, schema in schemas.items() for name in (own, *schema.get("x-aliases", ()))}


def accepted(body: dict) -> bool:
    """Whether the service would take this JSON body (before anything is sent upstream)."""
    try:
        values = json_values({"prompt": "a cat", **body})
        parse_format(values)
        parse_generation(values, polling_window=60)
    except InvalidRequest:
        return False
    return True


def accepted_by_some_model(**fields) -> bool:
    return any(accepted({"model": model, **fields}) for model in MODELS)


@pytest.fixture
def fields(client) -> dict[str, dict]:
    return body_fields(client.get("/openapi.json").json)


def test_every_name_the_parser_reads_is_documented_and_nothing_else(client):
    document = client.get("/openapi.json").json
    generate = document["paths"]["/nanobanana"]
    query = {p["name"]: p["schema"] for p in generate["get"]["parameters"] if p["in"] == "query"}
    content = generate["post"]["requestBody"]["content"]
    form = content["application/x-www-form-urlencoded"]["schema"]["properties"]
    for schemas in (query, body_fields(document), form):
        assert documented_names(schemas) == set(ACCEPTED_NAMES)


EXAMPLES = {"string": "x", "integer": 1, "number": 0, "array": ["https://x.test/a.png"]}


def test_every_documented_name_is_read_from_a_json_body(fields):
    for own, schema in fields.items():
        example = schema["enum"][0] if "enum" in schema else EXAMPLES[schema["type"]]
        for name in (own, *schema.get("x-aliases", ())):
            assert name in json_values({name: example}), f"{name} is documented but not read"


@pytest.mark.parametrize(
    "name, start",
    [("prompt", ""), ("user_id", ""), ("from_task", ""), ("idempotency_key", ""), ("callback_url", "https://h.test/")],
)
def test_the_documented_max_length_is_the_longest_accepted(fields, name, start):
    longest = start.ljust(fields[name]["maxLength"], "x")
    assert accepted_by_some_model(**{name: longest})
    assert not accepted_by_some_model(**{name: longest + "x"})


def test_the_documented_max_items_is_the_most_images_accepted(fields):
    most = fields["image_url"]["maxItems"]
    images = [f"https://x.test/{n}.png" for n in range(most + 1)]
    assert accepted_by_some_model(image_url=images[:most])
    assert not accepted_by_some_model(image_url=images)


def test_the_documented_number_of_images_is_the_range_accepted(fields):
    schema = fields["num_images"]
    assert accepted_by_some_model(num_images=schema["minimum"]) and accepted_by_some_model(num_images=schema["maximum"])
    assert not accepted_by_some_model(num_images=schema["minimum"] - 1)
    assert not accepted_by_some_model(num_images=schema["maximum"] + 1)


@pytest.mark.parametrize("name", ["model", "resolution", "aspect_ratio", "reset", "format"])
def test_every_documented_choice_is_accepted(fields, name):
    for choice in fields[name]["enum"]:
        assert accepted_by_some_model(**{name: choice}), f"{name}={choice!r} is documented but refused"


def test_every_choice_the_parser_takes_is_documented(fields):
    assert fields["model"]["enum"] == list(MODELS)
    assert fields["resolution"]["enum"] == list(RESOLUTIONS)
    assert fields["format"]["enum"] == list(FORMATS)
    ratios = {ratio for model in MODEL_TABLE.values() for ratio in model.aspect_ratios}
    assert set(fields["aspect_ratio"]["enum"]) == ratios
    assert set(fields["reset"]["enum"]) == {True, False, *TRUE_WORDS, *FALSE_WORDS} - {""}


@pytest.mark.parametrize("reset", ["on", "off", "1", "no", True, False])
def test_reset_words_and_booleans_conform_to_the_document(client, reset):
    document = client.get("/openapi.json").json
    query = next(p for p in document["paths"]["/nanobanana"]["get"]["parameters"] if p["name"] == "reset")
    for schema in (query["schema"], body_fields(document)["reset"]):
        assert Draft202012Validator(schema).is_valid(reset)
    assert accepted({"reset": reset})


def test_descriptions_quote_the_configured_limits(client):
    document = client.get("/openapi.json").json
    assert in_words(IDEMPOTENCY_TTL) in body_fields(document)["idempotency_key"]["description"]
    too_large = document["paths"]["/nanobanana"]["post"]["responses"]["413"]["description"]
    assert size_in_words(MAX_BODY_BYTES) in too_large


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    with emulated_upstream(delay=0.0) as upstream:
        port = free_port()
        environ = {
            "API_KEYS_1": "schemathesis-key",
            "NANOBANANA_API_BASE": upstream.url,
            "POLL_INTERVAL": "0.05",
            "POLL_MAX_ATTEMPTS": "10",
            "RATE_LIMIT": "off",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",  # uploads work, and answer as documented
        }
        folder = tmp_path_factory.mktemp("schemathesis")
        running = Service({**environ, "MEDIA_DIR": str(folder / "media")}, folder / "service.log", port=port)
        running.wait_ready()
        yield running
        running.stop()


@pytest.mark.slow
def test_live_service_conforms_to_its_document(live_service, tmp_path):
    checks = ",".join(
        [
            "not_a_server_error",
            "status_code_conformance",
            "content_type_conformance",
            "response_schema_conformance",
            "response_headers_conformance",
            "unsupported_method",
        ]
    )
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{live_service.url}/openapi.json",
        "--url",
        live_service.url,
        "--checks",
        checks,
        "--max-examples",
        "25",
        "--seed",
        "20261124",
        "--max-redirects",
        "0",
        "--request-timeout",
        "20",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
