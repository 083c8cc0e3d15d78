"""`make run`: the server, the Ollama simulator and one local agent, until Ctrl-C.

The database is the server's default, var/orchestrator.db, so `orchestrator agents list` run from the
repository's root sees make run's agent. With `OLLAMA_URL` set, the agent uses that Ollama and no
simulator starts. The agent gets MAX_JOBS=4 unless the environment sets it: clients such as Open WebUI
send side requests (a title, tags) with every chat, which must not queue the chat behind them.
Arguments this script does not know go to the agent (`make run ARGS=--legacy`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devtools.processes import (
    AgentCredentials,
    AgentProcess,
    HarnessError,
    LiveServer,
    Process,
    agent_environment,
    agent_registered,
    register_agents,
    start_simulator,
    wait_online,
)
from server.config import DEFAULTS as SERVER_DEFAULTS

PROMPT = {"model": "", "messages": [{"role": "user", "content": "Hello"}]}
# The server's own default (ORCH_DATABASE): one database for make run and the CLI.
DATABASE = Path(SERVER_DEFAULTS["DATABASE"])
# Slots of the local agent unless MAX_JOBS is set: a chat plus a client's side requests at once.
DEFAULT_MAX_JOBS = 4


class Stop(Exception):
    """SIGTERM or Ctrl-C: stop everything."""


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m devtools.devrun", description=__doc__.splitlines()[0],
                                epilog="Other arguments are passed to the agent, e.g. --legacy or --batch-mode fixed.")
    p.add_argument("--port", type=int, default=8000, help="the server's port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="the server's address (default: %(default)s)")
    p.add_argument("--var", default=str(DATABASE.parent),
                   help=f"directory for the database ({DATABASE.name}) and logs (default: %(default)s)")
    return p.parse_known_args(argv)


def local_agent(db_path: Path, creds_path: Path) -> AgentCredentials:
    """The agent `local`: registered once, its credentials kept in `creds_path` for the next run."""
    if creds_path.exists():
        saved = AgentCredentials(**json.loads(creds_path.read_text()))
        if agent_registered(db_path, saved):
            return saved
    creds = register_agents(db_path, ["local"])[0]
    creds_path.write_text(json.dumps({"id": creds.id, "secret": creds.secret}))
    creds_path.chmod(0o600)
    return creds


def curl_line(api_base: str, model: str) -> str:
    body = json.dumps({**PROMPT, "model": model}, separators=(",", ":"))
    auth = ""
    keys = [k for k in os.environ.get("ORCH_API_KEYS", "").split(",") if k.strip()]
    if keys:
        auth = f" -H {shlex.quote('Authorization: Bearer ' + keys[0].strip())}"
    return (f"curl -N {api_base}/api/v1/chat/stream -H 'Content-Type: application/json'{auth}"
            f" -d {shlex.quote(body)}")


def inspect_line(db_path: Path) -> str:
    """The CLI line that lists this database's agents (without --db when it is the CLI's default from here)."""
    script = Path(sys.executable).parent / "orchestrator"
    command = f"{shlex.quote(_from_here(script))} agents list" if script.exists() else "python -m server agents list"
    shown = _from_here(db_path)
    if shown == str(DATABASE) and not os.environ.get("ORCH_DATABASE"):
        return command
    return f"{command} --db {shlex.quote(shown)}"


def _from_here(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop


def main(argv: Sequence[str] | None = None) -> int:
    args, agent_args = parse_args(argv)
    var = Path(args.var).resolve()  # the children run from the repository's root
    var.mkdir(parents=True, exist_ok=True)
    db_path = var / DATABASE.name
    creds = local_agent(db_path, var / "devrun-agent.json")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    children: list[Process] = []
    try:
        server = LiveServer(db_path, var / "devrun-server.log", port=args.port, host=args.host).launch()
        children.append(server)
        server.wait_ready()
        ollama_url = os.environ.get("OLLAMA_URL")
        if not ollama_url:
            simulator = start_simulator(var, name="devrun-simulator")
            children.append(simulator)
            ollama_url = simulator.url
        # The developer's own agent settings (MODELS, BATCH_MODE...) apply; its log lines go to this terminal.
        env = agent_environment(server.url, creds, ollama_url, inherit_settings=True)
        env.setdefault("MAX_JOBS", str(DEFAULT_MAX_JOBS))
        agent = AgentProcess("agent", creds, env, None, agent_args)
        children.append(agent.start())
        models = wait_online(agent, server)["models"]
        model = "sim" if "sim" in models else next((m for m in models if not m.endswith(":latest")), "llama3")
        print(f"\nserver {server.url} (log: {server.log_path}), Ollama {ollama_url}, agent {creds.id} "
              f"with {env['MAX_JOBS']} slots, database {db_path}\n"
              f"Stream an answer:\n\n{curl_line(server.url, model)}\n\n"
              f"Inspect the agents: {inspect_line(db_path)}\n"
              "Ctrl-C stops all three.", flush=True)
        while True:
            for child in children:
                child.check_alive()
            time.sleep(0.5)
    except Stop:
        return 0
    except HarnessError as exc:
        print(f"devrun: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)


def stop_all(children: list[Process]) -> None:
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
