"""/openapi.json describes every route, and the live service conforms to it (schemathesis)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from app import create_app
from tests.helpers import emulated_upstream
from tools.processes import Service


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


def test_security_is_declared_only_when_tokens_are_on(settings, session, client):
    assert "securitySchemes" not in client.get("/openapi.json").json["components"]
    guarded = create_app(replace(settings, access_tokens=("t",)), session=session).test_client()
    document = guarded.get("/openapi.json").json
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/nanobanana"]["get"]["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    with emulated_upstream(delay=0.0) as upstream:
        environ = {
            "API_KEYS_1": "schemathesis-key",
            "NANOBANANA_API_BASE": upstream.url,
            "POLL_INTERVAL": "0.05",
            "POLL_MAX_ATTEMPTS": "10",
            "RATE_LIMIT": "off",
        }
        running = Service(environ, tmp_path_factory.mktemp("schemathesis") / "service.log").wait_ready()
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
