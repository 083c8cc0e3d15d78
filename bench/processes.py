"""What only a benchmark adds to devtools/processes.py (the one process harness): access logs, delay proxies, CPU time.

Servers write an access log, from which agent requests are counted; CPU time is
read from /proc (utime + stime of a process and of its descendants).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from devtools import processes
from devtools.processes import AgentProcess, LiveServer, Process

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# What `bench.logs.AccessLog` reads: the request, its status and the client's port (one per connection).
ACCESS_LOG_FORMAT = "--access-logformat '%(m)s %(U)s %(s)s %({REMOTE_PORT}e)s'"
# Every benchmark agent serves the simulator's model and logs only trouble.
AGENT_SETTINGS = {"MODELS": "sim", "LOG_LEVEL": "WARNING"}


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


def access_log_path(workdir: Path, name: str) -> Path:
    return workdir / f"access-{name}.log"


def launch_server(workdir: Path, name: str, env: Mapping[str, str], database: str | None = None) -> LiveServer:
    """A server on its own fresh database (a SQLite file unless ``database`` names one), writing the access log;
    `wait_ready()` waits for it."""
    return LiveServer(database or workdir / f"{name}.db", workdir / f"server-{name}.log",
                      {"ORCH_LOG_LEVEL": "WARNING", "ORCH_ACCESS_LOG": str(access_log_path(workdir, name)),
                       "GUNICORN_CMD_ARGS": ACCESS_LOG_FORMAT, **env}, name=f"server {name}").launch()


def launch_bench_agent(workdir: Path, name: str, server: LiveServer, api_base: str, ollama_url: str,
                       settings: Mapping[str, str], args: Sequence[str] = ()) -> AgentProcess:
    """`python -m agent` registered on `server`, talking to it through `api_base`; not waited for
    (`devtools.processes.wait_online` does that)."""
    return processes.launch_agent(server, ollama_url, workdir / f"agent-{name}.log", name, api_base=api_base,
                                  args=args, wait=False, **{**AGENT_SETTINGS, **settings})


def launch_proxy(workdir: Path, name: str, target: str, rtt_ms: float) -> Process:
    """Start a delay proxy in front of `target` (a URL); `read_listening_url()` waits for it."""
    process = Process(f"proxy {name}", [sys.executable, "-u", "-m", "bench.proxy", "--target",
                                        target.split("://", 1)[1], "--rtt-ms", f"{rtt_ms:g}"],
                      workdir / f"proxy-{name}.log")
    return process.start(stdout_pipe=True)
