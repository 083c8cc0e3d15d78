"""`make run`: the server, the Ollama simulator and one local agent, until Ctrl-C.

With `OLLAMA_URL` set, the agent uses that Ollama and no simulator starts.
Arguments this script does not know go to the agent (`make run ARGS=--legacy`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from server import agents, migrations
from server.db import connect

STARTUP_DEADLINE = 30.0
STOP_DEADLINE = 40.0  # the agent's own SHUTDOWN_TIMEOUT (30 s) plus room to post
PROMPT = {"model": "", "messages": [{"role": "user", "content": "Hello"}]}


class Stop(Exception):
    """SIGTERM or Ctrl-C: stop everything."""


class DevrunError(Exception):
    """Something failed to start; the message says what and where its log is."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_DEADLINE) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the whole group (gunicorn's worker too)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            where = f" (log: {self.log_path})" if self.log_path else ""
            raise DevrunError(f"the {self.name} exited with status {self.proc.returncode}{where}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m devtools.devrun", description=__doc__.splitlines()[0],
                                epilog="Other arguments are passed to the agent, e.g. --legacy or --batch-mode adaptive.")
    p.add_argument("--port", type=int, default=8000, help="the server's port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="the server's address (default: %(default)s)")
    p.add_argument("--var", default="var", help="directory for the database and logs (default: %(default)s)")
    return p.parse_known_args(argv)


def local_agent(db_path: Path, creds_path: Path) -> agents.AgentCredentials:
    """The agent `local`: registered once, its credentials kept in `creds_path` for the next run."""
    conn = connect(str(db_path))
    try:
        migrations.migrate(conn)
        if creds_path.exists():
            saved = agents.AgentCredentials(**json.loads(creds_path.read_text()))
            if agents.secret_for(conn, saved.id) == saved.secret:
                return saved
        creds = agents.add_agent(conn, "local")
    finally:
        conn.conn.close()
    creds_path.write_text(json.dumps({"id": creds.id, "secret": creds.secret}))
    creds_path.chmod(0o600)
    return creds


def spawn(name: str, command: list[str], log_path: Path) -> Child:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # Ctrl-C reaches us; we stop the children in order
    return Child(name, proc, log_path)


def start_server(args: argparse.Namespace, db_path: Path, var: Path) -> tuple[Child, str]:
    url = f"http://{args.host}:{args.port}"
    server = spawn("server", [sys.executable, "-m", "server", "serve", "--db", str(db_path),
                              "--host", args.host, "--port", str(args.port)], var / "devrun-server.log")
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            requests.get(url + "/api/v1/__ping__", timeout=1)
            return server, url
        except requests.RequestException:
            time.sleep(0.1)
    raise DevrunError(f"the server did not answer on {url} (log: {server.log_path})")


def start_simulator(var: Path) -> tuple[Child, str]:
    log_path = var / "devrun-simulator.log"
    log_path.write_bytes(b"")
    sim = spawn("simulator", [sys.executable, "-u", "-m", "sim", "--port", "0"], log_path)
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:  # its first line names the port it got
        for line in log_path.read_text(errors="replace").splitlines():
            if "listening on " in line:
                return sim, line.rsplit("listening on ", 1)[1].strip()
        sim.check_alive()
        time.sleep(0.05)
    raise DevrunError(f"the simulator did not start (log: {log_path})")


def start_agent(agent_args: list[str], creds: agents.AgentCredentials, api_base: str, ollama_url: str) -> Child:
    env = dict(os.environ, API_BASE=api_base, AGENT_ID=creds.id, AGENT_SECRET=creds.secret, OLLAMA_URL=ollama_url,
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "agent", *agent_args], env=env, start_new_session=True)
    return Child("agent", proc)  # its log lines go to this terminal


def wait_online(agent: Child, db_path: Path, agent_id: str) -> list[str]:
    """The agent's declared models once the server counts it online."""
    conn = connect(str(db_path))
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:
            agent.check_alive()
            for row in agents.online(conn, time.time(), STARTUP_DEADLINE):
                if row["id"] == agent_id:
                    return row["models"]
            time.sleep(0.1)
    finally:
        conn.conn.close()
    raise DevrunError("the agent did not come online (see its log above)")


def curl_line(api_base: str, model: str) -> str:
    body = json.dumps({**PROMPT, "model": model}, separators=(",", ":"))
    auth = ""
    keys = [k for k in os.environ.get("ORCH_API_KEYS", "").split(",") if k.strip()]
    if keys:
        auth = f" -H {shlex.quote('Authorization: Bearer ' + keys[0].strip())}"
    return (f"curl -N {api_base}/api/v1/chat/stream -H 'Content-Type: application/json'{auth}"
            f" -d {shlex.quote(body)}")


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop


def main(argv: Sequence[str] | None = None) -> int:
    args, agent_args = parse_args(argv)
    var = Path(args.var)
    var.mkdir(parents=True, exist_ok=True)
    db_path = var / "devrun.db"
    creds = local_agent(db_path, var / "devrun-agent.json")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    children: list[Child] = []
    try:
        server, api_base = start_server(args, db_path, var)
        children.append(server)
        ollama_url = os.environ.get("OLLAMA_URL")
        if not ollama_url:
            simulator, ollama_url = start_simulator(var)
            children.append(simulator)
        agent = start_agent(agent_args, creds, api_base, ollama_url)
        children.append(agent)
        models = wait_online(agent, db_path, creds.id)
        model = "sim" if "sim" in models else next((m for m in models if not m.endswith(":latest")), "llama3")
        print(f"\nserver {api_base} (log: {server.log_path}), Ollama {ollama_url}, agent {creds.id}\n"
              f"Stream an answer:\n\n{curl_line(api_base, model)}\n\nCtrl-C stops all three.", flush=True)
        while True:
            for child in children:
                child.check_alive()
            time.sleep(0.5)
    except Stop:
        return 0
    except DevrunError as exc:
        print(f"devrun: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)


def stop_all(children: list[Child]) -> None:
    """The agent first (it finishes its jobs while the server is up), then the simulator, then the server."""
    remaining = list(reversed(children))
    try:
        while remaining:
            remaining[0].stop()
            remaining.pop(0)
    except Stop:  # a second Ctrl-C: no more waiting
        for child in remaining:
            child.stop(signal.SIGKILL, 5)


if __name__ == "__main__":
    sys.exit(main())
