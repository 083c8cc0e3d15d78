"""The one process harness: the server, the Ollama simulator and agents as real subprocesses.

Tests (through tests/conftest.py's fixtures), `make bench` and `make run` all start
their processes here. Each runs in its own session, so a signal reaches its whole
group (gunicorn's arbiter and worker alike); it logs to a file, or to this terminal
without one; stopping sends SIGTERM, then SIGKILL after a deadline. A process that
announces its address ("... listening on URL") is waited for by reading that line;
anything else is waited for by polling a condition with a deadline.

The server's database is touched in three functions only: `register_agents`,
`agent_online` and `agent_registered`.
"""
from __future__ import annotations

import http.client
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from agent.config import DEFAULTS as AGENT_DEFAULTS
from agent.config import SETTINGS as AGENT_SETTINGS
from protocol.signing import derive_key
from server.storage import agents, migrated
from server.storage.agents import AgentCredentials

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# An agent's warm stop lets running jobs finish for SHUTDOWN_TIMEOUT; then it needs room to post their end.
AGENT_STOP_TIMEOUT = AGENT_DEFAULTS["SHUTDOWN_TIMEOUT"] + 10.0
# The server's default ORCH_AGENT_ONLINE_SECONDS: an agent that polled within it counts as online.
ONLINE_WINDOW = 60.0
PING_PATH = "/api/v1/__ping__"  # no such route: a 404 means the app answers


class HarnessError(AssertionError):
    """A process did not start, died, or a condition did not hold in time; the message says which.

    An AssertionError, so pytest reports a failed check; bench and devrun catch it by name.
    """


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; HarnessError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


