"""The server's own outages (issue 14): down longer than a lease, its database locked or its disk full.

Real processes throughout: gunicorn with the gevent worker, `python -m agent`, the Ollama simulator, and for
the disk a small tmpfs filled for real.  Nobody at fault is blamed: a healthy agent is not declared lost, a
database that cannot write says so (503 `storage_unavailable`, `/healthz` naming it, streams ending with that
code), and everything recovers when the cause goes away.
"""
from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from devtools.processes import Process, wait_until
from tests.e2e.chat_client import EventStream, expected, start_chat
from tests.e2e.flaky_proxy import FlakyProxy
from tests.e2e.test_faults import read_within, rows, stand_in_agent, stored
from tests.signed import sign

LEASE = 6


def test_a_server_down_longer_than_the_lease_gives_its_healthy_agents_job_a_full_lease_after_the_restart(
        live_server_factory, simulator, start_agent):
    server = live_server_factory(ORCH_LEASE_SECONDS=LEASE, ORCH_SWEEP_INTERVAL=0.1, ORCH_CANCEL_GRACE=120)
    tokens = 150
    with FlakyProxy(server.url, reset_rate=0).start() as proxy:
        # TRANSPORT=http: these outages are checked on the POSTs' path (test_faults.py runs both transports).
        agent = start_agent(server, simulator.url, API_BASE=proxy.url, TRANSPORT="http")
        with start_chat(server, "outage", sim_tokens=tokens, sim_interval_ms=40) as response:
            before = EventStream(response).read(stop_after=5)
            server.kill()
        request_id = before.request_id
        # The agent's POSTs are refused until the restarted sweeper has had its chance.
        proxy.refuse("POST /api/v1/inference/stream ")
        wait_until(lambda: " failed (" in agent.log(), 15, message="the agent's POSTs failing")
        wait_until(lambda: rows(server, "SELECT lease_expires FROM jobs WHERE id = ?", request_id)[0][0] < time.time(),
                   LEASE + 10, 0.2, "the job's lease to run out while the server is down")
        server.start()
        # Ten sweeps at 0.1 s: before the fix, the first one failed the job with agent_lost.
        time.sleep(1.0)
        proxy.refuse(None)
        with requests.get(f"{server.url}/api/v1/chat/stream/{request_id}", stream=True, timeout=(5, 60),
                          headers={"Last-Event-ID": str(before.ids[-1])}) as resumed:
            after = EventStream(resumed).read()
    assert after.done, after.error
    assert before.text + after.text == expected("outage", tokens)
    assert stored(server, request_id)["status"] == "done"


# --- a locked database ------------------------------------------------------------------

LOCK_SECONDS = 12
KEEPALIVE = 0.5
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
print("released", flush=True)
"""


@dataclass
class Keepalives:
    """The times at which a stream's keepalive comments arrived, read on a thread."""

    seen: list[float] = field(default_factory=list)

    def follow(self, response: requests.Response) -> None:
        def read() -> None:
            try:
                for line in response.iter_lines(chunk_size=1):
                    if line == b": keepalive":
                        self.seen.append(time.monotonic())
            except Exception:       # noqa: BLE001 (the response closed under the reader: its end)
                pass
        threading.Thread(target=read, daemon=True).start()


def test_a_database_locked_by_another_process_keeps_streams_alive_and_answers_503_not_500(
        live_server_factory, simulator, start_agent, tmp_path):
    server = live_server_factory(ORCH_KEEPALIVE_SECONDS=KEEPALIVE, ORCH_QUEUE_TIMEOUT=300)
    start_agent(server, simulator.url, TRANSPORT="http")      # short polls: a write ten times a second
    stand_in_agent(server, "other")
    creds = server.add_agent("poller")
    keepalives = Keepalives()
    with start_chat(server, "waits in the queue", "other") as waiting:
        keepalives.follow(waiting)
        wait_until(lambda: keepalives.seen, 10, message="the first keepalive")
        locker = Process("locker", [sys.executable, "-c", LOCKER, server.database, str(LOCK_SECONDS)],
                         None).start(stdout_pipe=True)
        try:
            assert locker.proc.stdout.readline() == b"locked\n"
            locked_at = time.monotonic()
            health = requests.get(server.url + "/healthz", timeout=30)
            path = "/api/v1/inference/poll?models=m"
            poll = requests.get(server.url + path, headers=sign(creds, "GET", path), timeout=30)
            still_locked = locker.proc.poll() is None
            assert locker.proc.stdout.readline() == b"released\n"
            released_at = time.monotonic()
        finally:
            locker.stop()
        during = [t for t in keepalives.seen if locked_at <= t <= released_at]
    assert still_locked
    assert (health.status_code, health.json()["error"]["code"]) == (503, "storage_unavailable"), health.text
    assert (poll.status_code, poll.json()["error"]["code"]) == (503, "storage_unavailable"), poll.text
    # A keepalive every 0.5 s all through the lock (24 due); before, the loop slept in SQLite 5 s at a time.
    assert len(during) >= LOCK_SECONDS / KEEPALIVE / 3, during
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.log()


# --- a full disk ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (needs root, as `make test` and CI run); skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): run as root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; removing it gives the space back."""
    filler = disk / "filler"
    block = b"\0" * 65536
    # Unbuffered: a buffered file's close() would retry its last write and raise ENOSPC again.
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while f.write(b"\0"):          # the last partial block's bytes
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_full_disk_is_named_by_healthz_ends_streams_with_storage_unavailable_and_recovers(
        live_server_factory, simulator, start_agent, small_disk):
    server = live_server_factory(small_disk / "server.db", ORCH_SWEEP_INTERVAL=0.2, ORCH_CANCEL_GRACE=120)
    start_agent(server, simulator.url, TRANSPORT="http")
    tokens = 400
    with start_chat(server, "a full disk", sim_tokens=tokens, sim_interval_ms=25) as response:
        events = EventStream(response)
        before = events.read(stop_after=5)
        filler = fill(small_disk)
        cut = read_within(events, 30)
    assert cut.error is not None and cut.error["code"] == "storage_unavailable", cut.error
    health = requests.get(server.url + "/healthz", timeout=10)
    assert (health.status_code, health.json()["error"]["code"]) == (503, "storage_unavailable"), health.text
    assert "full" in health.json()["error"]["message"]
    refused = requests.post(server.url + "/api/v1/chat/stream", timeout=10,
                            json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "storage_unavailable")

    filler.unlink()
    wait_until(lambda: requests.get(server.url + "/healthz", timeout=10).status_code == 200, 30, 0.2,
               "/healthz back to 200 once the space returns")
    # The agent kept its answer and retried: resuming brings the rest, nothing lost, nobody blamed.
    with requests.get(f"{server.url}/api/v1/chat/stream/{before.request_id}", stream=True, timeout=(5, 60),
                      headers={"Last-Event-ID": str(cut.ids[-1])}) as resumed:
        after = EventStream(resumed).read()
    assert after.done, after.error
    assert cut.text + after.text == expected("a full disk", tokens)
    log = server.log()
    assert log.count("storage unavailable") == 1 and log.count("storage available again") == 1, log[-3000:]
    assert "Traceback" not in log
