"""docs/openapi.yaml describes the HTTP API: every route, and only routes that exist; schemathesis fuzzes it.

The fuzzing runs in-process on the WSGI app with no online agent, so every
chat answers 404 ``model_not_found`` at once instead of streaming, and with
``MAX_LONG_POLL`` 0, so a poll never parks.  Agent requests are signed: the
agent endpoints are fuzzed past their signature check, not stopped by it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocol.signing import signed_headers
from server.storage.agents import AgentCredentials

# In the dev extra (setup.cfg); skipped rather than a collection error in a venv made before it was.
schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = {"get", "post", "put", "patch", "delete"}
AGENT_PATHS = {"/api/v1/inference/poll", "/api/v1/inference/stream", "/api/v1/inference/models",
               "/api/v1/inference/leave"}
# The catch-all that gives OpenAI clients OpenAI's 404 on unknown paths: a fuzzed `{path}` of
# "models" is the real /v1/models, which answers 200; no schema can say "any path but those".
NOT_FUZZED = r"^/v1/\{path\}$"
EXAMPLES = 30          # per operation, half valid, half not: ~20 operations in well under a minute


def described() -> set[tuple[str, str]]:
    paths = yaml.safe_load(SPEC.read_text())["paths"]
    return {(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
            for path, item in paths.items() for method in item if method in METHODS}


def routed(app) -> set[tuple[str, str]]:
    # Flask's <converter:name> and OpenAPI's {name} compared by shape: the names are documentation.
    return {(method, re.sub(r"<[^>]+>", "{}", rule.rule))
            for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_of_the_app_is_described(app):
    assert sorted(routed(app) - described()) == []


def test_every_described_operation_is_a_route_of_the_app(app):
    assert sorted(described() - routed(app)) == []


# --- fuzzing ----------------------------------------------------------------

@pytest.fixture
def app_config():
    return {"MAX_LONG_POLL": 0}


def operations() -> list[str]:
    loaded = schemathesis.openapi.from_path(SPEC).exclude(path_regex=NOT_FUZZED)
    return [result.ok().label for result in loaded.get_all_operations()]


def signed_call(case, client, creds: AgentCredentials):
    """Send the case as schemathesis would, signed over exactly the bytes sent; the response and headers."""
    sent = case.as_transport_kwargs()
    body = json.dumps(sent["json"]).encode() if "json" in sent else sent.get("data") or b""
    body = body.encode() if isinstance(body, str) else body
    query = urlencode(sent.get("query_string") or {}, doseq=True)
    target = sent["path"] + ("?" + query if query else "")
    headers = {**sent["headers"], **signed_headers(creds.id, creds.secret, sent["method"], target, body,
                                                   int(time.time()))}
    return client.open(sent["path"], method=sent["method"], query_string=query, data=body, headers=headers), headers


# schemathesis' own pytest integration (`from_fixture`) reads a pytest attribute that pytest 9
# removed; its Hypothesis strategies, run here under `given`, need none of it.
@pytest.mark.parametrize("label", operations())
def test_fuzzed_requests_get_described_answers_and_never_a_5xx(label, app, client, agent_creds):
    loaded = schemathesis.openapi.from_path(SPEC)
    loaded.app = app
    method, path = label.split(" ", 1)
    operation = loaded[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(cases)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def answers_as_described(case) -> None:
        # A case whose negated part is the signature headers goes out unsigned: it must get its 401.
        if path in AGENT_PATHS and not case.meta.is_negative_at(ParameterLocation.HEADER):
            # Given the headers, the ignored_auth check also resends without them and expects a 401.
            response, headers = signed_call(case, client, agent_creds)
            case.validate_response(response, headers=headers)
        else:
            case.validate_response(case.call())

    answers_as_described()
