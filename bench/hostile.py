"""`python -m bench.hostile --scenario NAME` (`make bench-load ARGS="--scenario NAME"`): one gevent worker under
hostile load (issue 14), measured from outside while it happens.

- `streams`: `--clients` addresses (one by default) open `--streams` chat streams (a model whose only agent has no free slot) and
  `--slow-bodies` connections dribble a body one byte every 2 s; meanwhile `/healthz`, a new chat from
  another address and an agent's poll are timed.  Reports 200/429/408/5xx counts and the worker's RSS.
- `huge-posts`: an agent posts the largest batch the server takes (ORCH_MAX_CHUNKS_PER_POST chunks) in a
  loop, plus one POST of 200,000 chunks; `/healthz` is timed meanwhile.
- `post`: the token path's floor: sequential keep-alive chunk POSTs of one chunk each, signed, p50/p99.

Each run prints a Markdown table and writes bench/results/hostile-<scenario>-<date>.json; every loop is
bounded in count and time, and only loopback addresses are used.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.load import raise_fd_limit, rss_mb, worker_pid
from bench.metrics import percentile
from devtools.processes import ROOT, LiveServer
from protocol.signing import signed_headers
from server.storage import jobs, migrated

SCENARIOS = ("streams", "huge-posts", "post")
DEFAULT_OUT = ROOT / "bench" / "results"
POLL = "/api/v1/inference/poll"
STREAM = "/api/v1/inference/stream"
HELLO = [{"role": "user", "content": "hi"}]


def signed(creds, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    return signed_headers(creds.id, creds.secret, method, path, body, int(time.time()))


class Timer:
    """Times one request every `interval` seconds on a thread until stopped; the latencies in ms, and failures."""

    def __init__(self, call: Callable[[], int], interval: float = 0.25) -> None:
        self.call, self.interval = call, interval
        self.ms: list[float] = []
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Timer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                self.statuses[self.call()] += 1
            except requests.RequestException as exc:
                self.statuses[type(exc).__name__] += 1
            self.ms.append((time.perf_counter() - started) * 1000)

    def summary(self) -> dict:
        return {"n": len(self.ms), "p50_ms": _round(percentile(self.ms, 50)), "max_ms": _round(max(self.ms, default=None)),
                "statuses": dict(self.statuses)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def start_server(workdir: Path, **env: object) -> LiveServer:
    return LiveServer(workdir / "hostile.db", workdir / "server.log", {"ORCH_LOG_LEVEL": "WARNING", **env}).start()


def busy_model(server: LiveServer, model: str = "busy") -> None:
    """An agent online for `model` with no free slot: chats for it stay queued and their streams open."""
    creds = server.add_agent("no-free-slot")
    path = f"{POLL}?models={model}&slots=0"
    requests.get(server.url + path, headers=signed(creds, "GET", path), timeout=10).raise_for_status()


def open_stream(port: int, source: str, model: str = "busy") -> tuple[int, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    body = json.dumps({"model": model, "messages": HELLO}).encode()
    conn.request("POST", "/api/v1/chat/stream", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        response.read()
    return response.status, conn


def dribble(port: int, seconds: float) -> str:
    """A body announced as 5,000 bytes, one byte every 2 s; what became of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"POST /api/v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{")
        sock.settimeout(2.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                answer = sock.recv(200)
                return answer.split(b" ", 2)[1].decode() if answer else "closed"
            except TimeoutError:
                sock.sendall(b" ")
            except OSError:
                return "closed"
    return "still open"


def scenario_streams(args: argparse.Namespace, workdir: Path) -> dict:
    raise_fd_limit(args.streams + args.slow_bodies + 2048)
    server = start_server(workdir, ORCH_QUEUE_TIMEOUT=600, ORCH_ACCESS_LOG="")
    try:
        busy_model(server)
        agent = server.add_agent("poller")
        worker = worker_pid(server.pid)
        rss_before = rss_mb(worker)
        poll_path = f"{POLL}?models=m"
        health = Timer(lambda: requests.get(server.url + "/healthz", timeout=60).status_code)
        polls = Timer(lambda: requests.get(server.url + poll_path, headers=signed(agent, "GET", poll_path),
                                           timeout=60).status_code)
        new_chat = Timer(lambda: _close_after(open_stream(server.port, "127.0.0.9")), interval=1.0)
        held: list[http.client.HTTPConnection] = []
        with health, polls, new_chat, ThreadPoolExecutor(max(1, args.slow_bodies)) as dribbling, \
                ThreadPoolExecutor(64) as opening:
            slow = [dribbling.submit(dribble, server.port, args.seconds) for _ in range(args.slow_bodies)]
            opened = list(opening.map(lambda i: open_stream(server.port, f"127.0.1.{1 + i % args.clients}"),
                                      range(args.streams)))
            held = [conn for _, conn in opened]
            rss_peak = rss_mb(worker)
            slow_outcomes = Counter(f.result() for f in slow)
        for conn in held:
            conn.close()
        statuses = Counter(status for status, _ in opened)
    finally:
        server.stop()
    return {"streams_asked": args.streams, "stream_statuses": dict(statuses), "slow_bodies": dict(slow_outcomes),
            "healthz": health.summary(), "agent_poll": polls.summary(), "new_chat_other_client": new_chat.summary(),
            "worker_rss_mb": {"before": round(rss_before), "peak": round(rss_peak)},
            "tracebacks": server.log().count("Traceback")}


def _close_after(opened: tuple[int, http.client.HTTPConnection]) -> int:
    status, conn = opened
    conn.close()
    return status


def held_job(server: LiveServer):
    """An agent holding a running job of its own: what chunk POSTs are for."""
    creds = server.add_agent("poster")
    with migrated(server.database) as db:
        jobs.create_job(db, "m", HELLO, {}, time.time())
    path = f"{POLL}?models=m"
    job = requests.get(server.url + path, headers=signed(creds, "GET", path), timeout=10).json()["id"]
    return creds, job


def post_chunks(session: requests.Session, server: LiveServer, creds, job: str, seq: int, chunks: list[str]):
    body = json.dumps({"id": job, "chunks": chunks, "seq": seq}).encode()
    return session.post(server.url + STREAM, data=body, timeout=60,
                        headers={**signed(creds, "POST", STREAM, body), "Content-Type": "application/json"})


def scenario_huge_posts(args: argparse.Namespace, workdir: Path) -> dict:
    server = start_server(workdir, ORCH_LEASE_SECONDS=3600)
    try:
        creds, job = held_job(server)
        biggest = args.max_chunks
        session, seq, sizes = requests.Session(), 0, Counter()
        with Timer(lambda: requests.get(server.url + "/healthz", timeout=60).status_code, 0.05) as health:
            too_big = post_chunks(session, server, creds, job, seq, ["x"] * 200_000)
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                reply = post_chunks(session, server, creds, job, seq, ["y"] * biggest)
                sizes[reply.status_code] += 1
                seq = reply.json().get("next_seq", seq)
    finally:
        server.stop()
    return {"post_of_200000_chunks": {"status": too_big.status_code,
                                      "code": too_big.json().get("error", {}).get("code")},
            f"posts_of_{biggest}_chunks": dict(sizes), "chunks_stored": seq, "healthz_meanwhile": health.summary(),
            "tracebacks": server.log().count("Traceback")}


def scenario_post(args: argparse.Namespace, workdir: Path) -> dict:
    server = start_server(workdir, ORCH_LEASE_SECONDS=3600)
    try:
        creds, job = held_job(server)
        session, latencies = requests.Session(), []
        for seq in range(args.posts):
            started = time.perf_counter()
            reply = post_chunks(session, server, creds, job, seq, ["tok"])
            latencies.append((time.perf_counter() - started) * 1000)
            reply.raise_for_status()
        warm = latencies[len(latencies) // 10:]
    finally:
        server.stop()
    return {"posts": args.posts, "p50_ms": _round(percentile(warm, 50)), "p99_ms": _round(percentile(warm, 99))}


RUNS = {"streams": scenario_streams, "huge-posts": scenario_huge_posts, "post": scenario_post}


def markdown(figures: dict, prefix: str = "") -> list[str]:
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict) and not all(isinstance(k, str) and k.isdigit() for k in value):
            rows += markdown(value, f"{prefix}{key} ")
        else:
            rows.append(f"| {prefix}{key} | {value} |")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--scenario", choices=SCENARIOS, required=True)
    add("--streams", type=int, default=5000, help="streams: chat streams opened (default: %(default)s)")
    add("--clients", type=int, default=1, help="streams: client addresses they come from (default: %(default)s)")
    add("--slow-bodies", type=int, default=300, help="streams: connections dribbling a body (default: %(default)s)")
    add("--seconds", type=float, default=30.0, help="how long the load lasts (default: %(default)s)")
    add("--max-chunks", type=int, default=1000, help="huge-posts: chunks per POST (default: %(default)s)")
    add("--posts", type=int, default=2000, help="post: sequential POSTs timed (default: %(default)s)")
    add("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON (default: bench/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix=f"orchestrator-bench-{args.scenario}-"))
    figures = RUNS[args.scenario](args, workdir)
    print("\n".join(["| measure | value |", "|---|---|", *markdown(figures)]))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"hostile-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))
    print(f"bench.hostile: wrote {out} (logs in {workdir})", file=sys.stderr)
    return 1 if figures.get("tracebacks") else 0


if __name__ == "__main__":
    sys.exit(main())
