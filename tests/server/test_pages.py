"""The chat and status pages, and the JSON they read, in-process."""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

from server.storage import agents, chunks, jobs
from server.storage.stats import percentile

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "server" / "static"
TEMPLATES = ROOT / "server" / "templates"


def online_agent(db, name: str, models: list[str], slots: int = 2, seen: float | None = None):
    creds = agents.add_agent(db, name)
    agents.touch(db, creds.id, time.time() if seen is None else seen, models, slots)
    return creds


def finished_request(db, agent_id: str, *, created: float, first_token: float | None, finished: float,
                     tokens: int = 3, model: str = "sim", error: str | None = None) -> str:
    """A request that went through the queue: claimed at ``created``, first chunk, then final POST."""
    request_id = jobs.create_job(db, model, [{"role": "user", "content": "hi"}], {}, created)
    assert jobs.claim_job(db, agent_id, None, created, 5, 30) is not None
    if first_token is not None:
        chunks.append_chunks(db, agent_id, request_id, 0, ["tok"], False, first_token, 30)
        chunks.append_chunks(db, agent_id, request_id, 1, ["tok"] * (tokens - 1), True, finished, 30, error=error)
    else:
        chunks.append_chunks(db, agent_id, request_id, 0, [], True, finished, 30, error=error)
    return request_id


@pytest.mark.parametrize("path, script, vendored", [
    ("/", "chat.js", ["vendor/dompurify/purify.min.js"]),
    ("/status", "status.js", ["vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css"]),
])
def test_page_renders_with_its_own_scripts_and_stylesheets(client, path, script, vendored):
    page = client.get(path)
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert f'src="/static/{script}"' in html
    assert 'href="/static/style.css"' in html
    assert 'name="viewport"' in html
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert {f"/static/{name}" for name in vendored} <= set(assets)
    for asset in assets + ["/static/sse.js", "/static/markdown.js", "/static/vendor/marked/marked.esm.js"]:
        assert client.get(asset).status_code == 200, asset


VENDOR = STATIC / "vendor"


def vendored_files() -> list[tuple[str, int, str]]:
    """``(file, bytes, sha256)`` of each row of the table in server/static/vendor/README.md."""
    table = re.findall(r"^\|[^|]+\|[^|]+\|[^|]+\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$",
                       (VENDOR / "README.md").read_text(), re.MULTILINE)
    return [(name, int(size), digest) for name, size, digest in table]


def test_vendored_libraries_are_the_files_their_readme_names_each_with_its_licence():
    listed = vendored_files()
    assert {name for name, _, _ in listed} == {
        str(p.relative_to(VENDOR)) for p in VENDOR.glob("*/*") if p.suffix in (".js", ".css")}
    for name, size, digest in listed:
        data = (VENDOR / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), f"{name} changed: update the README"
        assert (VENDOR / name).parent.joinpath("LICENSE").is_file(), f"{name} has no LICENSE beside it"


@pytest.mark.parametrize("path", ["/", "/status"])
def test_pages_allow_only_their_own_scripts(client, path):
    policy = client.get(path).headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_templates_have_no_inline_script_or_handlers(template):
    html = (TEMPLATES / template).read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>: the CSP would block it"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler: the CSP would block it"


@pytest.mark.parametrize("script", sorted(p.name for p in STATIC.glob("*.js")))
def test_page_scripts_never_render_data_as_markup(script):
    source = (STATIC / script).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, f"{script} uses {sink}: render data with textContent"


def test_status_page_is_public_even_with_an_admin_token(app, client):
    app.config["ADMIN_TOKEN"] = "s3cret"
    assert client.get("/status").status_code == 200
    assert client.get("/api/v1/status").status_code == 401


def test_status_lists_online_agents_without_secrets(client, dbconn):
    creds = online_agent(dbconn, "gpu-1", ["llama3:8b", "sim"], slots=4)
    online_agent(dbconn, "gone-quiet", ["sim"], seen=time.time() - 3600)

    status = client.get("/api/v1/status")

    assert status.status_code == 200
    listed = status.get_json()["agents"]
    assert [a["name"] for a in listed] == ["gpu-1"]
    assert listed[0] | {"last_seen": None} == {
        "id": creds.id, "name": "gpu-1", "last_seen": None, "models": ["llama3:8b", "sim"], "slots": 4,
        "jobs_done": 0, "tokens_streamed": 0, "tokens_per_second": 0.0,
        "current_tokens_per_second": 0.0}
    assert creds.secret not in status.get_data(as_text=True)
    assert "secret" not in status.get_data(as_text=True)


def test_status_shape_when_nothing_happened(client):
    status = client.get("/api/v1/status").get_json()
    assert set(status) == {"now", "window_seconds", "current_rate_seconds", "agents", "queue", "requests",
                           "first_token_latency"}
    assert status["window_seconds"] == 300
    assert status["agents"] == [] and status["queue"] == []
    assert status["requests"] == {"by_status": {"done": 0, "failed": 0, "cancelled": 0}, "errors": {}}
    assert status["first_token_latency"] == {"samples": 0, "p50": None, "p95": None}


def test_status_counts_queue_depth_per_model(client, dbconn):
    creds = online_agent(dbconn, "gpu-1", ["a", "b"])
    now = time.time()
    for i, model in enumerate(["b", "a", "a", "a"]):
        jobs.create_job(dbconn, model, [{"role": "user", "content": "hi"}], {}, now + i)
    assert jobs.claim_job(dbconn, creds.id, ["a"], now, 5, 30) is not None

    queue = client.get("/api/v1/status").get_json()["queue"]

    assert queue == [{"model": "a", "queued": 2, "active": 1}, {"model": "b", "queued": 1, "active": 0}]


