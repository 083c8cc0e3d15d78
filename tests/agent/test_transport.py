"""How the agent picks its transport: the upgrade's answers, the fallback of TRANSPORT=auto, the URL it dials."""
from __future__ import annotations

import pytest

from agent.config import AgentConfig
from agent.exceptions import SignatureRejected, TransportError, UpgradeRefused
from agent.socket_client import _refusal, socket_url
from agent.transport import AutoTransport, HttpTransport, SocketTransport, build_transport
from agent.worker import StartupError, Worker
from tests.agent.test_agent_worker import FakeBackend, FakeClient, job, startup_error


@pytest.mark.parametrize(("status", "kind"), [
    (401, SignatureRejected),
    (404, UpgradeRefused),          # a server without the endpoint (older than the WebSocket protocol)
    (426, UpgradeRefused),          # a proxy dropped the Upgrade header: the server saw a plain GET
    (403, UpgradeRefused),          # a proxy that does not allow WebSockets
    (400, UpgradeRefused),
    (501, UpgradeRefused),          # a server that cannot hand its socket over
    (502, TransportError),          # a host restarting behind nginx: try the socket again later
    (503, TransportError),
    (429, TransportError),
])
def test_what_an_answer_to_the_upgrade_means(status, kind):
    error = _refusal(status, b'{"error": {"code": "x", "message": "the reason"}}')
    assert type(error) is kind and error.status == status and "the reason" in str(error)


@pytest.mark.parametrize(("api_base", "url"), [
    ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/api/v1/agents/connect"),
    ("https://orchestrator.example.org/", "wss://orchestrator.example.org/api/v1/agents/connect"),
    ("https://example.org:8443/orch", "wss://example.org:8443/orch/api/v1/agents/connect"),
])
def test_the_socket_url_follows_api_base(api_base, url):
    assert socket_url(api_base) == url


class RefusingSocket:
    """A SocketTransport whose server (or proxy) refuses the upgrade."""

    name = "ws"
    api_base = "http://server.test"

    def __init__(self) -> None:
        self.closed = False

    def next_job(self, models, slots, kinds=None):
        raise UpgradeRefused("HTTP 403: no WebSockets here", status=403)

    def close(self) -> None:
        self.closed = True


def test_auto_falls_back_to_http_for_good_once_the_upgrade_is_refused(caplog):
    client = FakeClient(job("j1"), None)
    http, socket = HttpTransport(client, AgentConfig("agt", "s")), RefusingSocket()
    auto = AutoTransport(socket, http, "agt")
    assert auto.next_job(["sim"], 1, None).id == "j1"
    assert auto.next_job(["sim"], 1, None) is None
    assert (auto.name, socket.closed, len(client.polls)) == ("http", True, 2)
    assert "TRANSPORT=auto: the WebSocket upgrade was refused (HTTP 403: no WebSockets here)" in caplog.text


def test_a_refused_upgrade_stops_an_agent_that_may_only_use_the_websocket_at_start():
    config = AgentConfig("agt_test", "s", transport="ws")
    error = startup_error(Worker(config, FakeClient(), FakeBackend(), RefusingSocket()))
    assert isinstance(error, StartupError) and "TRANSPORT=ws: the WebSocket upgrade was refused" in str(error)


@pytest.mark.parametrize(("settings", "kind"), [
    ({}, AutoTransport), ({"transport": "ws"}, SocketTransport), ({"transport": "http"}, HttpTransport),
    ({"transport": "ws", "legacy": True}, HttpTransport),
])
def test_the_transport_setting_picks_the_transport(settings, kind):
    config = AgentConfig("agt", "s", **settings)
    transport = build_transport(config, FakeClient(), "agt")
    try:
        assert type(transport) is kind
    finally:
        transport.close()
