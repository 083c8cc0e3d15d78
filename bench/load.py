"""`python -m bench.load` (`make bench-load`): one gevent worker holding thousands of idle agents while chats stream.

By default 2,000 registered agents park signed long polls (`wait=30`, re-polling
at once) from one gevent process, while 100 chats stream from the Ollama
simulator at 50 tokens/s each for 60 s, served by a few real agents
(`python -m agent`). The idle agents declare a model no chat asks for, so they
are never handed a job: one that is counts as an error. Reports the
connections the server's worker holds, its memory, the added latency per token
(the simulator's write to the client's read), errors and tokens lost; writes
bench/results/load-<date>.json; exits 1 if any chat failed, any token was lost
or duplicated, or any idle poll failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench import scaling
from bench.client import Trace, stream_chat
from bench.logs import EmissionLog
from bench.metrics import ChatResult, measure_chat, percentile
from bench.processes import cpu_seconds, launch_bench_agent, launch_server
from bench.workload import Profile
from devtools.processes import (
    ROOT,
    AgentProcess,
    HarnessError,
    LiveServer,
    Process,
    Simulator,
    register_agents,
    start_simulator,
    wait_online,
    wait_until,
)
from protocol.wire import POLL_PATH

IDLE_MODEL = "idle-never-asked"
DEFAULT_OUT = ROOT / "bench" / "results"
FD_MARGIN = 1024                 # beyond one descriptor per connection: logs, databases, pipes


# --- the idle fleet (a subprocess: `python -m bench.load idle-fleet ...`) ------------------------

def idle_fleet(url: str, creds_file: Path, wait: float, spread: float) -> None:
    """Every agent in `creds_file` long-polls forever on one keep-alive connection; a JSON status line a second."""
    import gevent
    from gevent import socket

    from protocol.signing import signed_headers

    host, port = urlsplit(url).hostname, urlsplit(url).port
    path = f"{POLL_PATH}?models={IDLE_MODEL}&wait={wait:g}"
    stats = {"in_flight": 0, "polls": 0, "errors": 0, "jobs": 0, "last_error": None}

    def fail(message: str) -> None:
        stats["errors"] += 1
        stats["last_error"] = message

    def agent(agent_id: str, secret: str) -> None:
        conn = reader = None
        while True:
            try:
                if conn is None:
                    conn = socket.create_connection((host, port), timeout=wait + 30)
                    reader = conn.makefile("rb")
                headers = signed_headers(agent_id, secret, "GET", path, b"", int(time.time()))
                head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                conn.sendall((head + "\r\n").encode())
                stats["in_flight"] += 1
                try:
                    status, closing = _read_response(reader)
                finally:
                    stats["in_flight"] -= 1
                if status == 204:
                    stats["polls"] += 1
                else:
                    stats["jobs" if status == 200 else "errors"] += 1
                    stats["last_error"] = f"HTTP {status}"
                    gevent.sleep(1)
                if closing:
                    conn.close()
                    conn = None
            except OSError as exc:
                fail(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                gevent.sleep(1)

    creds = json.loads(creds_file.read_text())
    for i, (agent_id, secret) in enumerate(creds):
        gevent.spawn_later(spread * i / max(1, len(creds)), agent, agent_id, secret)
    while True:
        print(json.dumps(stats), flush=True)
        gevent.sleep(1)


def _read_response(reader) -> tuple[int, bool]:
    """Status and whether the server closes the connection; the body (Content-Length only) is read and dropped."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    length, closing = 0, False
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "connection":
            closing = value.strip().lower() == "close"
    reader.read(length)
    return status, closing


class FleetMonitor:
    """Reads the fleet's status lines in a thread; `latest` is the last one."""

    def __init__(self, process: Process) -> None:
        self.latest: dict = {"in_flight": 0, "polls": 0, "errors": 0, "jobs": 0, "last_error": None}
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: Process) -> None:
        for line in process.proc.stdout:
            self.latest = json.loads(line)


# --- the server's side -------------------------------------------------------------------------

