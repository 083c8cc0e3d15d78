"""The WebSocket agent protocol end to end: gunicorn with the gevent worker, real sockets, `python -m agent`
subprocesses and the Ollama simulator (docs/protocol.md, "The WebSocket protocol").

The faults shared with the HTTP protocol (the server killed mid-answer, a network resetting connections) are
parametrised by transport in test_faults.py; the cases here are the socket's own.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from devtools.processes import ROOT, LiveServer, wait_until
from protocol import frames
from protocol.models import canonical_model
from protocol.signing import signed_headers
from protocol.wire import CONNECT_PATH
from server.storage import agents, migrated
from server.storage.agents import AgentCredentials
from tests.e2e.chat_client import EventStream, chat, chats_at_once, expected, start_chat
from tests.e2e.flaky_proxy import FlakyProxy
from tests.stack import stored_rows

PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
RECEIVE_TIMEOUT = 10.0


# --- a hand-driven agent socket ---------------------------------------------------------------------

def signed(creds: AgentCredentials, path: str = CONNECT_PATH, timestamp: float | None = None) -> dict[str, str]:
    return signed_headers(creds.id, creds.secret, "GET", path, b"", int(time.time() if timestamp is None else timestamp))


def upgrade(server: LiveServer, headers: dict[str, str]) -> ClientConnection:
    """A WebSocket to the server's agent endpoint (used as a context manager, or closed by the caller)."""
    ws = connect(server.url.replace("http://", "ws://") + CONNECT_PATH, additional_headers=headers,
                 open_timeout=10, compression=None)
    return ws.__enter__()      # websockets 17 warns about a connection not entered


def open_socket(server: LiveServer, creds: AgentCredentials) -> ClientConnection:
    """The agent's socket, upgraded and past the server's welcome."""
    ws = upgrade(server, signed(creds))
    assert json.loads(ws.recv(timeout=RECEIVE_TIMEOUT))["type"] == frames.WELCOME
    return ws


def receive(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=RECEIVE_TIMEOUT))


def metric(server: LiveServer, line_start: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def access_lines(server: LiveServer, path_prefix: str) -> list[str]:
    log = server.log_path.with_name(server.log_path.stem + "-access.log")
    return [line for line in log.read_text().splitlines() if path_prefix in line] if log.exists() else []


@pytest.fixture
def server(live_server_factory, tmp_path) -> LiveServer:
    """A server writing its access log beside its log, so a test can count the agents' HTTP requests."""
    return live_server_factory(ORCH_ACCESS_LOG=tmp_path / "server-0-access.log", ORCH_CANCEL_GRACE=0)


# --- the documented exchange ------------------------------------------------------------------------

def documented_exchange() -> list[tuple[str, str]]:
    """The ``<!-- socket-exchange -->`` block of docs/protocol.md as (direction, text) pairs."""
    block = re.search(r"<!-- socket-exchange -->\s*```text\n(.*?)```", PROTOCOL_DOC.read_text(encoding="utf-8"), re.S)
    assert block, "docs/protocol.md has no socket exchange"
    return [(line[0], line[2:]) for line in block.group(1).splitlines() if line.strip()]


def with_doc_ids(frame: dict, ids: dict[str, str]) -> dict:
    """``frame`` with the server's real ids put back to the doc's."""
    text = json.dumps(frame, ensure_ascii=False)
    for doc_id, real in ids.items():
        text = text.replace(real, doc_id)
    return json.loads(text)


def served(server: LiveServer, model: str) -> bool:
    listed = [m["name"] for m in requests.get(server.url + "/api/v1/models", timeout=10).json()["models"]]
    return canonical_model(model) in listed            # lists show one name per model: "m" is "m:latest"


def chunks_of(server: LiveServer, job_id: str) -> list[tuple[int, str]]:
    return sorted((row[1], row[2]) for row in stored_rows(server.database)["chunks"] if row[0] == job_id)


def test_the_documented_exchange_replays_against_a_running_server(server):
    """Every frame the doc shows the server sending is what it sends (job and agent ids aside)."""
    creds = server.add_agent("documented")
    ids: dict[str, str] = {}          # the doc's ids -> the real ones
    chats: list[requests.Response] = []
    ws = upgrade(server, signed(creds))
    try:
        for direction, text in documented_exchange():
            if direction == ">":
                for doc_id, real in ids.items():
                    text = text.replace(doc_id, real)
                ws.send(text)
            elif direction == "<":
                shown, sent = json.loads(text), receive(ws)
                if shown["type"] == frames.WELCOME:
                    ids[shown["agent"]] = sent["agent"]
                elif shown["type"] == frames.JOB:
                    ids[shown["id"]] = sent["id"]
                assert with_doc_ids(sent, ids) == shown, text
            elif asked := re.fullmatch(r'the user asks (\S+) "(.*)"', text):
                wait_until(lambda: served(server, asked[1]), 10, message="the announced model to be served")
                chats.append(requests.post(server.url + "/api/v1/chat/stream", stream=True, timeout=(5, 30), json={
                    "model": asked[1], "messages": [{"role": "user", "content": asked[2]}]}))
                assert chats[-1].status_code == 200, chats[-1].text
            else:
                assert text == "the user cancels", text
                job_id = chats[-1].headers["X-Request-Id"]
                assert requests.delete(f"{server.url}/api/v1/chat/{job_id}", timeout=10).status_code == 200
        first = EventStream(chats[0]).read()
        assert first.done and first.text == "Hello world"
        assert chunks_of(server, first.request_id) == [(0, "Hel"), (1, "lo"), (2, " world")]
        second = EventStream(chats[1]).read()
        assert second.error["code"] == "cancelled", second
    finally:
        ws.close()
        for response in chats:
            response.close()


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    pytest.param(lambda creds: {}, id="unsigned"),
    pytest.param(lambda creds: signed(AgentCredentials(creds.id, "not-the-secret")), id="wrong-secret"),
    pytest.param(lambda creds: signed(creds, timestamp=time.time() - 3600), id="stale"),
    pytest.param(lambda creds: signed(creds, path=CONNECT_PATH + "?other"), id="signed-for-another-path"),
])
def test_an_upgrade_without_a_valid_signature_gets_401_and_no_socket(server, headers):
    creds = server.add_agent("intruder")
    before = stored_rows(server.database)
    with pytest.raises(InvalidStatus) as refused:
        upgrade(server, headers(creds))
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] in (
        "missing_signature", "bad_signature", "stale_timestamp")
    assert stored_rows(server.database) == before
    assert metric(server, "orchestrator_agent_sockets ") == 0


