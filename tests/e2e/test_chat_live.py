"""The native SSE API through a real gunicorn gevent server, with real SSE clients and a signed agent.

Servers are shared by the module; each test uses a model of its own, so its
jobs go to its own agent.  ``server`` has the defaults but a 3 s cancel grace (room for a resume on a busy machine),
``legacy`` polls the database (``NOTIFIER=poll``), ``impatient`` cancels at once
and has a short queue timeout, lease and keepalive for the failure paths.
"""
from __future__ import annotations

import json
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devtools.processes import LiveServer, wait_until
from tests.signed import sign

TIMEOUT = 10


pytestmark = pytest.mark.engines("sqlite", "postgres")


@pytest.fixture(scope="module")
def live_server_on(tmp_path_factory, module_engine, new_database):
    """``live_server_on(name, **env)``: a server on a fresh database of the module's engine; stopped at the end."""
    started: list[LiveServer] = []

    def start(name: str, **env) -> LiveServer:
        log = tmp_path_factory.mktemp(name) / "server.log"
        live = LiveServer(new_database(module_engine), log, {"ORCH_SWEEP_INTERVAL": 0.1, **env}, name=name)
        started.append(live.start())
        return live

    yield start
    for live in started:
        # SIGINT: gunicorn's quick shutdown; the graceful one would wait for idle keep-alive connections.
        live.stop(signal.SIGINT)


@pytest.fixture(scope="module")
def server(live_server_on):
    return live_server_on("server", ORCH_CANCEL_GRACE=3)


@pytest.fixture(scope="module")
def legacy(live_server_on):
    return live_server_on("legacy", ORCH_NOTIFIER="poll")


@pytest.fixture(scope="module")
def impatient(live_server_on):
    return live_server_on("impatient", ORCH_CANCEL_GRACE=0, ORCH_QUEUE_TIMEOUT=1, ORCH_LEASE_SECONDS=0.5,
                          ORCH_KEEPALIVE_SECONDS=0.2)


