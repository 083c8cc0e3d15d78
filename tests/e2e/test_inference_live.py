"""The agent protocol against a real server: gunicorn, the gevent worker, real sockets.

Each module fixture boots one server for the tests that share its settings;
jobs are queued through the chat endpoint (which wakes parked long polls in
the server's process) or written to the database directly (which only a
short poll notices).
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from devtools.processes import LiveServer, agent_online, wait_until
from protocol.signing import signed_headers
from server.storage import jobs, migrated
from server.storage.agents import AgentCredentials

POLL = "/api/v1/inference/poll"
STREAM = "/api/v1/inference/stream"
HELLO = [{"role": "user", "content": "hello"}]
TIMEOUT = 20


class Agent:
    """One agent speaking the protocol over a keep-alive session."""

    def __init__(self, server: LiveServer, creds: AgentCredentials) -> None:
        self.server, self.creds = server, creds
        self.session = requests.Session()

    def headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return signed_headers(self.creds.id, self.creds.secret, method, path, body, int(time.time()))

    def poll(self, query: str = "") -> requests.Response:
        path = f"{POLL}?{query}" if query else POLL
        return self.session.get(self.server.url + path, headers=self.headers("GET", path), timeout=TIMEOUT + 30)

    def post(self, payload: dict) -> requests.Response:
        body = json.dumps(payload).encode()
        headers = self.headers("POST", STREAM, body) | {"Content-Type": "application/json"}
        return self.session.post(self.server.url + STREAM, data=body, headers=headers, timeout=TIMEOUT)

    def answer(self, job_id: str, chunks: list[str]) -> None:
        """Acknowledge, stream ``chunks`` and finish, as a real agent would."""
        assert self.post({"id": job_id, "chunks": [], "seq": 0, "done": False}).status_code == 200
        assert self.post({"id": job_id, "chunks": chunks, "seq": 0, "done": True}).status_code == 200


class Chat:
    """A user's chat stream, read in a thread until its end."""

    def __init__(self, server: LiveServer, model: str) -> None:
        self.text, self.end = "", None      # end: "done", an error code, or "http <status>"
        self._thread = threading.Thread(target=self._read, args=(server.url, model), daemon=True)
        self._thread.start()

    def _read(self, url: str, model: str) -> None:
        with requests.post(url + "/api/v1/chat/stream", json={"model": model, "messages": HELLO},
                           stream=True, timeout=TIMEOUT) as response:
            if response.status_code != 200:
                self.end = f"http {response.status_code}"
                return
            for line in response.iter_lines(decode_unicode=True):
                if line == "data: [DONE]":
                    self.end = "done"
                    return
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    if "error" in data:
                        self.end = data["error"]["code"]
                        return
                    self.text += data["delta"]

    def result(self) -> tuple[str, str | None]:
        self._thread.join(TIMEOUT)
        return self.text, self.end


def boot(tmp_path_factory, **env) -> LiveServer:
    path = tmp_path_factory.mktemp("live")
    return LiveServer(path / "server.db", path / "server.log", env).start()


def record(server: LiveServer, job_id: str) -> dict:
    with migrated(server.database) as db:
        return jobs.get_job(db, job_id)


def queue_in_database(server: LiveServer, count: int, model: str = "llama") -> list[str]:
    with migrated(server.database) as db:
        return [jobs.create_job(db, model, HELLO, {}, time.time()) for _ in range(count)]


def has_polled(server: LiveServer, agent: Agent) -> bool:
    return agent_online(server.database, agent.creds.id) is not None


def in_threads(target, agents: list[Agent]) -> None:
    threads = [threading.Thread(target=target, args=(agent,), daemon=True) for agent in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 30)
    assert not any(t.is_alive() for t in threads)