def test_a_signed_request_that_is_not_an_upgrade_gets_426(server):
    creds = server.add_agent("plain")
    response = requests.get(server.url + CONNECT_PATH, headers=signed(creds), timeout=10)
    assert response.status_code == 426 and response.json()["error"]["code"] == "upgrade_required"


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "invalid_frame"),
    (b"\x00binary", "invalid_frame"),
    ("[1, 2]", "invalid_frame"),
    ('{"models": []}', "invalid_frame"),
    ('{"type": "announce", "models": ["m"], "slots": NaN}', "invalid_frame"),
    ('{"type": "poll"}', "unknown_type"),
    ('{"type": "announce", "models": "m", "slots": 1}', "invalid_field"),
    ('{"type": "announce", "models": ["m"], "slots": 1, "jobs_seen": 3}', "invalid_field"),
    ('{"type": "chunks", "id": "j", "chunks": ["a"]}', "missing_field"),
    ('{"type": "chunks", "id": "j", "chunk": "a", "seq": 0}', "invalid_field"),
    ('{"type": "chunks", "id": "j", "chunks": [1], "seq": 0}', "invalid_field"),
    ('{"type": "chunks", "id": "j", "chunks": ["\\ud800"], "seq": 0}', "invalid_field"),
])
def test_a_bad_frame_is_answered_with_an_error_changes_nothing_and_the_socket_goes_on(server, frame, code):
    creds = server.add_agent("clumsy")
    ws = open_socket(server, creds)
    try:
        before = stored_rows(server.database)
        ws.send(frame)
        error = receive(ws)
        assert (error["type"], error["code"]) == ("error", code), error
        assert stored_rows(server.database) == before
        ws.send(frames.encode(frames.ANNOUNCE, models=["m"], slots=0, jobs_seen=0))   # still served
        ws.send("still here?")
        assert receive(ws)["code"] == "invalid_frame"
    finally:
        ws.close()
    assert "Traceback" not in server.log()


def test_chunks_for_another_agents_job_are_refused_like_a_403_and_change_nothing(server):
    owner, other = server.add_agent("owner"), server.add_agent("other")
    owner_ws, other_ws = open_socket(server, owner), open_socket(server, other)
    try:
        owner_ws.send(frames.encode(frames.ANNOUNCE, models=["m"], slots=1, jobs_seen=0))
        wait_until(lambda: served(server, "m"), 10, message="the announced model to be served")
        with start_chat(server, "whose is it?", "m") as response:
            job = receive(owner_ws)
            assert job["type"] == frames.JOB and job["id"] == response.headers["X-Request-Id"]
            before = stored_rows(server.database)
            other_ws.send(frames.chunks_frame({"id": job["id"], "seq": 0, "chunks": ["mine now"], "done": True}))
            refused = receive(other_ws)
            assert refused == {"type": "error", "id": job["id"], "code": "not_your_job",
                               "message": "this job is held by another agent"}
            assert stored_rows(server.database) == before
    finally:
        owner_ws.close()
        other_ws.close()