class Agent:
    """A signed agent serving one model of its own on a live server."""

    def __init__(self, live: LiveServer) -> None:
        self.url = live.url
        self.creds = live.add_agent("agent-" + uuid.uuid4().hex[:6])
        self.model = "model-" + uuid.uuid4().hex[:8]
        self.session = requests.Session()
        assert self.poll() is None          # online from now on, serving self.model

    def poll(self) -> dict | None:
        path = f"/api/v1/inference/poll?models={self.model}&slots=1"
        response = self.session.get(self.url + path, headers=sign(self.creds, "GET", path), timeout=TIMEOUT)
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def post(self, job_id: str, seq: int, chunks: list[str], done: bool = False, **extra) -> dict:
        path = "/api/v1/inference/stream"
        data = json.dumps({"id": job_id, "chunks": chunks, "seq": seq, "done": done, **extra}).encode()
        headers = sign(self.creds, "POST", path, data) | {"Content-Type": "application/json"}
        response = self.session.post(self.url + path, data=data, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def agent_on():
    """``agent_on(live)``: a new agent with a model of its own; its connections are closed at the end."""
    made: list[Agent] = []
    yield lambda live: made.append(Agent(live)) or made[-1]
    for agent in made:
        agent.session.close()


@pytest.fixture
def agent(agent_on, server) -> Agent:
    return agent_on(server)


class SSEClient:
    """A streaming chat as a browser would read it: raw bytes, split into events at blank lines."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.request_id = response.headers.get("X-Request-Id")
        self.raw = b""
        self._pieces = response.iter_content(chunk_size=None)
        self._buffer = b""

    @classmethod
    def post(cls, live: LiveServer, chat: dict) -> SSEClient:
        return cls(requests.post(live.url + "/api/v1/chat/stream", json=chat, stream=True, timeout=TIMEOUT))

    @classmethod
    def resume(cls, live: LiveServer, request_id: str, last_event_id: int) -> SSEClient:
        return cls(requests.get(f"{live.url}/api/v1/chat/stream/{request_id}", stream=True, timeout=TIMEOUT,
                                headers={"Last-Event-ID": str(last_event_id)}))

    def next_event(self, keepalives: bool = False) -> bytes:
        """The next event, blank line included; keepalive comments are skipped unless asked for."""
        while True:
            while b"\n\n" not in self._buffer:
                piece = next(self._pieces)
                self.raw += piece
                self._buffer += piece
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if keepalives or event != b": keepalive":
                return event + b"\n\n"

    def rest(self) -> bytes:
        """Every event up to the end of the stream, keepalives removed."""
        for piece in self._pieces:
            self.raw += piece
            self._buffer += piece
        rest, self._buffer = self._buffer, b""
        return rest.replace(b": keepalive\n\n", b"")

    def close(self) -> None:
        self.response.close()


def chat(agent: Agent, content: str = "hi", **extra) -> dict:
    return {"model": agent.model, "messages": [{"role": "user", "content": content}], **extra}


def delta(seq: int, text: str) -> bytes:
    return f'id: {seq}\ndata: {{"delta": {json.dumps(text, ensure_ascii=False)}}}\n\n'.encode()


DONE = b"data: [DONE]\n\n"
# Multi-byte text split between chunks and between batches: an emoji ZWJ
# sequence, a flag, CJK, a combining accent apart from its base letter.
BATCHES = [["Hé", "llo 👩"], ["\u200d💻 🇫", "🇷 日本"], ["語 e", "\u0301!"]]


# --- format and order -------------------------------------------------------

def test_default_stream_is_byte_for_byte_the_legacy_format_and_live(server, agent):
    client = SSEClient.post(server, chat(agent))
    assert client.response.status_code == 200
    headers = client.response.headers
    assert headers["Content-Type"].startswith("text/event-stream")
    assert (headers["Cache-Control"], headers["X-Accel-Buffering"]) == ("no-cache", "no")
    assert "Content-Length" not in headers
    job = agent.poll()
    assert job["id"] == client.request_id
    seq = 0
    for batch in BATCHES:
        agent.post(job["id"], seq, batch)
        # Each batch reaches the client before the next one is sent: nothing buffers.
        for text in batch:
            assert client.next_event() == delta(seq, text)
            seq += 1
    agent.post(job["id"], seq, [], done=True, stats={"eval_count": seq})
    assert client.rest() == DONE
    expected = b"".join(delta(i, t) for i, t in enumerate(sum(BATCHES, []))) + DONE
    assert client.raw == expected
    assert "".join(sum(BATCHES, [])) == "Héllo 👩\u200d💻 🇫🇷 日本語 e\u0301!"


def test_legacy_poll_mode_streams_the_same_bytes(legacy, agent_on):
    agent = agent_on(legacy)
    client = SSEClient.post(legacy, chat(agent))
    job = agent.poll()
    seq = 0
    for batch in BATCHES:
        agent.post(job["id"], seq, batch)
        seq += len(batch)
    agent.post(job["id"], seq, [], done=True)
    assert client.rest() == b"".join(delta(i, t) for i, t in enumerate(sum(BATCHES, []))) + DONE


def test_status_events_when_asked(server, agent):
    client = SSEClient.post(server, chat(agent, status_events=True))
    assert client.next_event() == b'event: status\ndata: {"state": "queued", "position": 1}\n\n'
    job = agent.poll()
    assert client.next_event() == b'event: status\ndata: {"state": "assigned"}\n\n'
    agent.post(job["id"], 0, ["ok"], done=True)
    assert client.rest() == delta(0, "ok") + DONE


# --- resume -------------------------------------------------------------------

def test_resume_mid_stream_then_after_completion(server, agent):
    client = SSEClient.post(server, chat(agent))
    job = agent.poll()
    agent.post(job["id"], 0, ["one ", "two "])
    assert client.next_event() == delta(0, "one ")
    client.close()           # the tab is refreshed: no text may be lost
    resumed = SSEClient.resume(server, job["id"], 0)
    assert resumed.next_event() == delta(1, "two ")
    agent.post(job["id"], 2, ["three"], done=True)
    assert resumed.rest() == delta(2, "three") + DONE
    later = SSEClient.resume(server, job["id"], 1)
    assert later.rest() == delta(2, "three") + DONE


def test_resume_within_the_grace_keeps_the_request_running(server, agent):
    client = SSEClient.post(server, chat(agent))
    job = agent.poll()
    agent.post(job["id"], 0, ["one"])
    assert client.next_event() == delta(0, "one")
    client.close()
    resumed = SSEClient.resume(server, job["id"], 0)
    # A witness whose client left later and never came back: once the
    # sweeper has cancelled it, the grace of the resumed request is over too.
    witness = SSEClient.post(server, chat(agent, status_events=True))
    assert witness.next_event().startswith(b"event: status")
    witness.close()
    history = f"{server.url}/api/v1/chat/{witness.request_id}"
    wait_until(lambda: requests.get(history, timeout=TIMEOUT).json()["status"] == "cancelled", message="witness")
    assert agent.post(job["id"], 1, ["two"], done=True)["cancelled"] is False
    assert resumed.rest() == delta(1, "two") + DONE


def test_resume_of_unknown_request_is_a_404(server):
    response = requests.get(server.url + "/api/v1/chat/stream/nope", timeout=TIMEOUT)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "request_not_found"


# --- failures -----------------------------------------------------------------

def error_event(code: str, message: str) -> bytes:
    return b"event: error\ndata: " + json.dumps({"error": {"code": code, "message": message}}).encode() + b"\n\n"


def test_queue_timeout_ends_with_an_error_event(impatient, agent_on):
    agent = agent_on(impatient)       # online, but never polls again
    client = SSEClient.post(impatient, chat(agent))
    assert client.rest() == error_event("queue_timeout", "no agent took the job within 1 s")


def test_agent_lost_mid_answer_ends_with_an_error_event(impatient, agent_on):
    agent = agent_on(impatient)
    client = SSEClient.post(impatient, chat(agent))
    agent.post(agent.poll()["id"], 0, ["half an"])        # then silence: the lease runs out
    assert client.rest() == delta(0, "half an") + error_event("agent_lost", "the agent stopped responding mid-answer")


def test_agent_reported_error_ends_with_an_error_event(impatient, agent_on):
    agent = agent_on(impatient)
    client = SSEClient.post(impatient, chat(agent))
    job = agent.poll()
    agent.post(job["id"], 0, ["par"])
    agent.post(job["id"], 1, [], done=True, error="model requires more system memory")
    assert client.rest() == delta(0, "par") + error_event("agent_error", "model requires more system memory")


def test_idle_stream_sends_keepalive_comments(impatient, agent_on):
    agent = agent_on(impatient)
    client = SSEClient.post(impatient, chat(agent))
    assert client.next_event(keepalives=True) == b": keepalive\n\n"
    agent.post(agent.poll()["id"], 0, ["late"], done=True)
    assert client.rest() == delta(0, "late") + DONE


# --- clients going away -----------------------------------------------------------

def test_client_leaving_mid_stream_cancels_at_the_agents_next_post(impatient, agent_on):
    agent = agent_on(impatient)
    client = SSEClient.post(impatient, chat(agent))
    job = agent.poll()
    agent.post(job["id"], 0, ["first"])
    assert client.next_event() == delta(0, "first")
    client.close()
    seq = iter(range(1, 1000))
    # The agent keeps generating until a POST answers cancelled: true.
    wait_until(lambda: agent.post(job["id"], next(seq), ["more"])["cancelled"], message="cancelled: true")
    status = requests.get(f"{impatient.url}/api/v1/chat/{job['id']}", timeout=TIMEOUT).json()["status"]
    assert status == "cancelled"


def test_queued_job_whose_client_left_never_reaches_an_agent(impatient, agent_on):
    agent = agent_on(impatient)
    client = SSEClient.post(impatient, chat(agent, status_events=True))
    assert client.next_event() == b'event: status\ndata: {"state": "queued", "position": 1}\n\n'
    client.close()
    history = f"{impatient.url}/api/v1/chat/{client.request_id}"
    wait_until(lambda: requests.get(history, timeout=TIMEOUT).json()["status"] == "cancelled", message="cancelled")
    assert agent.poll() is None


# --- many streams -------------------------------------------------------------------

def test_a_hundred_concurrent_streams_in_one_worker(server, agent):
    count = 100

    def answer_one(_) -> None:
        job = agent.poll()
        agent.post(job["id"], 0, [job["messages"][0]["content"], " ✓", "!"], done=True)

    with ThreadPoolExecutor(count) as readers, ThreadPoolExecutor(8) as agent_threads:
        clients = list(readers.map(lambda n: SSEClient.post(server, chat(agent, f"n{n}")), range(count)))
        assert all(c.response.status_code == 200 for c in clients)
        list(agent_threads.map(answer_one, range(count)))
        bodies = list(readers.map(SSEClient.rest, clients))
    for n, body in enumerate(bodies):
        assert body == delta(0, f"n{n}") + delta(1, " ✓") + delta(2, "!") + DONE