@pytest.fixture
def new_agent():
    """``new_agent(server)``: a registered agent; its keep-alive connection is closed after the test."""
    made: list[Agent] = []

    def make(server: LiveServer, name: str = "agent") -> Agent:
        made.append(Agent(server, server.add_agent(name)))
        return made[-1]

    yield make
    for agent in made:
        agent.session.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = boot(tmp_path_factory)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fast_lease_server(tmp_path_factory):
    """Leases of one second, swept five times a second, and a small body limit."""
    live = boot(tmp_path_factory, ORCH_DELIVERY_LEASE_SECONDS=1, ORCH_LEASE_SECONDS=1, ORCH_SWEEP_INTERVAL=0.2,
                ORCH_MAX_BODY_BYTES=8192)
    yield live
    live.stop()


# --- default server ---------------------------------------------------------

def test_twenty_agents_polling_at_once_get_fifty_jobs_each_exactly_once(server, new_agent):
    fleet = [new_agent(server, f"gpu-{i}") for i in range(20)]
    queued = queue_in_database(server, 50)
    claimed: list[str] = []
    start = threading.Barrier(len(fleet))

    def work(agent: Agent) -> None:
        start.wait()
        while (response := agent.poll()).status_code == 200:
            job_id = response.json()["id"]
            claimed.append(job_id)
            agent.answer(job_id, ["ok"])
        assert response.status_code == 204

    in_threads(work, fleet)
    assert sorted(claimed) == sorted(queued)
    assert {(record(server, j)["status"], record(server, j)["attempts"]) for j in queued} == {("done", 1)}


def test_twenty_parked_long_polls_share_fifty_chats_and_each_job_is_handed_out_once(server, new_agent):
    fleet = [new_agent(server, f"fleet-{i}") for i in range(20)]
    claimed: list[str] = []
    stop = threading.Event()

    def work(agent: Agent) -> None:
        while not stop.is_set():
            response = agent.poll("models=fleet:1b&wait=1")
            if response.status_code == 200:
                claimed.append(response.json()["id"])
                agent.answer(claimed[-1], ["ok"])

    workers = threading.Thread(target=in_threads, args=(work, fleet), daemon=True)
    workers.start()
    wait_until(lambda: all(has_polled(server, a) for a in fleet), message="every agent to poll")
    chats = [Chat(server, "fleet:1b") for _ in range(50)]
    assert [chat.result() for chat in chats] == [("ok", "done")] * 50
    stop.set()
    workers.join(TIMEOUT)
    assert len(claimed) == len(set(claimed)) == 50
    assert {record(server, job_id)["attempts"] for job_id in claimed} == {1}


def test_short_poll_without_a_job_answers_204_with_no_body(server, new_agent):
    response = new_agent(server).poll("models=nothing-queued:1b&slots=1")
    assert (response.status_code, response.content) == (204, b"")


def test_long_poll_ends_with_204_after_wait(server, new_agent):
    assert new_agent(server).poll("models=nothing-queued:1b&wait=0.5").status_code == 204


def test_long_poll_answers_with_the_job_a_chat_queues_and_the_chat_gets_the_answer(server, new_agent):
    agent = new_agent(server)
    polled: list[requests.Response] = []
    parked = threading.Thread(target=lambda: polled.append(agent.poll("models=live:1b&wait=20")), daemon=True)
    parked.start()
    wait_until(lambda: has_polled(server, agent), message="the long poll to arrive")
    chat = Chat(server, "live:1b")
    parked.join(TIMEOUT)
    job = polled[0].json()
    assert (polled[0].status_code, job["model"], job["messages"]) == (200, "live:1b", HELLO)
    agent.answer(job["id"], ["Hello", ", world"])
    assert chat.result() == ("Hello, world", "done")


def test_signature_covers_the_query_exactly_as_sent(server, new_agent):
    agent = new_agent(server)
    path = f"{POLL}?models=llama3.2:3b,qwen2.5:7b&slots=2"
    headers = agent.headers("GET", path)
    assert agent.session.get(server.url + path, headers=headers, timeout=TIMEOUT).status_code == 204
    tampered = agent.session.get(server.url + path.replace("slots=2", "slots=3"), headers=headers, timeout=TIMEOUT)
    assert (tampered.status_code, tampered.json()["error"]["code"]) == (401, "bad_signature")


