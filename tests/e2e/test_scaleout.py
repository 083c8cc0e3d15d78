"""Many workers and many hosts on one PostgreSQL database, with real processes: gunicorn servers, nginx in front,
agents, the simulator, and PostgreSQL itself stopped and restarted under them."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading

import psycopg
import pytest
import requests

from devtools.nginx import Nginx, NginxUnavailable, nginx_binary
from devtools.postgres import Cluster, PostgresUnavailable
from devtools.processes import ROOT, LiveServer, start_simulator, wait_until
from tests.e2e.chat_client import Answer, EventStream, chat, expected, resume, start_chat
from tests.signed import sign

SLOW = {"sim_tokens": 60, "sim_interval_ms": 40}          # ~2.4 s of answer: time to break things mid-stream
FAST_LEASES = {"ORCH_LEASE_SECONDS": 3, "ORCH_DELIVERY_LEASE_SECONDS": 3, "ORCH_SWEEP_INTERVAL": 0.2}


@pytest.fixture
def pg_url(new_database):
    """A fresh database on the shared throwaway cluster."""
    return new_database("postgres")


@pytest.fixture
def own_cluster():
    """A PostgreSQL server of this test's own, to stop and restart without touching other tests' servers."""
    try:
        cluster = Cluster.create()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.destroy()


@pytest.fixture
def hosts(tmp_path):
    """``hosts(database, names, **env)``: one `orchestrator serve` per name, all on ``database``; stopped at the end."""
    started: list[LiveServer] = []

    def start(database: str, names: tuple[str, ...] = ("host-a", "host-b"), **env) -> list[LiveServer]:
        for name in names:
            started.append(LiveServer(database, tmp_path / f"{name}.log", env, name=name).start())
        return started[-len(names):]

    yield start
    for host in started:
        host.stop(signal.SIGINT)


@pytest.fixture
def front(tmp_path):
    """``front(hosts)``: nginx with deploy/nginx.conf's settings in front of these hosts."""
    try:
        nginx_binary()
    except NginxUnavailable as exc:
        pytest.skip(str(exc))
    fronts: list[Nginx] = []

    def start(backends: list[LiveServer]) -> Nginx:
        fronts.append(Nginx.start_front(tmp_path / "nginx", [b.url for b in backends]))
        return fronts[-1]

    yield start
    for nginx in fronts:
        nginx.stop()


@pytest.fixture
def sim(tmp_path):
    simulator = start_simulator(tmp_path, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", "30")
    yield simulator
    simulator.stop()


def serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`orchestrator serve` as an operator runs it, expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "server", "serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, **env})


# --- refusing to start ------------------------------------------------------------------------------

def test_serve_with_an_unreachable_postgresql_url_exits_naming_host_port_and_reason():
    result = serve("--db", "postgresql://orch@127.0.0.1:1/orch", "--port", "0")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "127.0.0.1" in line and "port 1" in line and "refused" in line.lower(), line
    assert "Traceback" not in result.stderr


def test_several_workers_on_sqlite_are_refused_at_start_with_one_line(tmp_path):
    result = serve("--db", str(tmp_path / "one.db"), "--port", "0", ORCH_WORKERS="2")
    assert result.returncode == 2
    assert "ORCH_WORKERS=2 needs PostgreSQL" in result.stderr and "ORCH_NOTIFIER=poll" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "one.db").exists()          # refused before anything was written