def test_an_agent_removed_while_connected_stores_nothing_more_and_is_closed_out(server):
    creds = server.add_agent("revoked")
    ws = open_socket(server, creds)
    ws.send(frames.encode(frames.ANNOUNCE, models=["m"], slots=1, jobs_seen=0))
    wait_until(lambda: served(server, "m"), 10, message="the announced model to be served")
    with start_chat(server, "still yours?", "m"):
        job = receive(ws)
        ws.send(frames.chunks_frame({"id": job["id"], "seq": 0, "chunks": [], "done": False}))
        assert receive(ws)["type"] == frames.ACK
        with migrated(server.database) as conn:
            assert agents.remove_agent(conn, creds.id)
        before = stored_rows(server.database)
        ws.send(frames.chunks_frame({"id": job["id"], "seq": 0, "chunks": ["too late"], "done": False}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECEIVE_TIMEOUT)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (frames.CLOSE_POLICY_VIOLATION,
                                                                 "this agent was removed")
    assert stored_rows(server.database)["chunks"] == before["chunks"]
    with pytest.raises(InvalidStatus) as refused:
        upgrade(server, signed(creds))
    assert refused.value.response.status_code == 401


def test_an_oversized_frame_closes_the_socket_with_a_policy_violation_and_a_log_line(live_server_factory):
    server = live_server_factory(ORCH_MAX_BODY_BYTES=4096)
    creds = server.add_agent("verbose")
    ws = open_socket(server, creds)
    before = stored_rows(server.database)
    ws.send(frames.chunks_frame({"id": "j", "seq": 0, "chunks": ["x" * 5000], "done": False}))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=RECEIVE_TIMEOUT)
    assert closed.value.rcvd.code == frames.CLOSE_POLICY_VIOLATION and "4096" in closed.value.rcvd.reason
    assert stored_rows(server.database) == before
    wait_until(lambda: "a frame over 4096 bytes: closed (policy violation)" in server.log(), 10,
               message="the server's log line")
    assert "Traceback" not in server.log()


def test_a_flood_of_frames_closes_the_socket_while_the_worker_keeps_streaming(server, simulator, start_agent):
    start_agent(server, simulator.url, "steady", TRANSPORT="ws")
    flooder = server.add_agent("flooder")
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    with start_chat(server, "meanwhile", sim_tokens=200, sim_interval_ms=10) as response:
        events = EventStream(response)
        assert len(events.read(stop_after=5).ids) == 5
        # A valid announce costs the server a write; 50,000 of them, sent without waiting, is a flood.
        frame = frames.encode(frames.ANNOUNCE, models=["m"], slots=0, jobs_seen=0).encode()
        raw.sendall(_upgrade_request(flooder, server.port))
        raw.recv(4096)                                  # 101 and the welcome
        _send_masked_until_closed(raw, frame, 50_000)
        answer = events.read()
    assert answer.done and answer.text == expected("meanwhile", 200), answer
    wait_until(lambda: "frames waiting to be handled (a flood): closed (policy violation)" in server.log(), 10,
               message="the flood's log line")
    assert "Traceback" not in server.log()
    raw.close()


