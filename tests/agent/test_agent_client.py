"""ServerClient over real HTTP against a scripted stand-in for the server's agent endpoints."""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.batcher import ChunkBatch, SendReply
from agent.client import ServerClient
from agent.exceptions import (
    AgentRevoked,
    ClockSkew,
    JobGone,
    MalformedJob,
    ProtocolError,
    SeqConflict,
    SignatureRejected,
    TransportError,
)
from agent.job import Job
from protocol import signing

SECRET = "s3cret"
JOB = {"id": "j1", "model": "sim", "messages": [{"role": "user", "content": "hé"}], "options": {"seed": 1},
       "lease_seconds": 30}


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.replies: deque[tuple[int, object]] = deque()
        self.requests: list[tuple[str, str, bytes, bool]] = []  # method, path, body, signature valid
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandIn

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._answer(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        valid = signing.verify(SECRET, self.headers[signing.HEADER_SIGNATURE], self.command, self.path,
                               self.headers[signing.HEADER_TIMESTAMP], body, self.headers.get(signing.HEADER_NONCE, ""))
        self.server.requests.append((self.command, self.path, body, valid))
        status, payload = self.server.replies.popleft() if self.server.replies else (204, None)
        data = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stand_in():
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(server: StandIn, **kwargs) -> ServerClient:
    return ServerClient(server.url, "agt_1", SECRET, **kwargs)


def test_a_poll_declares_models_and_slots_and_is_signed_over_the_wire_path(stand_in):
    stand_in.replies.append((200, JOB))
    job = client_for(stand_in).poll(["sim", "llama3:8b"], 2, wait=20)
    assert job == Job("j1", "sim", [{"role": "user", "content": "hé"}], {"seed": 1}, 30.0)
    method, path, body, valid = stand_in.requests[0]
    assert (method, path, body, valid) == ("GET", "/api/v1/inference/poll?models=sim,llama3:8b&slots=2&wait=20",
                                           b"", True)


def test_an_empty_queue_is_none(stand_in):
    assert client_for(stand_in).poll(["sim"], 1) is None


def test_a_batch_post_is_signed_over_its_exact_bytes_and_returns_the_reply(stand_in):
    stand_in.replies.append((200, {"ok": True, "cancelled": True, "next_seq": 3}))
    reply = client_for(stand_in).send(ChunkBatch("j1", 1, ("b", "ç"), done=True, stats={"eval_count": 3}))
    assert reply == SendReply(cancelled=True, next_seq=3)
    method, path, body, valid = stand_in.requests[0]
    assert (method, path, valid) == ("POST", "/api/v1/inference/stream", True)
    assert json.loads(body) == {"id": "j1", "chunks": ["b", "ç"], "seq": 1, "done": True,
                                "stats": {"eval_count": 3}}


@pytest.mark.parametrize(("status", "payload", "error"), [
    (409, {"error": {"code": "seq_gap", "message": "gap", "expected_seq": 4}}, SeqConflict),
    (410, {"error": {"code": "lease_expired", "message": "gone"}}, JobGone),
    (403, {"error": {"code": "not_your_job", "message": "not yours"}}, JobGone),
    (404, {"error": {"code": "not_found", "message": "no job"}}, JobGone),
    (401, {"error": {"code": "bad_signature", "message": "bad"}}, SignatureRejected),
    (401, {"error": {"code": "agent_revoked", "message": "removed"}}, AgentRevoked),
    (429, {"error": {"code": "too_many_requests", "message": "slow down"}}, TransportError),
    (503, {"error": {"code": "storage_unavailable", "message": "busy"}}, TransportError),
    (500, {"error": {"code": "internal_error", "message": "boom"}}, TransportError),
    (502, b"<html>bad gateway</html>", TransportError),
    (400, {"error": {"code": "invalid_field", "message": "seq"}}, ProtocolError),
    (200, b"not json", ProtocolError),
])
def test_post_statuses_map_to_what_the_batcher_acts_on(stand_in, status, payload, error):
    stand_in.replies.append((status, payload))
    with pytest.raises(error) as info:
        client_for(stand_in).send(ChunkBatch("j1", 4, ("x",)))
    if error is SeqConflict:
        assert info.value.expected_seq == 4


def test_a_stale_timestamp_reports_how_far_this_hosts_clock_is_from_the_servers(stand_in):
    stand_in.replies.append((401, {"error": {"code": "stale_timestamp", "message": "more than 60 s",
                                             "server_time": time.time() + 125}}))
    with pytest.raises(ClockSkew) as info:
        client_for(stand_in).poll(["sim"], 1)
    assert 120 < info.value.offset < 130
    assert "clock differs from the server's by +12" in str(info.value)


@pytest.mark.parametrize(("status", "payload", "error", "job_id"), [
    (401, {"error": {"code": "bad_signature", "message": "bad signature or unknown agent"}}, SignatureRejected, None),
    (503, b"", TransportError, None),
    (200, b"{oops", MalformedJob, None),
    (200, [JOB], MalformedJob, None),
    (200, {**JOB, "messages": "hello"}, MalformedJob, "j1"),
    (200, {**JOB, "model": ""}, MalformedJob, "j1"),
    (200, {**JOB, "lease_seconds": "soon"}, MalformedJob, "j1"),
])
def test_poll_failures(stand_in, status, payload, error, job_id):
    stand_in.replies.append((status, payload))
    with pytest.raises(error) as info:
        client_for(stand_in).poll(["sim"], 1)
    assert getattr(info.value, "job_id", None) == job_id


def test_an_unreachable_server_is_a_transport_error():
    with pytest.raises(TransportError, match="connection refused"):
        ServerClient("http://127.0.0.1:9", "agt_1", SECRET).poll(["sim"], 1)


def test_keep_alive_reuses_one_connection_and_legacy_opens_one_per_request(stand_in):
    kept = client_for(stand_in)
    for _ in range(5):
        kept.poll(["sim"], 1)
    assert stand_in.connections == 1
    legacy = client_for(stand_in, keep_alive=False)
    stand_in.replies.extend([(200, {"ok": True, "cancelled": False, "next_seq": 1})] * 2)
    for chunk in ("a", "b"):
        assert legacy.send_legacy("j1", chunk, False) is False
    legacy.poll(["sim"], 1)
    assert stand_in.connections == 4
    assert json.loads(stand_in.requests[5][2]) == {"id": "j1", "chunk": "a", "done": False}


def test_concurrent_threads_never_share_a_session(stand_in):
    client = client_for(stand_in)
    stand_in.replies.extend([(200, {"ok": True, "cancelled": False, "next_seq": 1})] * 40)
    threads = [threading.Thread(target=lambda: [client.send(ChunkBatch("j", 0, ("a",))) for _ in range(10)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(stand_in.requests) == 40 and all(valid for *_, valid in stand_in.requests)
    assert stand_in.connections <= 4
