"""Shared fixtures: an app per test on a temporary database, and real processes (gunicorn with the gevent
worker, the Ollama simulator, agents; started by devtools/processes.py, the one process harness) for anything
involving sockets, gevent, signals or timing."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.processes import AgentProcess, LiveServer, launch_agent, register_agents, start_simulator
from protocol.signing import signed_headers
from server import create_app
from server.agents import AgentCredentials
from server.db import connect

# --- in-process app ---------------------------------------------------------

@pytest.fixture
def app_config(tmp_path) -> dict:
    """Override in a test module to change settings; the sweeper is off (tests call it)."""
    return {}


@pytest.fixture
def app(tmp_path, app_config):
    config = {"DATABASE": str(tmp_path / "test.db"), "SWEEP_INTERVAL": 0, **app_config}
    application = create_app(config)
    yield application
    application.extensions["notifier"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def dbconn(app):
    conn = connect(app.config["DATABASE"])
    yield conn
    conn.conn.close()


@pytest.fixture
def agent_creds(app) -> AgentCredentials:
    return register_agents(Path(app.config["DATABASE"]), ["test-agent"])[0]


def sign(creds: AgentCredentials, method: str, path: str, body: bytes = b"",
         timestamp: float | None = None) -> dict[str, str]:
    """Headers for a signed agent request (``path`` includes the query string)."""
    return signed_headers(creds.id, creds.secret, method, path, body,
                          int(time.time() if timestamp is None else timestamp))


def agent_post(client, creds: AgentCredentials, path: str, payload: dict):
    """POST ``payload`` as JSON to the test client, signed by ``creds``."""
    body = json.dumps(payload).encode()
    headers = sign(creds, "POST", path, body) | {"Content-Type": "application/json"}
    return client.post(path, data=body, headers=headers)


def agent_get(client, creds: AgentCredentials, path: str):
    return client.get(path, headers=sign(creds, "GET", path))


# --- real processes ---------------------------------------------------------

@pytest.fixture
def live_server_factory(tmp_path):
    """Start gunicorn servers on demand: ``live_server_factory(ORCH_X=...)``; all stopped at the end."""
    servers: list[LiveServer] = []

    def start(db_path: Path | None = None, **env) -> LiveServer:
        n = len(servers)
        server = LiveServer(db_path or tmp_path / "server.db", tmp_path / f"server-{n}.log", env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(live_server_factory) -> LiveServer:
    return live_server_factory()


@pytest.fixture
def simulator(tmp_path):
    sim = start_simulator(tmp_path, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", "30")
    yield sim
    sim.stop()


@pytest.fixture
def start_agent(tmp_path):
    """``start_agent(server, ollama_url, name, **settings)``: an agent process, online; all SIGKILLed at the end."""
    agents: list[AgentProcess] = []

    def start(server: LiveServer, ollama_url: str, name: str = "agent", **settings) -> AgentProcess:
        agents.append(launch_agent(server, ollama_url, tmp_path / f"agent-{name}.log", name, **settings))
        return agents[-1]

    yield start
    for agent in agents:
        agent.stop(signal.SIGKILL)


@contextmanager
def serving_stack(tmp: Path, agent_name: str, tokens: int, **server_env: str) -> Iterator[LiveServer]:
    """A live server, the simulator (fast timing, ``tokens`` per answer) and one agent; all stopped on exit."""
    server = LiveServer(tmp / "server.db", tmp / "server.log", {"ORCH_CANCEL_GRACE": "0", **server_env}).start()
    sim = start_simulator(tmp, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", str(tokens))
    agent = launch_agent(server, sim.url, tmp / "agent.log", agent_name)
    try:
        yield server
    finally:
        agent.stop(signal.SIGKILL)
        sim.stop()
        server.stop()


def stored_rows(db_path: Path) -> dict[str, list]:
    """Every row the server keeps (requests, chunks, agents): nothing may change for a refused request."""
    db = connect(str(db_path))
    try:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("requests", "chunks", "agents")}
    finally:
        db.conn.close()
