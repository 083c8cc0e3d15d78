"""Who may call what, against a real gunicorn server: agent signatures, replays, other agents' jobs, secrets.

A refused request gets 401 (403 for another agent's job) in the envelope and
changes nothing: no chunk, no job state, not even the agent's presence.
Secrets appear in no log and no listing.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import requests

from devtools.processes import (
    AgentProcess,
    LiveServer,
    agent_environment,
    launch_agent,
    start_simulator,
    wait_until,
)
from protocol.signing import derive_key, signed_headers
from server import cli
from server.storage import jobs, migrated
from server.storage.agents import AgentCredentials, add_agent, remove_agent
from tests.stack import stored_rows

POLL = "/api/v1/inference/poll"
STREAM = "/api/v1/inference/stream"
SKEW = 5        # the server's ORCH_SIGNATURE_SKEW here: a replay goes stale within seconds
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Fleet:
    """A server, two agents, a removed one, and a running job held by alice with one chunk stored."""

    server: LiveServer
    alice: AgentCredentials
    bob: AgentCredentials
    removed: AgentCredentials
    job: str

    def send(self, request: Request) -> tuple[int, dict | None]:
        # http.client sends the path and headers exactly as given: nothing re-encoded after signing.
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(request.method, request.path, body=request.body or None, headers=request.headers)
            response = conn.getresponse()
            body = response.read()
            return response.status, json.loads(body) if body else None
        finally:
            conn.close()

    def chunk_post(self, creds: AgentCredentials, seq: int, chunks: list[str]) -> Request:
        body = json.dumps({"id": self.job, "chunks": chunks, "seq": seq}).encode()
        return Request("POST", STREAM, body, signed(creds, "POST", STREAM, body) | JSON)

    def stored(self) -> dict[str, list]:
        return stored_rows(self.server.database)


def signed(creds: AgentCredentials, method: str, path: str, body: bytes = b"", at: float | None = None) -> dict:
    return signed_headers(creds.id, creds.secret, method, path, body, int(time.time() if at is None else at))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    server = LiveServer(tmp / "server.db", tmp / "server.log", {
        "ORCH_SIGNATURE_SKEW": SKEW, "ORCH_LEASE_SECONDS": 3600, "ORCH_AGENT_ONLINE_SECONDS": 3600}).start()
    try:
        alice, bob, removed = (server.add_agent(name) for name in ("alice", "bob", "carol"))
        with migrated(server.database) as db:
            remove_agent(db, removed.id)
            jobs.create_job(db, "m", [{"role": "user", "content": "hi"}], {}, time.time())
        fleet = Fleet(server, alice, bob, removed, "")
        status, job = fleet.send(Request("GET", POLL, b"", signed(alice, "GET", POLL)))
        assert status == 200, job
        fleet.job = job["id"]
        assert fleet.send(fleet.chunk_post(alice, 0, ["Hel"]))[0] == 200
        yield fleet
    finally:
        server.stop()


def _post(f: Fleet, **change: Callable) -> Request:
    """Alice's next chunk POST, properly signed, then altered."""
    request = f.chunk_post(f.alice, 1, ["lo"])
    return Request(request.method, change.get("path", lambda p: p)(request.path),
                   change.get("body", lambda b: b)(request.body), change.get("headers", lambda h: h)(request.headers))


def _without(name: str) -> Callable[[dict], dict]:
    return lambda headers: {k: v for k, v in headers.items() if k != name}


def _setting(name: str, value: str) -> Callable[[dict], dict]:
    return lambda headers: headers | {name: value}


def _signed_as(agent_id: Callable[[Fleet], str], secret: Callable[[Fleet], str], *, method: str = "GET",
               path: str = POLL, sent: str = "", at: float = 0.0) -> Callable[[Fleet], Request]:
    """A poll signed by these credentials, over ``path`` (``sent`` is what goes on the wire, default the same)."""
    def build(f: Fleet) -> Request:
        headers = signed_headers(agent_id(f), secret(f), method, path, b"", int(time.time() + at))
        return Request("GET", sent or path, b"", headers)
    return build