def test_posts_for_unknown_and_foreign_jobs_are_refused(server, new_agent):
    owner, stranger = new_agent(server), new_agent(server)
    [job_id] = queue_in_database(server, 1, model="foreign:1b")
    assert owner.poll("models=foreign:1b").json()["id"] == job_id
    assert stranger.post({"id": job_id, "chunks": ["x"], "seq": 0}).status_code == 403
    assert owner.post({"id": "no-such-job", "chunks": ["x"], "seq": 0}).status_code == 404
    assert owner.post({"id": job_id, "chunks": ["x"], "seq": 1}).json()["error"]["expected_seq"] == 0
    assert owner.post({"id": job_id, "chunk": "legacy", "done": True}).json()["next_seq"] == 1


# --- one-second leases ------------------------------------------------------

def raw_long_poll(server: LiveServer, agent: Agent, query: str) -> socket.socket:
    """Send a signed long poll on a bare socket and return it without reading the answer."""
    path = f"{POLL}?{query}"
    head = "".join(f"{k}: {v}\r\n" for k, v in agent.headers("GET", path).items())
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{head}\r\n".encode())
    return sock


def test_job_delivered_to_a_vanished_poller_goes_back_to_the_queue_and_to_another_agent(fast_lease_server,
                                                                                       new_agent):
    server = fast_lease_server
    vanished, survivor = new_agent(server), new_agent(server)
    sock = raw_long_poll(server, vanished, "models=vanish:1b&wait=20")
    wait_until(lambda: has_polled(server, vanished), message="the long poll to arrive")
    sock.close()
    chat = Chat(server, "vanish:1b")
    with migrated(server.database) as db:
        job_id = wait_until(lambda: db.execute("SELECT id FROM jobs WHERE agent_id = ?",
                                               (vanished.creds.id,)).fetchone(), message="delivery")[0]
    response = survivor.poll("models=vanish:1b&wait=20")
    assert response.json()["id"] == job_id
    survivor.answer(job_id, ["still ", "answered"])
    assert chat.result() == ("still answered", "done")
    assert record(server, job_id)["attempts"] == 2
    assert vanished.post({"id": job_id, "chunks": [], "seq": 0}).status_code == 410


def test_lease_running_out_before_any_chunk_requeues_the_job_and_the_old_holder_gets_410(fast_lease_server,
                                                                                        new_agent):
    server = fast_lease_server
    slow, other = new_agent(server), new_agent(server)
    [job_id] = queue_in_database(server, 1, model="requeue:1b")
    assert slow.poll("models=requeue:1b").json()["id"] == job_id
    assert slow.post({"id": job_id, "chunks": [], "seq": 0}).status_code == 200
    wait_until(lambda: record(server, job_id)["status"] == "queued", message="the requeue")
    response = slow.post({"id": job_id, "chunks": ["late"], "seq": 0})
    assert (response.status_code, response.json()["error"]["code"]) == (410, "lease_expired")
    assert other.poll("models=requeue:1b").json()["id"] == job_id


def test_lease_running_out_mid_answer_fails_the_job_and_the_old_holder_gets_410(fast_lease_server, new_agent):
    server = fast_lease_server
    agent = new_agent(server)
    [job_id] = queue_in_database(server, 1, model="lost:1b")
    assert agent.poll("models=lost:1b").json()["id"] == job_id
    assert agent.post({"id": job_id, "chunks": ["half"], "seq": 0}).status_code == 200
    wait_until(lambda: record(server, job_id)["status"] == "failed", message="the lease to run out")
    assert record(server, job_id)["error_code"] == "agent_lost"
    assert agent.post({"id": job_id, "chunks": ["rest"], "seq": 1}).status_code == 410


def test_body_over_the_limit_gets_413_envelope(fast_lease_server, new_agent):
    agent = new_agent(fast_lease_server)
    response = agent.post({"id": "whatever", "chunks": ["x" * 10_000], "seq": 0})
    assert (response.status_code, response.json()["error"]["code"]) == (413, "request_entity_too_large")
