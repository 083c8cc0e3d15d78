"""How the server scales: SQLite and PostgreSQL, one worker or two, one host or two behind nginx.

At rising concurrency (25, 50, 100, ... chats at once) until the per-token p99
passes 500 ms, a light load generator (`python -m bench.scaling generate`, one
gevent process) plays both sides: fake agents that long-poll and post
pre-built batches of tokens at a fixed rate, and users that read each chat's
SSE stream.  Only the server is real, so it is what gets measured: tokens/s
delivered, per-token latency (agent's POST sent -> user's read), first-token
latency (chat sent -> first token read), and CPU per delivered token of the
server processes and of PostgreSQL, counted apart from the generator.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.metrics import percentile
from bench.processes import cpu_seconds
from devtools.nginx import Nginx
from devtools.postgres import Cluster
from devtools.processes import LiveServer, Process, register_agents

MODEL = "load"
DEFAULT_LEVELS = (25, 50, 100, 200, 400)
P99_LIMIT_MS = 500.0


@dataclass(frozen=True)
class Setup:
    """One row group of the table: an engine, workers per host, hosts, and where agents and users connect."""

    name: str
    engine: str = "sqlite"
    workers: int = 1
    hosts: int = 1
    route: str = "same"            # same: everyone on host 1; nginx: everyone through nginx; cross: agents on
                                   # host 2, users on host 1 (what a stream and its agent on two hosts cost)
    transport: str = "http"        # how the fake agents talk: polls and POSTs, or a WebSocket each


MATRIX = (
    Setup("sqlite, 1 worker"),
    Setup("sqlite, 1 worker, ws agents", transport="ws"),
    Setup("postgres, 1 worker", "postgres"),
    Setup("postgres, 2 workers", "postgres", workers=2),
    Setup("postgres, 2 hosts via nginx", "postgres", hosts=2, route="nginx"),
    Setup("postgres, 2 hosts, agent and user apart", "postgres", hosts=2, route="cross"),
)


@dataclass
class Level:
    chats: int
    tokens: int = 0
    seconds: float = 0.0
    added_ms: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    database_cpu: float = 0.0
    lost: int = 0
    duplicated: int = 0
    errors: int = 0

    def row(self) -> dict:
        per = 1000.0 / self.tokens if self.tokens else 0.0
        return {"chats": self.chats, "tokens_per_s": round(self.tokens / self.seconds) if self.seconds else 0,
                "added_p50_ms": _round(percentile(self.added_ms, 50)), "added_p99_ms": _round(percentile(self.added_ms, 99)),
                "first_token_p50_ms": _round(percentile(self.first_token_ms, 50)),
                "server_cpu_ms_per_token": round(self.server_cpu * per, 3),
                "database_cpu_ms_per_token": round(self.database_cpu * per, 3),
                "lost": self.lost, "duplicated": self.duplicated, "errors": self.errors}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Stack:
    """The servers (and PostgreSQL, and nginx) of one setup."""

    def __init__(self, setup: Setup, workdir: Path) -> None:
        self.setup, self.workdir = setup, workdir
        self.cluster: Cluster | None = None
        self.hosts: list[LiveServer] = []
        self.front: Nginx | None = None

    def start(self) -> Stack:
        database = str(self.workdir / "scaling.db")
        if self.setup.engine == "postgres":
            self.cluster = Cluster.create()
            database = self.cluster.create_database()
        env = {"ORCH_WORKERS": str(self.setup.workers), "ORCH_LOG_LEVEL": "WARNING", "ORCH_ACCESS_LOG": "",
               "ORCH_QUEUE_TIMEOUT": "600",
               # Every user is the generator's one address: the per-client limit would refuse chats past 200.
               "ORCH_MAX_STREAMS_PER_CLIENT": "100000"}
        self.hosts = [LiveServer(database, self.workdir / f"host-{i}.log", env, name=f"host-{i}").launch()
                      for i in range(self.setup.hosts)]
        for host in self.hosts:
            host.wait_ready()
        if self.setup.route == "nginx":
            self.front = Nginx.start_front(self.workdir / "nginx", [h.url for h in self.hosts])
        return self

    @property
    def database(self) -> str:
        return self.hosts[0].database

    def urls(self) -> tuple[str, str]:
        """Where the agents connect, and where the users do."""
        if self.front is not None:
            return self.front.url, self.front.url
        if self.setup.route == "cross":
            return self.hosts[1].url, self.hosts[0].url
        return self.hosts[0].url, self.hosts[0].url

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the server processes (every host's arbiter and workers) and of PostgreSQL."""
        server = cpu_seconds([h.pid for h in self.hosts])
        return server, cpu_seconds([self.cluster.pid]) if self.cluster else 0.0

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        for host in self.hosts:
            host.stop()
        if self.cluster is not None:
            self.cluster.destroy()