ALICE_ID, ALICE_SECRET = (lambda f: f.alice.id), (lambda f: f.alice.secret)
REFUSED: dict[str, tuple[Callable[[Fleet], Request], str]] = {
    "no headers": (lambda f: _post(f, headers=lambda h: JSON), "missing_signature"),
    "no signature": (lambda f: _post(f, headers=_without("X-Agent-Signature")), "missing_signature"),
    "an empty agent id": (lambda f: _post(f, headers=_setting("X-Agent-Id", "")), "missing_signature"),
    "a timestamp that is not a number": (lambda f: _post(f, headers=_setting("X-Agent-Timestamp", "soon")),
                                         "bad_timestamp"),
    "a timestamp of 400 digits": (lambda f: _post(f, headers=_setting("X-Agent-Timestamp", "9" * 400)),
                                  "stale_timestamp"),
    "an unknown agent": (_signed_as(lambda f: "agt_0000000000000000", ALICE_SECRET), "bad_signature"),
    "a removed agent": (_signed_as(lambda f: f.removed.id, lambda f: f.removed.secret), "agent_revoked"),
    "a removed agent with a wrong secret": (_signed_as(lambda f: f.removed.id, ALICE_SECRET), "bad_signature"),
    "a nonce too short": (lambda f: _post(f, headers=_setting("X-Agent-Nonce", "short")), "bad_nonce"),
    "a nonce with a space": (lambda f: _post(f, headers=_setting("X-Agent-Nonce", "a nonce with spaces!")),
                             "bad_nonce"),
    "the nonce changed after signing": (lambda f: _post(f, headers=_setting("X-Agent-Nonce", "A" * 22)),
                                        "bad_signature"),
    "no nonce": (lambda f: _post(f, headers=_without("X-Agent-Nonce")), "missing_nonce"),
    "a wrong secret": (_signed_as(ALICE_ID, lambda f: "not-the-secret"), "bad_signature"),
    "another agent's id with your secret": (_signed_as(lambda f: f.bob.id, ALICE_SECRET), "bad_signature"),
    "a non-ASCII signature": (lambda f: _post(f, headers=_setting("X-Agent-Signature", "sïgnature")),
                              "bad_signature"),
    "the body changed after signing": (lambda f: _post(f, body=lambda b: b.replace(b'"lo"', b'"LO"')),
                                       "bad_signature"),
    "the query changed after signing": (_signed_as(ALICE_ID, ALICE_SECRET, path=POLL + "?models=m&slots=0",
                                                   sent=POLL + "?models=m&slots=1"), "bad_signature"),
    "the query's encoding changed after signing": (_signed_as(ALICE_ID, ALICE_SECRET, path=POLL + "?models=a,b",
                                                              sent=POLL + "?models=a%2Cb"), "bad_signature"),
    "the path changed after signing": (lambda f: _post(f, headers=lambda h: h | signed(
        f.alice, "POST", POLL, _post(f).body)), "bad_signature"),
    "the method changed after signing": (_signed_as(ALICE_ID, ALICE_SECRET, method="POST"), "bad_signature"),
    "the timestamp changed after signing": (lambda f: _post(f, headers=lambda h: h | {
        "X-Agent-Timestamp": str(int(h["X-Agent-Timestamp"]) + 1)}), "bad_signature"),
    "a timestamp too old": (_signed_as(ALICE_ID, ALICE_SECRET, at=-3 * SKEW), "stale_timestamp"),
    "a timestamp too far in the future": (_signed_as(ALICE_ID, ALICE_SECRET, at=3 * SKEW), "stale_timestamp"),
}


@pytest.mark.parametrize("build, code", REFUSED.values(), ids=REFUSED.keys())
def test_a_request_that_fails_the_signature_check_is_401_and_changes_nothing(fleet, build, code):
    before = fleet.stored()
    status, body = fleet.send(build(fleet))
    assert (status, body["error"]["code"]) == (401, code)
    assert fleet.stored() == before


def test_an_agent_posting_to_another_agents_job_is_403_and_changes_nothing(fleet):
    before = fleet.stored()
    status, body = fleet.send(fleet.chunk_post(fleet.bob, 1, ["evil"]))
    assert (status, body["error"]["code"]) == (403, "not_your_job")
    assert fleet.stored() == before