def _upgrade_request(creds: AgentCredentials, port: int) -> bytes:
    headers = signed(creds) | {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    return (f"GET {CONNECT_PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


def _send_masked_until_closed(raw: socket.socket, payload: bytes, count: int) -> int:
    """Send ``payload`` as ``count`` client text frames (masked with a zero key) as fast as the socket takes
    them; returns how many went out before the server closed the connection."""
    assert len(payload) < 126
    frame = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
    burst = 500
    for sent in range(0, count, burst):
        try:
            raw.sendall(frame * burst)
        except OSError:
            return sent
    return count


# --- the agent over its socket ------------------------------------------------------------------------

def test_a_job_is_pushed_to_a_connected_agent_without_any_poll_or_post(server, simulator, start_agent):
    agent = start_agent(server, simulator.url, TRANSPORT="ws")
    answer = chat(server, "pushed")
    assert answer.done and answer.text == expected("pushed", 30)
    # The whole job went over the socket: one job frame out, and not one HTTP request from the agent.
    assert metric(server, 'orchestrator_agent_socket_frames_total{direction="out",type="job"}') == 1
    # No poll and no POST of tokens (the agent's model report, POST /api/v1/inference/models, is not on that path).
    assert access_lines(server, "/api/v1/inference/poll") == access_lines(server, "/api/v1/inference/stream") == []
    assert "connected to" in agent.log() and "over a WebSocket" in agent.log()


def test_a_cancel_is_pushed_at_once_and_the_agent_closes_its_ollama_stream(server, simulator, start_agent):
    start_agent(server, simulator.url, TRANSPORT="ws")
    # A model "thinking" for 60 s: no token, no frame from the agent; only a pushed cancel can stop it now.
    with start_chat(server, "think long", sim_first_token_ms=60_000, sim_tag="thinker") as response:
        job_id = response.headers["X-Request-Id"]
        wait_until(lambda: [r for r in simulator.records() if r.get("tag") == "thinker"], 15,
                   message="Ollama getting the request")
        assert requests.delete(f"{server.url}/api/v1/chat/{job_id}", timeout=10).status_code == 200
        req = next(r["req"] for r in simulator.records() if r.get("tag") == "thinker")
        ended = wait_until(lambda: [r for r in simulator.records() if r["req"] == req and r["event"] != "start"],
                           15, message="the agent closing its Ollama stream")
    assert ended[0]["event"] == "client_gone"
    assert metric(server, 'orchestrator_agent_socket_frames_total{direction="out",type="cancel"}') == 1
    assert requests.get(f"{server.url}/api/v1/chat/{job_id}", timeout=10).json()["status"] == "cancelled"


def test_a_proxy_refusing_the_upgrade_makes_the_agent_fall_back_to_http_and_the_chat_completes(
        server, simulator, start_agent):
    with FlakyProxy(server.url, reset_rate=0).start() as proxy:
        proxy.refuse_upgrades(403)
        agent = start_agent(server, simulator.url, API_BASE=proxy.url)         # TRANSPORT=auto, the default
        answer = chat(server, "through a strict proxy")
        refused = proxy.refused_upgrades
    assert answer.done and answer.text == expected("through a strict proxy", 30)
    assert refused == 1
    assert "TRANSPORT=auto: the WebSocket upgrade was refused (HTTP 403: WebSocket upgrades are not allowed " \
           "through this proxy)" in agent.log()
    assert access_lines(server, "POST /api/v1/inference/stream")


def test_a_dead_agent_is_found_by_its_missed_pong_and_gets_no_more_jobs(live_server_factory, simulator, start_agent):
    server = live_server_factory(ORCH_WS_PING_INTERVAL=0.5, ORCH_WS_PING_TIMEOUT=1, ORCH_DELIVERY_LEASE_SECONDS=30)
    frozen = start_agent(server, simulator.url, "frozen", TRANSPORT="ws")
    frozen.send_group(signal.SIGSTOP)          # its TCP stack still acknowledges: only a ping can tell
    try:
        wait_until(lambda: "no pong 1 s after a ping: closing its socket as dead" in server.log(), 15,
                   message="the server giving up on the frozen agent")
        wait_until(lambda: metric(server, "orchestrator_agent_sockets ") == 0, 10, message="the socket closed")
        standby = start_agent(server, simulator.url, "standby", TRANSPORT="ws")
        answer = chat(server, "who is alive?")
        assert answer.done and answer.text == expected("who is alive?", 30)
        # Never pushed to the dead socket (its 30 s delivery lease would have held the chat that long).
        record = requests.get(f"{server.url}/api/v1/chat/{answer.request_id}", timeout=10).json()
        assert record["agent"]["id"] == standby.creds.id
    finally:
        frozen.send_group(signal.SIGCONT)
    # Thawed, the frozen agent finds its socket closed, reconnects and serves again.
    wait_until(lambda: metric(server, "orchestrator_agent_sockets ") == 2, 30, message="the thawed agent back")


def test_jobs_running_on_several_slots_of_one_socket_stream_at_once(server, simulator, start_agent):
    start_agent(server, simulator.url, TRANSPORT="ws", MAX_JOBS=4)
    answers = chats_at_once(server, [f"in parallel {i}" for i in range(8)], sim_interval_ms=10)
    assert [answers[i].text for i in range(8)] == [expected(f"in parallel {i}", 30) for i in range(8)]
    assert metric(server, 'orchestrator_agent_socket_frames_total{direction="out",type="job"}') == 8


def test_a_server_stopping_closes_its_agent_sockets_as_going_away_and_the_agent_comes_back(
        live_server_factory, simulator, start_agent):
    server = live_server_factory()
    agent = start_agent(server, simulator.url, TRANSPORT="ws")
    assert server.stop() == 0                     # SIGTERM: the worker wakes the socket's dispatcher at once
    wait_until(lambda: "WebSocket closed (1001: the server is shutting down: reconnect)" in agent.log(), 15,
               message="the agent told the server is going away")
    server.start()
    answer = chat(server, "back again")
    assert answer.done and answer.text == expected("back again", 30)
