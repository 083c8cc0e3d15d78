"""The scaling benchmark's load generator: fake agents and users in one gevent process.

Agents long-poll for jobs of the model ``load`` and post pre-built batches of
tokens at a fixed rate (the first token alone, at once, as the real agent
does), or with ``--transport ws`` hold a WebSocket each, get jobs pushed and
send the same batches as frames without waiting for acks; users start chats
back to back and read their SSE streams.  Both sides
share one clock, so each token's latency is exact: the moment its POST was
sent to the moment the user read it.  `python -m bench.scaling generate ...`.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from websockets.exceptions import WebSocketException  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402

from protocol import frames  # noqa: E402
from protocol.signing import signed_headers  # noqa: E402
from protocol.wire import CONNECT_PATH, POLL_PATH, STREAM_PATH  # noqa: E402

MODEL = "load"
CHAT_SECONDS = 2.0          # each chat streams this long; users start the next one at once
TIMEOUT = 60.0


class Books:
    """What both sides saw, keyed by (job id, seq)."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], float] = {}
        self.added_ms: list[float] = []
        self.first_token_ms: list[float] = []
        self.tokens = self.lost = self.duplicated = self.errors = 0
        self.last_error = ""

    def error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)


def agent(url: str, agent_id: str, secret: str, books: Books, rate: float, batch: int, stop: gevent.event.Event):
    conn = connect(url)
    poll = f"{POLL_PATH}?models={MODEL}&slots=1&wait=20"
    while not stop.is_set():
        try:
            conn.request("GET", poll, headers=signed_headers(agent_id, secret, "GET", poll, b"", int(time.time())))
            response = conn.getresponse()
            body = response.read()
            if response.status == 200:
                job = json.loads(body)
                answer(conn, agent_id, secret, job["id"], int(job["options"]["tokens"]), books, rate, batch)
            elif response.status != 204:
                books.error(f"poll {response.status}: {body[:200]!r}")
                gevent.sleep(0.5)
        except (OSError, http.client.HTTPException) as exc:
            if stop.is_set():
                return
            books.error(f"agent: {exc!r}")
            conn.close()
            conn = connect(url)
            gevent.sleep(0.2)


def socket_agent(url: str, agent_id: str, secret: str, books: Books, rate: float, batch: int,
                 stop: gevent.event.Event):
    """The same agent over its WebSocket: jobs pushed, batches sent as frames, acks read only between jobs."""
    ws_url = url.replace("http://", "ws://") + CONNECT_PATH
    while not stop.is_set():
        try:
            headers = signed_headers(agent_id, secret, "GET", CONNECT_PATH, b"", int(time.time()))
            with ws_connect(ws_url, additional_headers=headers, open_timeout=TIMEOUT, compression=None) as ws:
                seen = 0
                ws.send(frames.encode(frames.ANNOUNCE, models=[MODEL], slots=1, jobs_seen=seen))
                while not stop.is_set():
                    frame = json.loads(ws.recv(timeout=1.0))
                    if frame["type"] == frames.JOB:
                        seen += 1
                        answer_frames(ws, frame["id"], int(frame["options"]["tokens"]), books, rate, batch)
                        ws.send(frames.encode(frames.ANNOUNCE, models=[MODEL], slots=1, jobs_seen=seen))
                    elif frame["type"] == frames.ERROR:
                        books.error(f"socket error frame: {frame}")
        except TimeoutError:
            continue
        except (OSError, WebSocketException) as exc:
            if stop.is_set():
                return
            books.error(f"socket agent: {exc!r}")
            gevent.sleep(0.2)


def answer_frames(ws, job_id: str, tokens: int, books: Books, rate: float, batch: int) -> None:
    """``answer``'s schedule, each batch one ``chunks`` frame."""
    seq, started = 0, time.monotonic()
    ws.send(frames.chunks_frame({"id": job_id, "seq": 0, "chunks": [], "done": False}))
    while seq < tokens:
        size = 1 if seq == 0 else min(batch, tokens - seq)
        due = started + seq / rate
        if due > time.monotonic():
            gevent.sleep(due - time.monotonic())
        sent = time.monotonic()
        for i in range(seq, seq + size):
            books.sent[(job_id, i)] = sent
        ws.send(frames.chunks_frame({"id": job_id, "seq": seq, "chunks": ["tok"] * size,
                                     "done": seq + size >= tokens}))
        seq += size