# --- secrets ----------------------------------------------------------------

def test_agents_list_and_the_api_never_show_secrets(tmp_path, capsys, app, client, dbconn):
    path = str(tmp_path / "cli.db")
    assert cli.main(["agents", "add", "gpu-01", "--json", "--db", path]) == 0
    secret = json.loads(capsys.readouterr().out)["secret"]
    assert cli.main(["agents", "list", "--db", path]) == 0
    assert cli.main(["agents", "list", "--json", "--db", path]) == 0
    listed = capsys.readouterr().out
    assert "gpu-01" in listed and secret not in listed

    creds = add_agent(dbconn, "gpu-02")
    for url in ("/api/v1/agents", "/api/v1/status", "/api/v1/models", "/metrics"):
        response = client.get(url)
        assert response.status_code == 200 and creds.secret.encode() not in response.data


def test_secrets_are_never_logged_at_debug_level(tmp_path):
    server = LiveServer(tmp_path / "server.db", tmp_path / "server.log",
                        {"ORCH_LOG_LEVEL": "DEBUG", "ORCH_ACCESS_LOG": "-"}).start()
    sim = start_simulator(tmp_path, "--first-token-ms", "10", "--interval-ms", "2", "--tokens", "10")
    agent = impostor = None
    try:
        agent = launch_agent(server, sim.url, tmp_path / "agent.log", "debug", LOG_LEVEL="DEBUG", LONG_POLL=2)
        with requests.post(server.url + "/api/v1/chat/stream", timeout=30,
                           json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]}) as chat:
            assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
        # The same secret under an unknown id: refused, and the refusal is logged on both sides.
        stolen = AgentCredentials("agt_0000000000000000", agent.creds.secret)
        impostor = AgentProcess("impostor", stolen, agent_environment(server.url, stolen, sim.url, {"LOG_LEVEL": "DEBUG"}),
                                tmp_path / "impostor.log").start()
        wait_until(lambda: "signature" in (tmp_path / "impostor.log").read_text(), timeout=20,
                   message="the impostor's refusal in its log")
    finally:
        if impostor is not None:
            impostor.kill()
        if agent is not None:
            agent.stop()
        sim.stop()
        server.stop()
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    assert "DEBUG" in logs["agent.log"] and "bad_signature" not in logs["agent.log"]
    for name, text in logs.items():
        assert agent.creds.secret not in text, f"the secret is in {name}"



def test_the_database_and_its_wal_are_private_from_creation(tmp_path):
    server = LiveServer(tmp_path / "fresh" / "server.db", tmp_path / "server.log").start()
    try:
        creds = server.add_agent("writer")
        path = POLL + "?models=m"
        assert requests.get(server.url + path, headers=signed(creds, "GET", path), timeout=10).status_code == 204
        files = [tmp_path / "fresh" / name for name in ("server.db", "server.db-wal", "server.db-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
    finally:
        server.stop()


def test_an_agent_signs_in_against_a_key_wrapped_with_the_server_key(tmp_path):
    server_key = "a-server-key-of-forty-characters-or-more"
    server = LiveServer(tmp_path / "server.db", tmp_path / "server.log", {"ORCH_SECRET_KEY": server_key}).start()
    sim = start_simulator(tmp_path, "--first-token-ms", "10", "--interval-ms", "2", "--tokens", "10")
    try:
        agent = launch_agent(server, sim.url, tmp_path / "agent.log", "wrapped")
        with requests.post(server.url + "/api/v1/chat/stream", timeout=30,
                           json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]}) as chat:
            assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
        stored = b"".join(path.read_bytes() for path in tmp_path.glob("server.db*"))
        assert agent.creds.secret.encode() not in stored and derive_key(agent.creds.secret) not in stored
        with migrated(server.database) as db:
            assert db.execute("SELECT verifier FROM agents WHERE id = ?", (agent.creds.id,)).fetchone()[0].startswith(
                "wrapped:")
        agent.stop()
    finally:
        sim.stop()
        server.stop()