def worker_pid(arbiter: int, timeout: float = 30.0) -> int:
    """The gunicorn worker: the arbiter's child."""
    def child() -> int | None:
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if entry.isdigit() and int(f.read().rsplit(b")", 1)[1].split()[1]) == arbiter:
                        return int(entry)
            except (OSError, ValueError, IndexError):
                continue
        return None
    return wait_until(child, timeout, message="the gunicorn worker")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def open_sockets(pid: int) -> int:
    """Sockets the process holds (its listening socket included)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


@dataclass
class Samples:
    """The worker's memory and sockets, and the fleet's parked polls, once a second."""

    rss_mb: list[float] = field(default_factory=list)
    sockets: list[int] = field(default_factory=list)
    parked: list[int] = field(default_factory=list)


def sample(pid: int, fleet: FleetMonitor, samples: Samples, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        samples.rss_mb.append(rss_mb(pid))
        samples.sockets.append(open_sockets(pid))
        samples.parked.append(fleet.latest["in_flight"])


def register_idle_agents(db_path: Path, count: int, creds_file: Path) -> None:
    creds = register_agents(db_path, [f"idle-{i:05d}" for i in range(count)])
    creds_file.write_text(json.dumps([[c.id, c.secret] for c in creds]))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise this process's (and so its children's) open-file limit towards `needed`; the new soft, hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- one run -----------------------------------------------------------------------------------

@dataclass
class Stack:
    """The run's processes, started in order (stopped in reverse)."""

    started: list[Process] = field(default_factory=list)
    sim: Simulator | None = None
    sim_url: str = ""
    server: LiveServer | None = None
    worker: int = 0                         # the gunicorn worker's pid
    fleet: Process | None = None
    fleet_status: FleetMonitor | None = None
    agents: list[AgentProcess] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()


def start_stack(args: argparse.Namespace, workdir: Path, stack: Stack) -> dict:
    """Simulator, server, the parked idle fleet and the serving agents; the worker's state before and after the fleet."""
    stack.sim = start_simulator(workdir, "--models", "sim", emit_log=workdir / "emissions.jsonl")
    stack.sim_url = stack.sim.url
    stack.started.append(stack.sim)
    # No access log: 2,000 idle polls and thousands of POSTs a second would be written for nothing.
    server = stack.server = launch_server(workdir, "load", {"ORCH_ACCESS_LOG": ""})
    stack.started.append(server)
    server.wait_ready()
    pid = stack.worker = worker_pid(server.pid)
    bare = {"rss_mb": rss_mb(pid), "sockets": open_sockets(pid)}

    creds_file = workdir / "idle-agents.json"
    register_idle_agents(server.database, args.idle_agents, creds_file)
    # First polls spread over one `wait`, as independent agents' would be: no herd re-polling at once.
    fleet = stack.fleet = Process("idle fleet", [sys.executable, "-m", "bench.load", "idle-fleet", "--url", server.url,
                                   "--creds", str(creds_file), "--wait", str(args.wait), "--spread", str(args.wait)],
                    workdir / "fleet.log")
    stack.started.append(fleet.start(stdout_pipe=True))
    monitor = stack.fleet_status = FleetMonitor(fleet)
    wait_until(lambda: fleet.check_alive() or monitor.latest["in_flight"] >= args.idle_agents, args.wait + 120,
               message=f"{args.idle_agents} parked long polls")
    idle = {"rss_mb": rss_mb(pid), "sockets": open_sockets(pid), "parked": monitor.latest["in_flight"]}

    settings = {"MAX_JOBS": str(math.ceil(args.chats / args.agents)), "LONG_POLL": "25", **dict(args.agent_env)}
    for i in range(args.agents):
        stack.agents.append(launch_bench_agent(workdir, f"gpu-{i}", server, server.url, stack.sim_url, settings))
        stack.started.append(stack.agents[-1])
    for agent in stack.agents:
        wait_online(agent, server)
    return {"server_bare": bare, "server_with_idle_fleet": idle}


def stream_chats(args: argparse.Namespace, stack: Stack, tags: list[str]) -> tuple[dict[str, Trace], dict]:
    """All chats at once, read to their end; their traces, and what the run cost meanwhile."""
    profile = Profile("load", args.first_token_ms, 1000 / args.tokens_per_second,
                      int(args.tokens_per_second * args.seconds), "load")
    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample, args=(stack.worker, stack.fleet_status, samples, stop), daemon=True)
    sampler.start()
    roles = {"server": [stack.server.pid], "agents": [a.pid for a in stack.agents],
             "simulator": [stack.sim.pid], "idle fleet": [stack.fleet.pid]}

    def cpu_now() -> dict[str, float]:
        return {role: cpu_seconds(pids) for role, pids in roles.items()} | {"chat clients": _own_cpu()}

    cpu_before = cpu_now()
    traces: dict[str, Trace] = {}

    def chat(tag: str) -> None:
        traces[tag] = stream_chat(stack.server.url, profile.chat(tag), timeout=args.seconds + 120)

    chatting = [threading.Thread(target=chat, args=(tag,), daemon=True) for tag in tags]
    started = time.monotonic()
    for thread in chatting:
        thread.start()
    for thread in chatting:
        thread.join(args.seconds + 180)
    elapsed = time.monotonic() - started
    cpu = {role: seconds - cpu_before[role] for role, seconds in cpu_now().items()}
    stop.set()
    sampler.join(5)
    return traces, {
        "during_chats": {"sockets_max": max(samples.sockets, default=None),
                         "sockets_min": min(samples.sockets, default=None),
                         "parked_min": min(samples.parked, default=None),
                         "rss_mb_max": max(samples.rss_mb, default=None)},
        "chat_seconds": round(elapsed, 1), "cpu_s": {role: round(v, 1) for role, v in cpu.items()},
        "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 1),
        "idle_fleet": dict(stack.fleet_status.latest),
    }


