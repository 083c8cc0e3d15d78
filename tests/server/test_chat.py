"""The native chat API in-process: body checks, the exact SSE format, resume, history.

The agent speaks the real protocol (signed poll and chunk POSTs) through the
test client; tests/e2e/test_chat_live.py does the same through gunicorn.
"""
from __future__ import annotations

import json
import threading

import pytest
import requests
from werkzeug.serving import make_server

from server.storage import get_storage
from tests.signed import agent_get, agent_post, sign

pytestmark = pytest.mark.engines("sqlite", "postgres")

MODEL = "m"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": MESSAGES}


class Agent:
    """An agent talking to the test client: poll, then post chunks."""

    def __init__(self, client, creds) -> None:
        self.client, self.creds = client, creds

    def poll(self) -> dict | None:
        response = agent_get(self.client, self.creds, f"/api/v1/inference/poll?models={MODEL}&slots=1")
        assert response.status_code in (200, 204), response.data
        return response.get_json() if response.status_code == 200 else None

    def post(self, job_id: str, seq: int, chunks: list[str], done: bool = False, **extra) -> dict:
        payload = {"id": job_id, "chunks": chunks, "seq": seq, "done": done, **extra}
        response = agent_post(self.client, self.creds, "/api/v1/inference/stream", payload)
        assert response.status_code == 200, response.data
        return response.get_json()


@pytest.fixture
def agent(client, agent_creds) -> Agent:
    agent = Agent(client, agent_creds)
    assert agent.poll() is None       # now online, serving MODEL
    return agent


def answer(agent: Agent, batches: list[list[str]], **final) -> str:
    """Take the next job and post ``batches``, then the end; returns the job id."""
    job = agent.poll()
    seq = 0
    for chunks in batches:
        agent.post(job["id"], seq, chunks)
        seq += len(chunks)
    agent.post(job["id"], seq, [], done=True, **final)
    return job["id"]


def count_requests(dbconn) -> int:
    return dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0]


# --- starting a stream ----------------------------------------------------