# Below Linux's default ephemeral range (32768-60999).  A port the kernel picks comes from that range, and
# between our check and the server's bind another process's outgoing connection took one ("Address already
# in use", a test of make test failing once under four parallel workers): outgoing connections never take
# ports from here.
_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port nothing listens on right now, outside the range outgoing connections take theirs from."""
    for _ in range(100):
        port = random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:      # every try taken: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One subprocess in its own session, logging to ``log_path`` (None: to this terminal)."""

    stop_timeout = STOP_TIMEOUT

    def __init__(self, name: str, argv: Sequence[str], log_path: Path | None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen | None = None
        self.listening_line = ""
        self._log = None

    def start(self, *, stdout_pipe: bool = False) -> Process:
        """Start it; with ``stdout_pipe`` its stdout is kept for `read_listening_url` (stderr still logs)."""
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env={**self.env, "PYTHONUNBUFFERED": "1"},
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        """HarnessError, with the end of the log, if the process has exited."""
        if self.proc.poll() is not None:
            where = f" (log: {self.log_path}):\n{self.log_tail()}" if self.log_path else ""
            raise HarnessError(f"the {self.name} exited with status {self.proc.returncode}{where}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:] or "(empty log)"

    def read_listening_url(self, timeout: float = START_TIMEOUT) -> str:
        """The URL of the ``... listening on URL`` line the process prints on stdout once it is ready."""
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if "listening on " in line:
                self.listening_line = line
                return line.rsplit("listening on ", 1)[1].strip()
        self.stop(signal.SIGKILL)
        raise HarnessError(f"the {self.name} did not print its address (exit status {self.proc.returncode}):\n"
                           f"{self.log_tail()}")

    def send_group(self, sig: int) -> None:
        """Signal the whole process group (a no-op once it is gone)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Send ``sig`` to the group, SIGKILL it after ``timeout`` (default: `stop_timeout`); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_group(sig)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.send_group(signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group, like a crash."""
        self.stop(signal.SIGKILL)


# --- the server and its database ---------------------------------------------------------

class LiveServer(Process):
    """gunicorn with the gevent worker, started as the README says (`orchestrator serve`).

    ``database`` is a SQLite file or a ``postgresql://`` URL; several servers may share a PostgreSQL one.
    """

    def __init__(self, database: str | Path, log_path: Path, env: Mapping[str, object] | None = None, *,
                 port: int = 0, host: str = "127.0.0.1", name: str = "server", prefix: Sequence[str] = ()) -> None:
        super().__init__(name, [], log_path)
        self.database, self.port, self.host = str(database), port, host
        self.prefix = list(prefix)      # runs the server, e.g. under another open-files limit
        self.env.update({k: str(v) for k, v in (env or {}).items()})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def launch(self) -> LiveServer:
        """Start it (on a free port unless it has one) without waiting; see `wait_ready`."""
        self.port = self.port or free_port()
        self.argv = [*self.prefix, sys.executable, "-m", "server", "serve", "--db", self.database,
                     "--host", self.host, "--port", str(self.port)]
        super().start()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> LiveServer:
        wait_until(self._answers, timeout, 0.05, f"the {self.name} on port {self.port} (log: {self.log_path})")
        return self

    def start(self, timeout: float = START_TIMEOUT) -> LiveServer:
        """Start it and return once the app answers."""
        return self.launch().wait_ready(timeout)

    def add_agent(self, name: str = "agent") -> AgentCredentials:
        """Register agent ``name`` in this server's database (its key wrapped with the server's ORCH_SECRET_KEY)."""
        return register_agents(self.database, [name], self.env.get("ORCH_SECRET_KEY", ""))[0]

    def _answers(self) -> bool:
        self.check_alive()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            conn.request("GET", PING_PATH)
            return conn.getresponse().status == 404
        except OSError:
            return False
        finally:
            conn.close()


def register_agents(database: str | Path, names: Sequence[str], secret_key: str = "") -> list[AgentCredentials]:
    """Register agents ``names`` in one transaction (as `orchestrator agents add` does), migrating first."""
    with migrated(str(database)) as conn, conn.transaction():
        return [agents.add_agent(conn, name, secret_key=secret_key) for name in names]


def agent_online(database: str | Path, agent_id: str, window: float = ONLINE_WINDOW) -> dict | None:
    """The agent as the server lists it (models, slots, last_seen) once it has polled within ``window`` s; else None.

    Only then does the server accept chats for its models.
    """
    with migrated(str(database)) as conn:
        return next((a for a in agents.online(conn, time.time(), window) if a["id"] == agent_id), None)


def agent_registered(database: str | Path, creds: AgentCredentials, secret_key: str = "") -> bool:
    """Whether ``creds`` still sign for an active agent of this database."""
    with migrated(str(database)) as conn:
        found = agents.signing_key(conn, creds.id, secret_key)
    return found is not None and not found.removed and found.key == derive_key(creds.secret)


# --- the simulator -----------------------------------------------------------------------

class Simulator(Process):
    """`python -m sim`: Ollama's API with deterministic tokens; `url` once started."""

    stop_timeout = 10.0
    url = ""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, emit_log: Path | None) -> None:
        super().__init__(name, argv, log_path)
        self.emit_log = emit_log

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def records(self) -> list[dict]:
        """What it emitted and when (`GET /sim/log`)."""
        response = requests.get(self.url + "/sim/log", timeout=5)
        response.raise_for_status()
        return response.json()


def start_simulator(workdir: Path, *args: str, emit_log: Path | None = None, name: str = "simulator",
                    timeout: float = START_TIMEOUT) -> Simulator:
    """The simulator on a free port (``args`` may name another), logging to ``workdir``; returns once it listens."""
    argv = [sys.executable, "-u", "-m", "sim", "--port", "0", *(["--emit-log", str(emit_log)] if emit_log else []),
            *args]
    sim = Simulator(name, argv, workdir / f"{name}.log", emit_log)
    sim.start(stdout_pipe=True)
    sim.url = sim.read_listening_url(timeout)
    return sim


# --- agents ------------------------------------------------------------------------------

class AgentProcess(Process):
    """`python -m agent` signing with ``creds``."""

    stop_timeout = AGENT_STOP_TIMEOUT

    def __init__(self, name: str, creds: AgentCredentials, env: Mapping[str, str], log_path: Path | None,
                 args: Sequence[str] = ()) -> None:
        super().__init__(name, [sys.executable, "-m", "agent", *args], log_path, env)
        self.creds = creds


def agent_environment(api_base: str, creds: AgentCredentials, ollama_url: str,
                      settings: Mapping[str, object] | None = None, *,
                      inherit_settings: bool = False) -> dict[str, str]:
    """An agent's environment: ours without any agent setting we carry (unless ``inherit_settings``: `make run`
    lets a developer's own MODELS or BATCH_MODE through), then server, credentials, Ollama and ``settings``."""
    env = dict(os.environ)
    if not inherit_settings:
        for name in {s.name for s in AGENT_SETTINGS} | {"OLLAMA_HOST"}:
            env.pop(name, None)
    env.update(API_BASE=api_base, AGENT_ID=creds.id, AGENT_SECRET=creds.secret, OLLAMA_URL=ollama_url)
    env.update({k: str(v) for k, v in (settings or {}).items()})
    return env


def wait_online(agent: AgentProcess, server: LiveServer, timeout: float = START_TIMEOUT) -> dict:
    """Wait until ``agent`` has polled ``server``; the server's row for it (its models, slots...)."""
    def online() -> dict | None:
        agent.check_alive()
        return agent_online(server.database, agent.creds.id)

    return wait_until(online, timeout, 0.05, f"the {agent.name} to poll {server.url}")


def launch_agent(server: LiveServer, ollama_url: str, log_path: Path | None, name: str = "agent", *,
                 api_base: str | None = None, args: Sequence[str] = (), wait: bool = True,
                 **settings: object) -> AgentProcess:
    """Register agent ``name`` on ``server`` and start it with ``settings`` (agent environment variables),
    talking to ``api_base`` (default: the server itself); unless ``wait=False``, return once it is online."""
    creds = server.add_agent(name)
    env = agent_environment(api_base or server.url, creds, ollama_url, settings)
    agent = AgentProcess(f"agent {name}", creds, env, log_path, args)
    agent.start()
    if wait:
        try:
            wait_online(agent, server)
        except BaseException:
            agent.kill()
            raise
    return agent
