"""A running stack for end-to-end suites, and what it stored."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.processes import LiveServer, launch_agent, start_simulator
from server.storage import migrated


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


def stored_rows(database: str | Path) -> dict[str, list]:
    """Every row the server keeps (jobs, chunks, agents): nothing may change for a refused request."""
    with migrated(str(database)) as conn:
        return {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("jobs", "chunks", "agents")}
