"""Shared fixtures: an app per test on a temporary database, and real processes
(gunicorn with the gevent worker, the Ollama simulator, agents) for anything
involving sockets, gevent, signals or timing."""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from agent.config import SETTINGS
from server import create_app
from server.agents import AgentCredentials, add_agent, online
from server.db import connect
from server.signing import signed_headers

ROOT = Path(__file__).resolve().parent.parent
# The browser tests' fixtures (browser, page, new_page, start_network) live in their own module.
pytest_plugins = ["browser_harness"]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def agent_creds(dbconn) -> AgentCredentials:
    return add_agent(dbconn, "test-agent")


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

@dataclass
class LiveServer:
    """gunicorn with the gevent worker, started as the README says."""

    db_path: Path
    log_path: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.port = self.port or free_port()
        env = dict(os.environ, ORCH_DATABASE=str(self.db_path), ORCH_BIND=f"127.0.0.1:{self.port}",
                   PYTHONUNBUFFERED="1", **{k: str(v) for k, v in self.env.items()})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:server.gunicorn_conf", "server.wsgi:app"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._answers, timeout, 0.05, f"server on port {self.port} (log: {self.log_path})")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return requests.get(self.url + "/api/v1/__ping__", timeout=1).status_code == 404
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        """SIGKILL the whole server (arbiter and worker), like a crash."""
        self.stop(signal.SIGKILL)

    def add_agent(self, name: str = "agent") -> AgentCredentials:
        conn = connect(str(self.db_path))
        try:
            from server.migrations import migrate
            migrate(conn)
            return add_agent(conn, name)
        finally:
            conn.conn.close()


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


@dataclass
class Simulator:
    proc: subprocess.Popen
    url: str
    emit_log: Path

    def records(self) -> list[dict]:
        return requests.get(self.url + "/sim/log", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_simulator(tmp_path: Path, *args: str) -> Simulator:
    """The Ollama simulator as a subprocess; waits (with a deadline) for its listening line."""
    emit_log = tmp_path / f"sim-emit-{time.monotonic_ns()}.jsonl"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "agent.simulator", "--port", "0",
                             "--emit-log", str(emit_log), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 20
    while (remaining := deadline - time.monotonic()) > 0:
        if not selector.select(remaining):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on " in line:
            return Simulator(proc, line.rsplit("listening on ", 1)[1].strip(), emit_log)
    proc.kill()
    raise AssertionError(f"the simulator did not start (exit code {proc.poll()})")


@pytest.fixture
def simulator(tmp_path):
    sim = start_simulator(tmp_path, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", "30")
    yield sim
    sim.stop()


@dataclass
class AgentProcess:
    """`python -m agent` as a subprocess."""

    proc: subprocess.Popen
    log_path: Path
    creds: AgentCredentials

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def agent_is_online(server: LiveServer, agent_id: str) -> bool:
    conn = connect(str(server.db_path))
    try:
        return any(a["id"] == agent_id for a in online(conn, time.time(), 60))
    finally:
        conn.conn.close()


def launch_agent(server: LiveServer, ollama_url: str, log_path: Path, name: str, **settings) -> AgentProcess:
    """Register agent ``name``, start it with ``settings`` (agent environment variables), wait until it is online."""
    creds = server.add_agent(name)
    env = {k: v for k, v in os.environ.items() if k not in {s.name for s in SETTINGS} | {"OLLAMA_HOST"}}
    env |= {"API_BASE": server.url, "AGENT_ID": creds.id, "AGENT_SECRET": creds.secret, "OLLAMA_URL": ollama_url,
            "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in settings.items()}}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    agent = AgentProcess(proc, log_path, creds)

    def ready() -> bool:
        assert proc.poll() is None, f"the agent exited: {agent.log()}"
        return agent_is_online(server, creds.id)

    wait_until(ready, 20, 0.05, f"agent {name} online")
    return agent


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
