"""Shared fixtures: an app per test on a temporary database, and real processes (gunicorn with the gevent
worker, the Ollama simulator, agents; started by devtools/processes.py, the one process harness) for anything
involving sockets, gevent, signals or timing."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.postgres import Cluster, PostgresUnavailable
from devtools.processes import AgentProcess, LiveServer, launch_agent, register_agents, start_simulator
from server import create_app
from server.storage import get_storage
from server.storage.agents import AgentCredentials

# The browser tests' fixtures (browser, page, new_page, start_network) live in their own module.
pytest_plugins = ["tests.e2e.browser_harness"]


# --- storage engines ------------------------------------------------------

def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "engines(*names): run the module's tests on each storage engine named")


def pytest_generate_tests(metafunc) -> None:
    """Tests marked ``engines("sqlite", "postgres")`` run once per engine.

    Through the ``engine`` fixture (a database per test) or ``module_engine`` (servers shared by a module).
    """
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is None:
        return
    if "module_engine" in metafunc.fixturenames:
        metafunc.parametrize("module_engine", marker.args, indirect=True, scope="module")
    elif "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", marker.args, indirect=True)


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL server per test process (a Unix socket, no TCP port)."""
    try:
        cluster = Cluster.create()
    except PostgresUnavailable as exc:
        pytest.skip(f"{exc}; make test installs it (.ci/install-services)")
    yield cluster
    cluster.destroy()


@pytest.fixture
def engine(request) -> str:
    """The storage engine under test: ``sqlite`` unless the test is marked ``engines(...)``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="module")
def module_engine(request) -> str:
    """The storage engine of a module's shared servers: ``sqlite`` unless the module is marked ``engines(...)``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def new_database(tmp_path_factory, request):
    """``new_database(engine)``: the URL of a fresh, empty database (a SQLite file of its own, or on PostgreSQL)."""
    def make(engine: str) -> str:
        if engine == "postgres":
            return request.getfixturevalue("pg_cluster").create_database()
        return str(tmp_path_factory.mktemp("db") / "server.db")
    return make


@pytest.fixture
def database_url(engine, new_database) -> str:
    """A fresh database on the test's engine."""
    return new_database(engine)


# --- in-process app ---------------------------------------------------------

@pytest.fixture
def app_config(tmp_path) -> dict:
    """Override in a test module to change settings; the sweeper is off (tests call it)."""
    return {}


@pytest.fixture
def app(database_url, app_config):
    config = {"DATABASE": database_url, "SWEEP_INTERVAL": 0, **app_config}
    application = create_app(config)
    yield application
    get_storage(application).notifier.close()
    get_storage(application).close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def dbconn(app):
    """A connection of the test's own to the app's database; its writes wake the app's waiters."""
    conn = get_storage(app).connect()
    yield conn
    conn.close()


@dataclass
class Loans:
    """Connections the app's storage lent out: how many, which are still out, how many came back mid-transaction."""

    taken: int = 0
    out: set[int] = field(default_factory=set)
    returned_in_transaction: int = 0


@pytest.fixture
def loans(app, monkeypatch) -> Loans:
    """Track every connection the app's storage lends from now on (requests, streams, polls), on any engine."""
    store, record = get_storage(app), Loans()
    take, give_back = store.take, store.give_back

    def tracked_take():
        conn = take()
        record.taken += 1
        record.out.add(id(conn))
        return conn

    def tracked_give_back(conn):
        record.out.discard(id(conn))
        record.returned_in_transaction += conn.in_transaction
        give_back(conn)

    monkeypatch.setattr(store, "take", tracked_take)
    monkeypatch.setattr(store, "give_back", tracked_give_back)
    return record


@pytest.fixture
def agent_creds(app) -> AgentCredentials:
    return register_agents(app.config["DATABASE"], ["test-agent"])[0]


# --- real processes ---------------------------------------------------------

@pytest.fixture
def live_server_factory(tmp_path, database_url):
    """Start gunicorn servers on demand: ``live_server_factory(ORCH_X=...)``; all stopped at the end.

    They share the test's database (``database_url``, on the test's engine) unless given another.
    """
    servers: list[LiveServer] = []

    def start(database: str | Path | None = None, **env) -> LiveServer:
        n = len(servers)
        server = LiveServer(database or database_url, tmp_path / f"server-{n}.log", env)
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
