"""The processes a benchmark run starts: the Ollama simulator, gunicorn servers, delay proxies, agents.

Every process is a real subprocess started the way the README starts it, logs
to a file under the run's directory, and is stopped by its own process group.
CPU time is read from /proc (utime + stime of the process and its children).
Servers also write an access log, from which agent requests are counted.
"""
from __future__ import annotations

import http.client
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
# What `bench.logs.AccessLog` reads: the request, its status and the client's port (one per connection).
ACCESS_LOG_FORMAT = "--access-logformat '%(m)s %(U)s %(s)s %({REMOTE_PORT}e)s'"


class StartError(RuntimeError):
    """A process did not come up; the message ends with the tail of its log."""


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `condition` until it is truthy; StartError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StartError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of `pids` and of every live descendant of theirs."""
    total = 0
    for pid in _with_descendants(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited between the listing and the read
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


def _with_descendants(pids: Sequence[int]) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


@dataclass
class Process:
    """One subprocess in its own process group, logging to `log_path`."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    agent_id: str | None = None  # for agents: the id they were registered with

    def start(self, *, stdout_pipe: bool = False) -> Process:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_pipe else self._log,
                                     stderr=self._log, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StartError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def read_listening_url(self, timeout: float = START_TIMEOUT) -> str:
        """The URL in the `... listening on URL` line the process prints on stdout when ready."""
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if "listening on " in line:
                return line.rsplit("listening on ", 1)[1].strip()
        self.stop()
        raise StartError(f"{self.name} did not print its address:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def start_simulator(workdir: Path, emit_log: Path) -> tuple[Process, str]:
    """The Ollama simulator with its emission log; every request sets its own timing in `options`."""
    process = Process("simulator", [sys.executable, "-u", "-m", "sim", "--port", "0",
                                    "--models", "sim", "--emit-log", str(emit_log)], workdir / "simulator.log")
    process.start(stdout_pipe=True)
    return process, process.read_listening_url()


def launch_proxy(workdir: Path, name: str, target: str, rtt_ms: float) -> Process:
    """Start a delay proxy in front of `target` (a URL); `read_listening_url()` waits for it."""
    process = Process(f"proxy {name}", [sys.executable, "-u", "-m", "bench.proxy", "--target",
                                        target.split("://", 1)[1], "--rtt-ms", f"{rtt_ms:g}"],
                      workdir / f"proxy-{name}.log")
    return process.start(stdout_pipe=True)


@dataclass
class Server:
    """gunicorn with the gevent worker on its own SQLite file, as `orchestrator serve` runs it."""

    process: Process
    port: int
    db_path: Path
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Server:
        wait_until(self._answers, timeout, f"{self.process.name} on port {self.port}")
        return self

    def add_agent(self, name: str) -> tuple[str, str]:
        """Register an agent in this server's database; returns its id and secret."""
        from server.agents import add_agent
        from server.db import connect

        conn = connect(str(self.db_path))
        try:
            creds = add_agent(conn, name)
        finally:
            conn.conn.close()
        return creds.id, creds.secret

    def agent_seen(self, agent_id: str) -> bool:
        """True once the agent has polled (the server refuses chats for models no online agent serves)."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT last_seen FROM agents WHERE id = ?", (agent_id,)).fetchone()
        return bool(row and row[0])

    def _answers(self) -> bool:
        self.process.check_alive()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/api/v1/__ping__")
            return conn.getresponse().status == 404
        except OSError:
            return False
        finally:
            conn.close()


def launch_server(workdir: Path, name: str, env: dict[str, str]) -> Server:
    """Migrate a fresh database and start gunicorn on a free port; `wait_ready()` waits for it."""
    from server.db import connect
    from server.migrations import migrate

    db_path = workdir / f"{name}.db"
    conn = connect(str(db_path))
    try:
        migrate(conn)
    finally:
        conn.conn.close()
    port = _free_port()
    access_log = workdir / f"access-{name}.log"
    process = Process(f"server {name}", [sys.executable, "-m", "gunicorn", "-c", "python:server.gunicorn_conf",
                                         "server.wsgi:app"], workdir / f"server-{name}.log",
                      {"ORCH_DATABASE": str(db_path), "ORCH_BIND": f"127.0.0.1:{port}", "ORCH_LOG_LEVEL": "WARNING",
                       "ORCH_ACCESS_LOG": str(access_log), "GUNICORN_CMD_ARGS": ACCESS_LOG_FORMAT, **env})
    process.start()
    return Server(process, port, db_path, access_log)


def launch_agent(workdir: Path, name: str, server: Server, api_base: str, ollama_url: str,
                 env: dict[str, str], args: Sequence[str] = ()) -> Process:
    """`python -m agent` registered on `server`, talking to it through `api_base`; see `wait_polled`."""
    agent_id, secret = server.add_agent(name)
    process = Process(f"agent {name}", [sys.executable, "-m", "agent", *args], workdir / f"agent-{name}.log",
                      {"API_BASE": api_base, "AGENT_ID": agent_id, "AGENT_SECRET": secret,
                       "OLLAMA_URL": ollama_url, "MODELS": "sim", "LOG_LEVEL": "WARNING", **env},
                      agent_id=agent_id)
    return process.start()


def wait_polled(agent: Process, server: Server, timeout: float = START_TIMEOUT) -> None:
    """Wait until `agent` has polled `server` once: only then does the server accept chats for its models."""
    def polled() -> bool:
        agent.check_alive()
        return server.agent_seen(agent.agent_id)

    wait_until(polled, timeout, f"{agent.name} to poll", interval=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