def test_stream_is_the_legacy_format_byte_for_byte(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    assert response.status_code == 200
    answer(agent, [["Hel", "lo, "], ['"wörld"\n', "\\ 👋"]])
    assert response.get_data() == (
        'id: 0\ndata: {"delta": "Hel"}\n\n'
        'id: 1\ndata: {"delta": "lo, "}\n\n'
        'id: 2\ndata: {"delta": "\\"wörld\\"\\n"}\n\n'
        'id: 3\ndata: {"delta": "\\\\ 👋"}\n\n'
        'data: [DONE]\n\n').encode()


def test_stream_headers(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert answer(agent, [["x"]]) == response.headers["X-Request-Id"]
    response.get_data()


def test_failure_is_an_error_event(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    answer(agent, [["par", "tial"]], error="CUDA out of memory")
    assert response.get_data().decode().endswith(
        'id: 1\ndata: {"delta": "tial"}\n\n'
        'event: error\ndata: {"error": {"code": "agent_error", "message": "CUDA out of memory"}}\n\n')


def test_status_events_only_when_asked(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT | {"status_events": True})
    body = iter(response.response)
    assert next(item for item in body if item) == b'event: status\ndata: {"state": "queued", "position": 1}\n\n'
    answer(agent, [["x"]])
    assert b"".join(body).decode() == (
        'event: status\ndata: {"state": "assigned"}\n\n'
        'id: 0\ndata: {"delta": "x"}\n\n'
        'data: [DONE]\n\n')


@pytest.mark.parametrize("chat", [
    {"messages": MESSAGES},
    {"model": "", "messages": MESSAGES},
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": None}]},
    {"model": MODEL, "messages": MESSAGES, "options": "fast"},
    {"model": MODEL, "messages": MESSAGES, "status_events": "yes"},
])
def test_bad_chat_is_a_400_and_stores_nothing(client, agent, dbconn, chat):
    response = client.post("/api/v1/chat/stream", json=chat)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_field"
    assert count_requests(dbconn) == 0
    assert agent.poll() is None


def test_model_no_online_agent_serves_is_a_404_at_once(client, agent, dbconn):
    response = client.post("/api/v1/chat/stream", json=CHAT | {"model": "not-served"})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"
    assert count_requests(dbconn) == 0


def test_api_keys_guard_the_chat_endpoints(app, client, agent):
    app.config["API_KEYS"] = ("s3cret",)
    assert client.post("/api/v1/chat/stream", json=CHAT).status_code == 401
    assert client.get("/api/v1/chat/abc").status_code == 401
    response = client.post("/api/v1/chat/stream", json=CHAT, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200
    answer(agent, [])
    response.get_data()


# --- resume and history ---------------------------------------------------

def finished_chat(client, agent, batches=(["a", "b"], ["c", "d"])) -> str:
    response = client.post("/api/v1/chat/stream", json=CHAT)
    answer(agent, list(batches), stats={"eval_count": 4})
    response.get_data()
    return response.headers["X-Request-Id"]


@pytest.mark.parametrize("headers, query, rest", [
    ({"Last-Event-ID": "1"}, "", "cd"),
    ({}, "?after=2", "d"),
    ({"Last-Event-ID": "2"}, "?after=0", "d"),       # the header is the newer position
    ({"Last-Event-ID": "3"}, "", ""),
    ({}, "", "abcd"),
])
def test_resume_replays_exactly_the_rest(client, agent, headers, query, rest):
    request_id = finished_chat(client, agent)
    response = client.get(f"/api/v1/chat/stream/{request_id}{query}", headers=headers)
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == request_id
    expected = "".join(f'id: {"abcd".index(c)}\ndata: {{"delta": "{c}"}}\n\n' for c in rest) + "data: [DONE]\n\n"
    assert response.get_data().decode() == expected


def test_resume_of_a_live_request_continues_it(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    job = agent.poll()
    agent.post(job["id"], 0, ["a", "b"])
    resumed = client.get(f"/api/v1/chat/stream/{job['id']}", headers={"Last-Event-ID": "0"})
    agent.post(job["id"], 2, ["c"], done=True)
    assert resumed.get_data() == b'id: 1\ndata: {"delta": "b"}\n\nid: 2\ndata: {"delta": "c"}\n\ndata: [DONE]\n\n'
    response.get_data()


def test_head_of_a_stream_answers_at_once_with_headers_only(client, agent):
    request_id = client.post("/api/v1/chat/stream", json=CHAT).headers["X-Request-Id"]
    response = client.head(f"/api/v1/chat/stream/{request_id}")       # the request is still queued
    assert (response.status_code, response.mimetype, response.get_data()) == (200, "text/event-stream", b"")
    assert response.headers["X-Request-Id"] == request_id


@pytest.mark.parametrize("path", ["/api/v1/chat/stream/nope", "/api/v1/chat/nope"])
def test_unknown_request_is_a_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "request_not_found"


@pytest.mark.parametrize("value", ["x", "-2", "1.5"])
def test_bad_resume_point_is_a_400(client, agent, value):
    request_id = finished_chat(client, agent)
    assert client.get(f"/api/v1/chat/stream/{request_id}", headers={"Last-Event-ID": value}).status_code == 400
    assert client.get(f"/api/v1/chat/stream/{request_id}?after={value}").status_code == 400


def test_history_shows_the_text_so_far_then_the_result(client, agent, agent_creds):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    request_id = response.headers["X-Request-Id"]
    queued = client.get(f"/api/v1/chat/{request_id}").get_json()
    # Stored by Ollama's full name: "m" and "m:latest" are one model.
    assert (queued["status"], queued["text"], queued["agent"], queued["model"]) == ("queued", "", None,
                                                                                      MODEL + ":latest")
    assert queued["timings"]["queued_at"] and queued["timings"]["assigned_at"] is None
    job = agent.poll()
    agent.post(job["id"], 0, ["Hello", " wor"])
    running = client.get(f"/api/v1/chat/{request_id}").get_json()
    assert (running["status"], running["text"], running["agent"]["id"]) == ("running", "Hello wor", agent_creds.id)
    agent.post(job["id"], 2, ["ld"], done=True, stats={"eval_count": 3})
    done = client.get(f"/api/v1/chat/{request_id}").get_json()
    assert (done["status"], done["text"], done["stats"], done["error"]) == ("done", "Hello world", {"eval_count": 3},
                                                                             None)
    timings = done["timings"]
    assert timings["queued_at"] <= timings["assigned_at"] <= timings["first_token_at"] <= timings["done_at"]
    response.get_data()


def test_history_of_a_failed_request_has_the_error(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    answer(agent, [], error="boom")
    response.get_data()
    record = client.get(f"/api/v1/chat/{response.headers['X-Request-Id']}").get_json()
    assert record["status"] == "failed"
    assert record["error"] == {"code": "agent_error", "message": "boom"}


# --- no database polling while a stream waits --------------------------------

@pytest.fixture
def statements(app, monkeypatch) -> list[str]:
    """Every SQL statement the app's storage runs from now on, on any of its connections."""
    store = get_storage(app)
    probe = store.connect()
    connection_class = type(probe)
    probe.close()
    seen: list[str] = []
    original = connection_class.execute

    def traced(self, sql, params=()):
        seen.append(sql)
        return original(self, sql, params)

    monkeypatch.setattr(connection_class, "execute", traced)
    return seen


@pytest.fixture
def threaded_server(app):
    """The app behind Werkzeug's threaded server, for real sockets in-process."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def signed_post(url: str, creds, path: str, payload: dict) -> dict:
    data = json.dumps(payload).encode()
    headers = sign(creds, "POST", path, data) | {"Content-Type": "application/json"}
    response = requests.post(url + path, data=data, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("mode", ["condition", "poll"])
def test_waiting_stream_runs_no_query_unless_legacy_polling(app, agent, agent_creds, statements, threaded_server,
                                                            mode):
    app.config.update(NOTIFIER=mode, POLL_INTERVAL=0.01, KEEPALIVE_SECONDS=0.3)
    reads = lambda: [s for s in statements if "FROM jobs AS j" in s]  # noqa: E731 - the stream's one query
    with requests.post(threaded_server + "/api/v1/chat/stream", json=CHAT, stream=True, timeout=10) as response:
        lines = response.iter_lines()
        # Queued and idle until the first keepalive: 0.3 s of waiting.
        assert next(lines) == b": keepalive"
        idle_reads = len(reads())
        job = agent.poll()
        signed_post(threaded_server, agent_creds, "/api/v1/inference/stream",
                    {"id": job["id"], "chunks": ["x"], "seq": 0, "done": False})
        fields = (line for line in lines if line and not line.startswith(b":"))
        assert [next(fields), next(fields)] == [b"id: 0", b'data: {"delta": "x"}']
        woken_reads = len(reads()) - idle_reads
    if mode == "condition":
        # The first read; then one per wake-up: the agent's claim, its chunk POST.
        assert (idle_reads, woken_reads) == (1, 2)
    else:
        assert idle_reads > 3, "the statement hook should see the legacy poll loop"


# --- cancelling explicitly --------------------------------------------------

def test_delete_cancels_a_queued_chat_so_no_agent_gets_it(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    request_id = response.headers["X-Request-Id"]
    cancelled = client.delete(f"/api/v1/chat/{request_id}")
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled"
    assert response.get_data().decode().endswith(
        'event: error\ndata: {"error": {"code": "cancelled", "message": "the request was cancelled"}}\n\n')
    assert agent.poll() is None


def test_delete_of_a_running_chat_tells_its_agent_to_stop(client, agent):
    response = client.post("/api/v1/chat/stream", json=CHAT)
    job = agent.poll()
    agent.post(job["id"], 0, ["a"])
    assert client.delete(f"/api/v1/chat/{job['id']}").get_json()["cancel_requested"] is True
    assert agent.post(job["id"], 1, ["b"])["cancelled"] is True
    assert response.get_data().decode().endswith('"code": "cancelled", "message": "the request was cancelled"}}\n\n')


def test_delete_of_an_unknown_chat_is_404_and_of_a_finished_one_changes_nothing(client, agent):
    assert client.delete("/api/v1/chat/nope").status_code == 404
    response = client.post("/api/v1/chat/stream", json=CHAT)
    answer(agent, [["x"]])
    response.get_data()
    finished = client.delete(f"/api/v1/chat/{response.headers['X-Request-Id']}")
    assert finished.status_code == 200 and finished.get_json()["status"] == "done"
