"""One JSON error envelope for every API error; never an HTML page, never a 500 for client input."""
from __future__ import annotations

import pytest


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.data[:300]
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_unknown_api_route_is_a_json_404(client):
    assert_envelope(client.get("/api/v1/no-such-thing"), 404, "not_found")


def test_wrong_method_is_a_json_405_with_allow_header(client):
    response = client.put("/api/v1/chat/stream")
    assert_envelope(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("body, content_type, status", [
    (b"{not json", "application/json", 400),
    (b"\xff\xfe\x00garbage", "application/json", 400),
    (b"[1, 2, 3]", "application/json", 400),
    (b'{"model": "m"}', "text/plain", 415),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400),
])
def test_malformed_bodies_get_the_envelope(client, dbconn, body, content_type, status):
    response = client.post("/api/v1/chat/stream", data=body, headers={"Content-Type": content_type})
    assert_envelope(response, status)
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_oversized_body_is_a_json_413_naming_the_limit_and_its_setting(client, app, dbconn):
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (app.config["MAX_BODY_BYTES"] + 10) + b'"}]}'
    response = client.post("/api/v1/chat/stream", data=big, headers={"Content-Type": "application/json"})
    assert_envelope(response, 413)
    assert response.get_json()["error"]["message"] == \
        f"the body is larger than {app.config['MAX_BODY_BYTES']} bytes, the server's limit (ORCH_MAX_BODY_BYTES)"
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.parametrize("method, path, status", [("GET", "/api/nothing", 404), ("GET", "/api/show", 405),
                                                    ("GET", "/api/chat", 405)])
def test_routing_errors_on_ollama_paths_use_ollamas_error_shape(client, method, path, status):
    response = client.open(path, method=method)
    assert response.status_code == status
    assert isinstance(response.get_json()["error"], str) and response.get_json()["error"]
