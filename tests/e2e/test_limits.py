"""Hostile load against a real gunicorn worker (issue 14, items 1 and 2): too many streams, slow bodies, few
file descriptors.  Whatever a client does, the worker keeps answering `/healthz` and agents, refuses what is
beyond its limits with a 429 (408 for a body too slow) in the envelope, stores nothing for it, and never
answers 500 nor logs a traceback."""
from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from devtools.processes import LiveServer, wait_until
from tests.e2e.test_faults import rows, stand_in_agent
from tests.signed import sign

CHAT = json.dumps({"model": "other", "messages": [{"role": "user", "content": "wait in the queue"}]}).encode()


class Stream:
    """One chat stream from ``source`` (an address of the loopback range), held open until closed."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        self.conn.request("POST", "/api/v1/chat/stream", body=CHAT, headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()      # the headers come at once; the body is the stream
        self.status = self.response.status
        self.error = json.loads(self.response.read())["error"] if self.status != 200 else None

    def close(self) -> None:
        self.conn.close()


def served(server: LiveServer, creds) -> tuple[int, int]:
    """What /healthz and an agent's poll answer now."""
    path = "/api/v1/inference/poll?models=m"
    health = requests.get(server.url + "/healthz", timeout=10).status_code
    poll = requests.get(server.url + path, headers=sign(creds, "GET", path), timeout=10).status_code
    return health, poll


def jobs_stored(server: LiveServer) -> int:
    return rows(server, "SELECT count(*) FROM jobs")[0][0]


def test_streams_beyond_the_per_client_and_total_limits_get_429_and_healthz_and_agents_are_still_served(
        live_server_factory):
    server = live_server_factory(ORCH_MAX_STREAMS=60, ORCH_MAX_STREAMS_PER_CLIENT=20, ORCH_QUEUE_TIMEOUT=300)
    stand_in_agent(server, "other")
    creds = server.add_agent("poller")
    opened: list[Stream] = []

    def open_from(source: str) -> Stream:
        opened.append(Stream(server.port, source))
        return opened[-1]

    try:
        first = [open_from(source) for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3") for _ in range(20)]
        assert [s.status for s in first] == [200] * 60
        stored = jobs_stored(server)
        same_client, other_client = open_from("127.0.0.1"), open_from("127.0.0.4")
        assert (same_client.status, same_client.error["code"]) == (429, "too_many_streams")
        assert (other_client.status, other_client.error["code"]) == (429, "too_many_streams")
        assert jobs_stored(server) == stored              # a refused chat is not queued
        assert served(server, creds) == (200, 204)
        first[25].close()                                 # a slot comes back when its stream closes
        wait_until(lambda: open_from("127.0.0.4").status == 200, 10, 0.2, "a stream once another closed")
    finally:
        for stream in opened:
            stream.close()
    assert "Traceback" not in server.log()


def dribble_a_body(port: int, deadline: float, started: list) -> tuple[bytes, bool]:
    """A POST announcing 5,000 bytes of body, then one byte every half second; the server's answer, and
    whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /api/v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{")
        started.append(sock)
        sock.settimeout(0.5)
        answer = b""
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if not answer:
                    try:
                        sock.sendall(b" ")     # each read is quick: only a deadline on the whole body ends this
                    except OSError:
                        return answer, True
                continue
            except OSError:
                return answer, True
            if not data:
                return answer, True            # closed by the server: the whole answer is in
            answer += data
    return answer, False


def test_slow_bodies_are_cut_after_the_body_timeout_and_healthz_and_agents_are_still_served(live_server_factory):
    server = live_server_factory(ORCH_BODY_TIMEOUT=2)
    creds = server.add_agent("poller")
    deadline, started = time.monotonic() + 30, []
    with ThreadPoolExecutor(100) as pool:
        answers = [pool.submit(dribble_a_body, server.port, deadline, started) for _ in range(100)]
        wait_until(lambda: len(started) == 100, 10, message="100 slow bodies under way")
        assert served(server, creds) == (200, 204)
        answers = [a.result() for a in answers]
    for answer, closed in answers:
        assert closed
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code": "body_timeout"' in answer or b'"code":"body_timeout"' in answer, answer
    assert served(server, creds) == (200, 204)
    assert "Traceback" not in server.log()


# --- file descriptors ---------------------------------------------------------------------

def under_open_files_limit(nofile: int) -> list[str]:
    """A command prefix that runs a program with ``nofile`` as its soft and hard open-files limit."""
    return [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
            f"({nofile}, {nofile})); os.execv(sys.executable, sys.argv[1:])"]


def worker_fds(server: LiveServer) -> list[str]:
    """What the gunicorn worker's file descriptors point at."""
    worker = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == server.pid)
    targets = []
    for fd in os.listdir(f"/proc/{worker}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{worker}/fd/{fd}"))
        except FileNotFoundError:
            pass            # closed since the listing (a connection ending)
    return targets


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_under_an_open_files_limit_of_1024_1500_streams_get_200_or_429_and_never_a_500(tmp_path):
    server = LiveServer(tmp_path / "server.db", tmp_path / "server.log", {"ORCH_MAX_STREAMS_PER_CLIENT": 5000},
                        prefix=under_open_files_limit(1024)).start()
    try:
        stand_in_agent(server, "other")
        creds = server.add_agent("poller")
        assert "open files: limit 1024" in server.log() and "WORKER_CONNECTIONS=10000 needs" in server.log()
        streams: list[Stream] = []
        try:
            with ThreadPoolExecutor(50) as pool:
                streams = list(pool.map(lambda _: Stream(server.port), range(1500)))
            statuses = Counter(s.status for s in streams)
            assert set(statuses) == {200, 429} and statuses[200] >= 500, statuses
            assert {s.error["code"] for s in streams if s.error} == {"too_many_streams"}
            assert served(server, creds) == (200, 204)
        finally:
            for stream in streams:
                stream.close()
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log and "Too many open files" not in log and "unable to open database" not in log


def test_a_burst_of_chats_beyond_the_pool_leaves_no_database_descriptors_open(live_server_factory):
    server = live_server_factory(ORCH_POOL_SIZE=16, ORCH_MAX_STREAMS_PER_CLIENT=1000)
    stand_in_agent(server, "other")
    with ThreadPoolExecutor(50) as pool:
        streams = list(pool.map(lambda _: Stream(server.port), range(300)))
    for stream in streams:
        stream.close()
    assert {s.status for s in streams} == {200}
    wait_until(lambda: rows(server, "SELECT count(*) FROM jobs WHERE status = 'queued'")[0][0] == 0, 30, 0.2,
               "the abandoned chats to be cancelled")
    database = [fd for fd in worker_fds(server) if fd.startswith(str(server.database))]
    # A database and a WAL file per connection (the 16 pooled ones and the sweeper's), and the shared -shm.
    assert len(database) <= 2 * (16 + 1) + 1, Counter(database)