def run_level(stack: Stack, creds_file: Path, chats: int, args: argparse.Namespace) -> Level:
    """One level: the generator runs ``chats`` chats at once for ``args.seconds``; the server's CPU meanwhile."""
    agents_url, users_url = stack.urls()
    out = stack.workdir / f"level-{chats}.json"
    generator = Process(f"generator {chats}", [
        sys.executable, "-m", "bench.scaling", "generate", "--agents-url", agents_url, "--users-url", users_url,
        "--creds", str(creds_file), "--chats", str(chats), "--seconds", str(args.level_seconds),
        "--rate", str(args.rate), "--batch", str(args.batch), "--out", str(out),
        "--transport", stack.setup.transport],
        stack.workdir / f"generator-{chats}.log")
    server_before, database_before = stack.cpu()
    generator.start()
    code = generator.proc.wait(args.level_seconds + 300)
    server_after, database_after = stack.cpu()
    generator.stop()
    if code != 0:
        raise RuntimeError(f"the load generator failed ({code}): {generator.log_tail()}")
    measured = json.loads(out.read_text())
    return Level(chats, measured["tokens"], measured["seconds"], measured["added_ms"], measured["first_token_ms"],
                 server_after - server_before, database_after - database_before, measured["lost"],
                 measured["duplicated"], measured["errors"])


def run_setup(setup: Setup, args: argparse.Namespace, workdir: Path) -> list[dict]:
    directory = workdir / setup.name.replace(" ", "-").replace(",", "")
    directory.mkdir(parents=True)
    stack = Stack(setup, directory)
    try:
        stack.start()           # inside the try: hosts already launched are stopped if another fails to start
        creds = register_agents(stack.database, [f"load-{i:04d}" for i in range(max(args.levels))])
        creds_file = directory / "agents.json"
        creds_file.write_text(json.dumps([[c.id, c.secret] for c in creds]))
        rows = []
        for chats in args.levels:
            level = run_level(stack, creds_file, chats, args)
            rows.append(level.row())
            print(f"bench.scaling: {setup.name}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            if rows[-1]["added_p99_ms"] is None or rows[-1]["added_p99_ms"] > P99_LIMIT_MS:
                break
        return rows
    finally:
        stack.stop()


def markdown(results: dict[str, list[dict]]) -> str:
    lines = ["| setup | chats | tokens/s | per-token p50 ms | p99 ms | first token p50 ms | server CPU ms/token "
             "| PostgreSQL CPU ms/token | lost | duplicated | errors |", "|---|" + "---:|" * 10]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['chats']} | {r['tokens_per_s']:,} | {r['added_p50_ms']} | {r['added_p99_ms']} "
                         f"| {r['first_token_p50_ms']} | {r['server_cpu_ms_per_token']} "
                         f"| {r['database_cpu_ms_per_token']} | {r['lost']} | {r['duplicated']} | {r['errors']} |")
    return "\n".join(lines)


def selected(args: argparse.Namespace) -> list[Setup]:
    """The whole matrix, or the one setup the flags describe."""
    if args.engine is None and args.workers is None and args.hosts is None and args.transport is None:
        return list(MATRIX)
    engine, workers, hosts = args.engine or "sqlite", args.workers or 1, args.hosts or 1
    route, transport = "same" if hosts == 1 else args.route, args.transport or "http"
    return [Setup(f"{engine}, {workers} worker(s), {hosts} host(s){'' if hosts == 1 else ', ' + route}"
                  f"{', ws agents' if transport == 'ws' else ''}", engine, workers, hosts, route, transport)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--engine", choices=("sqlite", "postgres"), help="run one setup on this engine (default: the whole matrix)")
    add("--workers", type=int, help="gunicorn workers per host (PostgreSQL, or 1 on SQLite)")
    add("--hosts", type=int, help="servers on the one database (PostgreSQL)")
    add("--transport", choices=("http", "ws"), help="the fake agents' transport in a one-setup run (default: http)")
    add("--route", choices=("nginx", "cross"), default="nginx",
        help="with several hosts: everyone through nginx, or agents on one host and users on another")
    add("--levels", type=lambda v: [int(x) for x in v.split(",")], default=list(DEFAULT_LEVELS),
        help="chats at once, in rising order (default: 25,50,100,200,400; stops once p99 passes 500 ms)")
    add("--level-seconds", type=float, default=8.0, help="how long each level runs (default: %(default)s)")
    add("--rate", type=float, default=50.0, help="tokens per second per chat (default: %(default)s)")
    add("--batch", type=int, default=5, help="tokens per agent POST (default: %(default)s)")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict]]:
    if args.workers and args.workers > 1 and (args.engine or "sqlite") == "sqlite":
        raise SystemExit("bench.scaling: several workers need --engine postgres")
    return {setup.name: run_setup(setup, args, workdir) for setup in selected(args)}


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.scaling generate ...` runs the load generator; anything else is `make bench-load`'s."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        from bench.loadgen import main as generate

        return generate(argv[1:])
    from bench.load import main as load

    return load(["--scenario", "scaling", *argv])


if __name__ == "__main__":
    sys.exit(main())