def measure(tags: list[str], traces: dict[str, Trace], emit_log: Path) -> dict:
    """Per-token added latency, losses and failures, against the simulator's emission log."""
    emissions = EmissionLog(emit_log)
    attempts = {tag: completed_attempt(emissions.records(tag)) for tag in tags}
    results = [measure_chat(ChatResult("load", "loopback", "concurrent", 0, tag), traces[tag], attempts[tag][0])
               if tag in traces else ChatResult("load", "loopback", "concurrent", 0, tag, error="no trace")
               for tag in tags]
    added = [a for r in results for a in r.added_ms]
    return {
        "tokens": sum(r.delivered for r in results), "expected_tokens": sum(r.expected for r in results),
        "added_ms": {"p50": percentile(added, 50), "p99": percentile(added, 99), "max": max(added, default=None)},
        "ttft_ms_p50": percentile([r.ttft_ms for r in results if r.ttft_ms is not None], 50),
        "failed_chats": [{"tag": r.tag, "error": r.error} for r in results if r.error],
        "lost": sum(r.lost for r in results), "duplicated": sum(r.duplicated for r in results),
        "jobs_started_again": sum(extra for _, extra in attempts.values()),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict:
    limit = raise_fd_limit(args.idle_agents * 2 + args.chats * 4 + FD_MARGIN)
    tags = [f"load-{i:03d}" for i in range(args.chats)]
    stack = Stack()
    try:
        figures = start_stack(args, workdir, stack)
        traces, costs = stream_chats(args, stack, tags)
    finally:
        stack.stop()
    tracebacks = stack.server.log_path.read_text(errors="replace").count("Traceback")
    return {"fd_limit": list(limit), **figures, **costs, "server_tracebacks": tracebacks,
            **measure(tags, traces, workdir / "emissions.jsonl")}


def completed_attempt(records: list[dict]) -> tuple[list[dict], int]:
    """The simulator records of the attempt that finished, and how many other attempts the chat's job had.

    A job whose delivery lease ran out before its agent's first POST is handed
    out again: the simulator then saw two requests with the chat's tag, and
    the abandoned one's records would garble the expected text.
    """
    finished = {r["req"] for r in records if r["event"] == "done"}
    started = {r["req"] for r in records if r["event"] == "start"}
    if len(finished) != 1:
        return records, max(0, len(started) - 1)
    return [r for r in records if r["req"] in finished], len(started) - 1


def markdown(figures: dict, args: argparse.Namespace) -> str:
    idle, bare, during = figures["server_with_idle_fleet"], figures["server_bare"], figures["during_chats"]
    per_conn_kb = (idle["rss_mb"] - bare["rss_mb"]) * 1024 / max(1, idle["parked"])
    fleet = figures["idle_fleet"]
    errors = len(figures["failed_chats"]) + fleet["errors"] + fleet["jobs"]
    rows = [
        ("idle agents parked (long polls held)", f"{idle['parked']:,} of {args.idle_agents:,}"),
        ("worker sockets: idle fleet / during chats (min-max)",
         f"{idle['sockets']:,} / {during['sockets_min']:,}-{during['sockets_max']:,}"),
        ("worker RSS: bare / idle fleet / peak during chats",
         f"{bare['rss_mb']:.0f} / {idle['rss_mb']:.0f} / {during['rss_mb_max']:.0f} MB "
         f"(~{per_conn_kb:.0f} KB per parked poll)"),
        ("chats", f"{args.chats} x {args.tokens_per_second:g} tok/s x {args.seconds:g} s over {args.agents} agents"),
        ("tokens delivered / emitted", f"{figures['tokens']:,} / {figures['expected_tokens']:,}"),
        ("added latency per token p50 / p99 / max",
         " / ".join(f"{figures['added_ms'][k]:.1f}" if figures['added_ms'][k] is not None else "-"
                    for k in ("p50", "p99", "max")) + " ms"),
        ("first token p50", f"{figures['ttft_ms_p50']:.0f} ms" if figures["ttft_ms_p50"] is not None else "-"),
        ("CPU seconds during the chats", f"{figures['chat_seconds']:.0f} s x {figures['cores']} cores: "
         + ", ".join(f"{role} {v:.0f}" for role, v in figures["cpu_s"].items())
         + f" (load average {figures['load_average_1min']:g})"),
        ("tracebacks in the server's log", str(figures["server_tracebacks"])),
        ("errors (failed chats + failed idle polls + jobs given to idle agents)",
         f"{errors} ({len(figures['failed_chats'])} + {fleet['errors']} + {fleet['jobs']})"),
        ("tokens lost / duplicated", f"{figures['lost']} / {figures['duplicated']}"),
        ("jobs started again (delivery lease ran out before the agent's first POST)",
         str(figures["jobs_started_again"])),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--idle-agents", type=int, default=2000, help="registered agents parking long polls (default: %(default)s)")
    add("--chats", type=int, default=100, help="chats streaming at once (default: %(default)s)")
    add("--tokens-per-second", type=float, default=50.0, help="per chat (default: %(default)s)")
    add("--seconds", type=float, default=60.0, help="how long each chat streams (default: %(default)s)")
    add("--first-token-ms", type=float, default=200.0, help="the simulator's first-token time (default: %(default)s)")
    add("--agents", type=int, default=4, help="real agents serving the chats (default: %(default)s)")
    add("--wait", type=float, default=30.0, help="the idle agents' long-poll wait, s (default: %(default)s)")
    add("--agent-env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)), metavar="KEY=VALUE",
        help="an agent setting for the serving agents, e.g. BATCH_MODE=fixed; repeatable")
    add("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON (default: bench/results)")
    add("--keep", action="store_true", help="keep the work directory (databases, logs) even on success")
    from bench.hostile import SCENARIOS  # here: bench.hostile imports this module

    add("--scenario", choices=("all", "idle", "scaling", *SCENARIOS), default="all",
        help="idle: the parked fleet and streaming chats above; scaling: bench/scaling.py's table (engines, "
        "workers, hosts); all: both (default); " + ", ".join(SCENARIOS) + ": bench/hostile.py's scenarios")
    scaling.add_arguments(parser.add_argument_group("scaling (python -m bench.scaling)"))
    args = parser.parse_args(argv)
    if args.engine or args.workers or args.hosts:
        args.scenario = "scaling"          # naming a setup asks for the scaling table
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["idle-fleet"]:
        fleet = argparse.ArgumentParser(prog="python -m bench.load idle-fleet")
        fleet.add_argument("--url", required=True)
        fleet.add_argument("--creds", type=Path, required=True)
        fleet.add_argument("--wait", type=float, default=30.0)
        fleet.add_argument("--spread", type=float, default=5.0, help="seconds over which the agents connect")
        options = fleet.parse_args(argv[1:])
        idle_fleet(options.url, options.creds, options.wait, options.spread)
        return 0
    args = parse_args(argv)
    if args.scenario not in ("all", "idle", "scaling"):
        from bench import hostile

        return hostile.main(["--scenario", args.scenario, "--out", str(args.out)])
    status = run_idle(args) if args.scenario in ("idle", "all") else 0
    if args.scenario in ("scaling", "all"):
        status = max(status, run_scaling(args))
    return status


def run_scaling(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-scaling-"))
    results = scaling.run(args, workdir)
    print(scaling.markdown(results))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    bad = any(r["lost"] or r["duplicated"] for rows in results.values() for r in rows)
    print(f"bench.load: wrote {out}" + ("; FAILED: tokens lost or duplicated" if bad else ""), file=sys.stderr)
    if not bad:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


def run_idle(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-load-"))
    try:
        figures = run(args, workdir)
    except (HarnessError, sqlite3.Error) as exc:
        print(f"bench.load: {exc}\nbench.load: logs kept in {workdir}", file=sys.stderr)
        return 2
    print(markdown(figures, args))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))
    fleet = figures["idle_fleet"]
    failed = figures["failed_chats"] or figures["lost"] or figures["duplicated"] or fleet["errors"] or fleet["jobs"]
    print(f"bench.load: wrote {out}" + (f"; FAILED, logs kept in {workdir}" if failed else ""), file=sys.stderr)
    if not failed and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