def test_status_counts_outcomes_and_latency_inside_the_window(client, dbconn):
    creds = online_agent(dbconn, "gpu-1", ["sim"])
    now = time.time()
    for ttft in (0.1, 0.2, 0.3, 0.4, 2.0):
        finished_request(dbconn, creds.id, created=now - 60, first_token=now - 60 + ttft, finished=now - 50)
    finished_request(dbconn, creds.id, created=now - 40, first_token=None, finished=now - 30, error="boom")
    finished_request(dbconn, creds.id, created=now - 3600, first_token=now - 3599, finished=now - 3500)
    cancelled = jobs.create_job(dbconn, "sim", [{"role": "user", "content": "hi"}], {}, now - 20)
    jobs.cancel_job(dbconn, cancelled, now - 10)

    status = client.get("/api/v1/status").get_json()

    assert status["requests"] == {"by_status": {"done": 5, "failed": 1, "cancelled": 1},
                                  "errors": {"agent_error": 1}}
    latency = status["first_token_latency"]
    assert latency["samples"] == 5
    assert latency["p50"] == pytest.approx(0.3, abs=1e-6)
    assert latency["p95"] == pytest.approx(2.0, abs=1e-6)


def test_status_reports_each_agents_tokens_per_second_over_the_last_minute(client, dbconn):
    busy = online_agent(dbconn, "busy", ["sim"])
    online_agent(dbconn, "idle", ["sim"])
    now = time.time()
    finished_request(dbconn, busy.id, created=now - 10, first_token=now - 9, finished=now - 8, tokens=30)

    rates = {a["name"]: a["tokens_per_second"] for a in client.get("/api/v1/status").get_json()["agents"]}

    assert rates == {"busy": 0.5, "idle": 0.0}


def test_status_window_is_a_query_parameter(client, dbconn):
    creds = online_agent(dbconn, "gpu-1", ["sim"])
    now = time.time()
    finished_request(dbconn, creds.id, created=now - 600, first_token=now - 599, finished=now - 590)

    assert client.get("/api/v1/status").get_json()["requests"]["by_status"]["done"] == 0
    wide = client.get("/api/v1/status?minutes=15").get_json()
    assert wide["window_seconds"] == 900
    assert wide["requests"]["by_status"]["done"] == 1


# "²" and "１" pass str.isdigit() but not int(); 5,000 digits pass isdigit() but not int() either.
BAD_MINUTES = ["0", "61", "abc", "-5", "1.5", "", " 5", "5 ", "0x10", "²", "１", "٣", "9" * 5000, "1e1"]


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/status/series"])
@pytest.mark.parametrize("minutes", BAD_MINUTES)
def test_status_and_series_reject_a_bad_window_with_the_envelope(client, path, minutes):
    response = client.get(path, query_string={"minutes": minutes})
    assert response.status_code == 400
    assert response.get_json() == {"error": {
        "code": "bad_window", "message": "minutes must be a whole number from 1 to 60"}}


@pytest.mark.parametrize("header, expected", [
    (None, 401),
    ("Bearer wrong", 401),
    ("Basic czNjcmV0", 401),
    ("Bearer s3cret", 200),
])
@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/status/series"])
def test_status_needs_the_admin_token_when_one_is_configured(app, client, path, header, expected):
    app.config["ADMIN_TOKEN"] = "s3cret"
    response = client.get(path, headers={"Authorization": header} if header else {})
    assert response.status_code == expected
    if expected == 401:
        assert response.get_json()["error"]["code"] == "admin_required"


def test_agent_names_come_back_as_json_data_not_markup(client, dbconn):
    name = "<script>alert(1)</script>"
    online_agent(dbconn, name, ["<img src=x onerror=alert(2)>"])

    status = client.get("/api/v1/status")
    models = client.get("/api/v1/models")

    assert status.mimetype == models.mimetype == "application/json"
    assert status.get_json()["agents"][0]["name"] == name
    assert models.get_json()["models"][0]["name"] == "<img src=x onerror=alert(2)>"
    assert "alert(1)" not in client.get("/status").get_data(as_text=True)


def test_models_lists_what_online_agents_serve(client, dbconn):
    online_agent(dbconn, "gpu-1", ["llama3:8b", "sim"], slots=4)
    online_agent(dbconn, "gpu-2", ["sim"], slots=1)
    online_agent(dbconn, "asleep", ["mistral"], seen=time.time() - 3600)

    response = client.get("/api/v1/models")

    assert response.status_code == 200
    assert response.get_json() == {"models": [
        {"name": "llama3:8b", "agents": 1, "slots": 4},
        {"name": "sim", "agents": 2, "slots": 5},
    ]}


def test_models_needs_an_api_key_when_keys_are_configured(app, client):
    app.config["API_KEYS"] = ("k1",)
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


@pytest.mark.parametrize("values, p, expected", [
    ([], 50, None),
    ([1.0], 95, 1.0),
    ([1.0, 2.0], 50, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
    ([float(i) for i in range(1, 101)], 95, 95.0),
    ([float(i) for i in range(1, 21)], 95, 19.0),
])
def test_percentile_is_nearest_rank(values, p, expected):
    assert percentile(values, p) == expected