def answer(conn, agent_id: str, secret: str, job_id: str, tokens: int, books: Books, rate: float, batch: int):
    """The first token at once, then a batch of ``batch`` tokens every ``batch / rate`` seconds, the last with done."""
    seq, started = 0, time.monotonic()
    while seq < tokens:
        size = 1 if seq == 0 else min(batch, tokens - seq)
        due = started + seq / rate
        if due > time.monotonic():
            gevent.sleep(due - time.monotonic())
        body = json.dumps({"id": job_id, "seq": seq, "chunks": ["tok"] * size,
                           "done": seq + size >= tokens}).encode()
        headers = signed_headers(agent_id, secret, "POST", STREAM_PATH, body, int(time.time()))
        sent = time.monotonic()
        for i in range(seq, seq + size):
            books.sent[(job_id, i)] = sent
        conn.request("POST", STREAM_PATH, body, headers | {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = response.read()
        if response.status != 200:
            books.error(f"post {response.status}: {reply[:200]!r}")
            return
        seq += size


def user(url: str, books: Books, tokens: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        conn = connect(url)
        try:
            chat(conn, books, tokens)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            books.error(f"user: {exc!r}")
        finally:
            conn.close()


def chat(conn, books: Books, tokens: int) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "go"}],
                       "options": {"tokens": tokens}}).encode()
    started = time.monotonic()
    conn.request("POST", "/api/v1/chat/stream", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        books.error(f"chat {response.status}: {response.read()[:200]!r}")
        return
    job_id = response.getheader("X-Request-Id")
    seen: set[int] = set()
    seq = None
    while True:
        line = response.readline()
        if not line:
            books.error("a stream ended without [DONE]")
            break
        if line.startswith(b"id: "):
            seq = int(line[4:])
        elif line.startswith(b"data: [DONE]"):
            break
        elif line.startswith(b"event: error"):
            books.error(f"error event: {response.readline()[:200]!r}")
            break
        elif line.startswith(b"data: ") and seq is not None:
            now = time.monotonic()
            if seq in seen:
                books.duplicated += 1
            else:
                seen.add(seq)
                books.tokens += 1
                if len(seen) == 1:
                    books.first_token_ms.append((now - started) * 1000)
                sent = books.sent.pop((job_id, seq), None)
                if sent is not None:
                    books.added_ms.append((now - sent) * 1000)
            seq = None
    books.lost += tokens - len(seen)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling generate")
    add = parser.add_argument
    add("--agents-url", required=True)
    add("--users-url", required=True)
    add("--creds", type=Path, required=True)
    add("--chats", type=int, required=True)
    add("--seconds", type=float, required=True)
    add("--rate", type=float, required=True)
    add("--batch", type=int, required=True)
    add("--transport", choices=("http", "ws"), default="http")
    add("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    creds = json.loads(args.creds.read_text())[:args.chats]
    books, stop = Books(), gevent.event.Event()
    tokens = int(args.rate * CHAT_SECONDS)
    play = socket_agent if args.transport == "ws" else agent
    agents = [gevent.spawn(play, args.agents_url, agent_id, secret, books, args.rate, args.batch, stop)
              for agent_id, secret in creds]
    gevent.sleep(1.0)          # every agent parked in a long poll: the server accepts chats for the model
    started = time.monotonic()
    users = [gevent.spawn(user, args.users_url, books, tokens, started + args.seconds) for _ in range(args.chats)]
    gevent.joinall(users, timeout=args.seconds + TIMEOUT)
    elapsed = time.monotonic() - started
    stop.set()
    gevent.killall(agents, timeout=5)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    args.out.write_text(json.dumps({
        "tokens": books.tokens, "seconds": elapsed, "added_ms": books.added_ms,
        "first_token_ms": books.first_token_ms, "lost": books.lost, "duplicated": books.duplicated,
        "errors": books.errors, "last_error": books.last_error,
        "generator_cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0