def test_a_database_ahead_of_the_code_is_refused_on_postgresql(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        conn.execute("INSERT INTO migrations VALUES ('9999_from_the_future.sql', 0)")
    result = subprocess.run([sys.executable, "-m", "server", "migrate", "--db", pg_url], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "9999_from_the_future.sql" in result.stderr and "Traceback" not in result.stderr


# --- one host, cooperative waits ------------------------------------------------------------------

def test_queries_blocked_in_postgresql_do_not_stall_the_gevent_worker(hosts, pg_url):
    """Two agents' polls wait on a lock held elsewhere; meanwhile the same worker keeps answering."""
    (host,) = hosts(pg_url, ("host",))
    agents = [host.add_agent(name) for name in ("one", "two")]
    path = "/api/v1/inference/poll?models=m&slots=1"
    results: dict[str, int] = {}

    def poll(creds) -> None:
        results[creds.id] = requests.get(host.url + path, headers=sign(creds, "GET", path), timeout=60).status_code

    with psycopg.connect(pg_url) as locker:
        locker.execute("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")     # held until this transaction ends
        polls = [threading.Thread(target=poll, args=(creds,)) for creds in agents]
        for thread in polls:
            thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        with psycopg.connect(pg_url, autocommit=True) as watcher:
            wait_until(lambda: watcher.execute(waiting).fetchone()[0] >= 2, 20, 0.05, "both polls to wait on the lock")
        # Both queries are in flight in the one worker, and it still serves everything else.
        for _ in range(5):
            assert requests.get(host.url + "/healthz", timeout=5).status_code == 200
        assert results == {}
        locker.rollback()
    for thread in polls:
        thread.join(30)
    assert results == {creds.id: 204 for creds in agents}


# --- many workers, many hosts ---------------------------------------------------------------------

def test_two_workers_wake_each_other_through_postgresql(hosts, pg_url, sim, tmp_path, start_agent):
    """A long poll parked in one worker takes chats queued in the other, and streams read chunks posted there."""
    (host,) = hosts(pg_url, ("host",), ORCH_WORKERS="2")
    start_agent(host, sim.url, "agent", LONG_POLL=30, MAX_JOBS=2)
    answers: list[Answer] = []

    def ask(n: int) -> None:
        # Connection: close spreads the chats over both workers.
        answers.append(chat(host, f"question {n}"))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Well under the agent's 30 s long poll: a wake-up lost between workers would leave a chat waiting it out.
        thread.join(20)
    assert sorted(a.text for a in answers) == sorted(expected(f"question {n}", 30) for n in range(12))
    assert all(a.done and a.ids == list(range(len(a.ids))) for a in answers)


def test_the_agent_on_one_host_and_the_user_on_another_then_resuming_on_the_first(
        hosts, pg_url, sim, tmp_path, start_agent):
    host_a, host_b = hosts(pg_url)
    start_agent(host_a, sim.url, "agent", LONG_POLL=30)
    with start_chat(host_b, "across hosts", **SLOW) as response:
        answer = EventStream(response).read(stop_after=10)
    assert answer.ids == list(range(10)) and not answer.done
    resumed = resume(host_a, answer)
    assert resumed.done and resumed.text == expected("across hosts", 60)
    assert resumed.ids == list(range(60))


def test_an_agent_socket_on_one_host_serves_users_of_another_and_their_cancels_cross_too(
        hosts, pg_url, sim, tmp_path, start_agent):
    """A job queued on host B reaches the agent's socket on host A at once, and so does its cancel."""
    host_a, host_b = hosts(pg_url, ORCH_CANCEL_GRACE="0")
    agent = start_agent(host_a, sim.url, "agent", TRANSPORT="ws")
    answer = chat(host_b, "across hosts")
    assert answer.done and answer.text == expected("across hosts", 30)
    with start_chat(host_b, "stop me", sim_first_token_ms=60_000, sim_tag="stopped") as response:
        job_id = response.headers["X-Request-Id"]
        wait_until(lambda: [r for r in sim.records() if r.get("tag") == "stopped"], 15, message="Ollama's request")
        assert requests.delete(f"{host_b.url}/api/v1/chat/{job_id}", timeout=10).status_code == 200
        req = next(r["req"] for r in sim.records() if r.get("tag") == "stopped")
        # No frame from the agent while Ollama "thinks": only the cancel pushed from host A can stop it.
        ended = wait_until(lambda: [r for r in sim.records() if r["req"] == req and r["event"] != "start"], 15,
                           message="the agent closing its Ollama stream")
    assert ended[0]["event"] == "client_gone"
    assert "over a WebSocket" in agent.log() and "Traceback" not in agent.log()


def test_an_agent_socket_through_nginx_is_upgraded_and_serves(hosts, front, pg_url, sim, tmp_path, start_agent):
    host_a, host_b = hosts(pg_url)
    nginx = front([host_a, host_b])
    agent = start_agent(host_a, sim.url, "agent", api_base=nginx.url)   # TRANSPORT=auto
    answer = chat(nginx, "through nginx")
    assert answer.done and answer.text == expected("through nginx", 30)
    assert "over a WebSocket" in agent.log() and "refused" not in agent.log()


def test_a_host_killed_mid_stream_behind_nginx_loses_and_duplicates_nothing(
        hosts, front, pg_url, sim, tmp_path, start_agent):
    host_a, host_b = hosts(pg_url, **FAST_LEASES)
    nginx = front([host_a, host_b])
    agent = start_agent(host_b, sim.url, "agent", api_base=nginx.url, LONG_POLL=10)
    with start_chat(host_a, "survive a host", **SLOW) as response:
        answer = EventStream(response).read(stop_after=10)
        host_a.kill()                                   # the user's host, and half of the agent's
        EventStream(response, answer).read()            # the rest of what reached the user before the kill
    assert not answer.done and answer.error is None
    resumed = resume(nginx, answer)                     # through nginx: only host B is left
    assert resumed.error is None and resumed.done, resumed
    assert resumed.text == expected("survive a host", 60) and resumed.ids == list(range(60))
    assert "Traceback" not in agent.log()


# --- PostgreSQL going away ------------------------------------------------------------------------

def test_a_postgresql_restart_mid_stream_loses_and_duplicates_nothing(hosts, own_cluster, sim, tmp_path, start_agent):
    (host,) = hosts(own_cluster.create_database(), ("host",))
    start_agent(host, sim.url, "agent", LONG_POLL=10)
    with start_chat(host, "through a restart", **SLOW) as response:
        stream = EventStream(response)
        answer = stream.read(stop_after=10)
        own_cluster.restart()                           # every connection cut; the listener's too
        stream.read()
    if not answer.done:                                 # the stream may end with storage_unavailable mid-restart
        assert answer.error is None or answer.error["code"] == "storage_unavailable", answer.error
        answer.error = None
        # As a client told to retry does: resume once the server says its database writes again.
        wait_until(lambda: requests.get(host.url + "/healthz", timeout=10).status_code == 200, 30, 0.2,
                   "health to come back with PostgreSQL")
        answer = resume(host, answer)
    assert answer.done and answer.text == expected("through a restart", 60) and answer.ids == list(range(60))
    # The listener is back: a new chat is woken without any poll.
    assert chat(host, "after the restart").text == expected("after the restart", 30)


def test_postgresql_away_longer_than_a_lease_fails_health_and_ends_streams_with_an_error(hosts, own_cluster):
    (host,) = hosts(own_cluster.create_database(), ("host",), ORCH_LEASE_SECONDS=2, ORCH_KEEPALIVE_SECONDS=0.5)
    stand_in = host.add_agent("stand-in")
    path = "/api/v1/inference/poll?models=m&slots=0"     # online for "m", takes nothing: the chat stays queued
    assert requests.get(host.url + path, headers=sign(stand_in, "GET", path), timeout=10).status_code == 204
    with requests.post(host.url + "/api/v1/chat/stream", json={"model": "m", "messages": [{"role": "user",
                       "content": "wait"}]}, stream=True, timeout=(5, 30)) as response:
        lines = response.iter_lines()
        assert next(lines) == b": keepalive"
        own_cluster.stop("immediate")
        health = requests.get(host.url + "/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["error"]["code"] == "database_unreachable"
        rest = b"\n".join(lines)
    assert b"event: error" in rest and b'"storage_unavailable"' in rest
    own_cluster.start()
    wait_until(lambda: requests.get(host.url + "/healthz", timeout=10).status_code == 200, 30, 0.2,
               "health to come back with PostgreSQL")
