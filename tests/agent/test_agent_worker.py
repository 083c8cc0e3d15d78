"""The agent's poll loop and job runs against in-memory fakes of the server client and the backend.

End-to-end behaviour with real processes is in test_agent_e2e.py; these pin
down the loop's decisions quickly and deterministically.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

import pytest

from agent.backend import BackendError
from agent.backoff import Backoff
from agent.batcher import ChunkBatch, SendReply
from agent.config import AgentConfig
from agent.exceptions import AgentRevoked, ClockSkew, JobGone, MalformedJob, SignatureRejected, TransportError
from agent.job import Job
from agent.legacy import LegacyPoster
from agent.worker import EXIT_REVOKED, SHUTDOWN_REASON, StartupError, Worker
from devtools.processes import wait_until

STATS = {"done_reason": "stop", "eval_count": 3}


class FakeStream:
    """A backend answer: `tokens`, then stats or `error`; `gate` holds it before the first token."""

    def __init__(self, tokens: list[str], error: str | None = None, gate: threading.Event | None = None) -> None:
        self.tokens_to_send, self.error, self.gate = tokens, error, gate
        self.stats: dict | None = None
        self.closed_event = threading.Event()
        self.tokens = 0

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set()

    def close(self) -> None:
        self.closed_event.set()

    def __iter__(self):
        if self.gate is not None:
            while not (self.gate.wait(0.01) or self.closed):
                pass
        for token in self.tokens_to_send:
            if self.closed:
                return
            self.tokens += 1
            yield token
        if self.error:
            raise BackendError(self.error)
        self.stats = STATS


class FakeBackend:
    url = "http://ollama.test"
    kinds = ("chat", "features", "embed")

    def __init__(self, models=("sim",)) -> None:
        self.available = list(models)
        self.answers: dict[str, FakeStream] = {}
        self.streams: list[FakeStream] = []

    def models(self) -> list[str]:
        return list(self.available)

    def chat(self, model: str, messages: list[dict], options: dict, request: dict | None = None) -> FakeStream:
        stream = self.answers.get(messages[-1]["content"]) or FakeStream(["Hel", "lo", " 🦙"])
        self.streams.append(stream)
        return stream

    def describe(self) -> dict:
        return {"models": [{"name": name} for name in self.available], "running": [], "version": "test"}


class FakeClient:
    """The server as the agent sees it: scripted poll answers, chunk POSTs stored by job."""

    api_base = "http://server.test"

    def __init__(self, *answers) -> None:
        self.answers = deque(answers)
        self.polls: list[tuple[list[str], int]] = []
        self.posts: list[ChunkBatch] = []
        self.legacy_posts: list[tuple[str, str, bool, str | None]] = []
        self.cancelled: set[str] = set()
        self.reports: list[dict] = []
        self.left: list[int] = []   # how many POSTs had been made when the agent said goodbye
        self.lock = threading.Lock()

    def poll(self, models, slots, wait=0, kinds=None):
        with self.lock:
            self.polls.append((list(models), slots))
            answer = self.answers.popleft() if self.answers else None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def send(self, batch: ChunkBatch) -> SendReply:
        with self.lock:
            self.posts.append(batch)
            if batch.job_id in self.cancelled:
                return SendReply(True, batch.end_seq)
        return SendReply(False, batch.end_seq)

    def send_legacy(self, job_id, chunk, done, error=None) -> bool:
        with self.lock:
            self.legacy_posts.append((job_id, chunk, done, error))
        return job_id in self.cancelled

    def report(self, report: dict) -> None:
        self.reports.append(report)

    def leave(self) -> None:
        with self.lock:
            self.left.append(len(self.posts))

    def close(self) -> None:
        pass

    def text(self, job_id: str) -> str:
        return "".join(c for b in self.posts if b.job_id == job_id for c in b.chunks)

    def final(self, job_id: str) -> ChunkBatch | None:
        return next((b for b in self.posts if b.job_id == job_id and b.done), None)


def job(job_id: str, content: str = "hi", lease: float = 30.0) -> Job:
    return Job(job_id, "sim", [{"role": "user", "content": content}], {}, lease)


@pytest.fixture
def run_worker():
    """Start a Worker's loop in a thread; stopped (warm) at the end of the test."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(client, backend=None, **settings) -> Worker:
        config = AgentConfig("agt_test", "secret", **{"poll_interval": 0.005, "batch_max_delay": 0.0, **settings})
        worker = Worker(config, client, backend or FakeBackend())
        worker.backoff = Backoff(base=0.001, cap=0.01)
        thread = threading.Thread(target=worker.work, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.request_stop()
        thread.join(10)


def test_a_job_is_acknowledged_at_once_then_streamed_with_its_stats(run_worker):
    gate = threading.Event()
    backend = FakeBackend()
    backend.answers = {"hi": FakeStream(["Hel", "lo", " 🦙"], gate=gate)}
    client = FakeClient(job("j1"))
    run_worker(client, backend)
    wait_until(lambda: client.posts, message="the first POST")
    assert client.posts[0] == ChunkBatch("j1", 0, ())  # before any token: the heartbeat that acknowledges delivery
    gate.set()
    final = wait_until(lambda: client.final("j1"), message="the final POST")
    assert client.text("j1") == "Hello 🦙"
    assert final.stats == STATS and final.error is None


def test_polls_only_while_a_slot_is_free_and_declares_the_free_slots(run_worker):
    gate = threading.Event()
    backend = FakeBackend(models=("sim", "llama3"))
    backend.answers = {"a": FakeStream(["a"], gate=gate), "b": FakeStream(["b"], gate=gate)}
    client = FakeClient(job("ja", "a"), job("jb", "b"))
    worker = run_worker(client, backend, max_jobs=2)
    wait_until(lambda: worker.running_jobs == 2, message="two running jobs")
    polls_while_full = len(client.polls)
    assert client.polls[:2] == [(["sim", "llama3"], 2), (["sim", "llama3"], 1)]
    gate.set()
    wait_until(lambda: client.final("ja") and client.final("jb"), message="both jobs done")
    wait_until(lambda: len(client.polls) > polls_while_full and client.polls[-1][1] == 2, message="polling again")
    assert all(slots > 0 for _, slots in client.polls), "a poll while every slot was busy"


def test_a_backend_error_ends_the_job_with_that_message_and_the_agent_keeps_serving(run_worker):
    backend = FakeBackend()
    backend.answers = {"bad": FakeStream(["partial"], error="Ollama: out of memory")}
    client = FakeClient(job("j1", "bad"), job("j2"))
    run_worker(client, backend)
    failed = wait_until(lambda: client.final("j1"), message="j1's final POST")
    assert failed.error == "Ollama: out of memory" and client.text("j1") == "partial"
    assert wait_until(lambda: client.final("j2"), message="j2 done").error is None


def test_a_malformed_job_is_reported_failed_and_polling_goes_on(run_worker):
    client = FakeClient(MalformedJob("the job has no model", "jbad"), MalformedJob("the job has no id"), job("j2"))
    run_worker(client)
    wait_until(lambda: client.final("j2"), message="the next job done")
    report = client.final("jbad")
    assert report.chunks == () and "malformed job" in report.error and "no model" in report.error


def test_a_cancel_from_the_server_closes_the_backend_stream(run_worker):
    gate = threading.Event()
    backend = FakeBackend()
    backend.answers = {"slow": FakeStream(["never sent"], gate=gate)}
    client = FakeClient(job("j1", "slow"))
    client.cancelled.add("j1")  # the heartbeat's answer says cancelled
    worker = run_worker(client, backend)
    wait_until(lambda: backend.streams and backend.streams[0].closed, message="the stream closed")
    wait_until(lambda: worker.running_jobs == 0, message="the slot freed")
    assert client.text("j1") == "" and client.final("j1") is None


def test_server_outages_back_off_and_log_once_per_change_of_state(run_worker, caplog):
    caplog.set_level(logging.INFO, logger="agent.worker")
    client = FakeClient(None, *[TransportError("connection refused")] * 8, None, job("j1"))
    run_worker(client)
    wait_until(lambda: client.final("j1"), message="the job after the outage")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("server unreachable" in m for m in messages) == 1
    assert sum("reachable again after 8 failed poll(s)" in m for m in messages) == 1


def startup_error(worker: Worker) -> BaseException | None:
    """What `work()` raised, run off the main thread so it installs no signal handlers in pytest."""
    raised: list[BaseException] = []

    def work() -> None:
        try:
            worker.work()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    return raised[0] if raised else None


def test_a_rejected_signature_on_the_first_poll_stops_the_agent_with_one_line():
    client = FakeClient(SignatureRejected("bad signature or unknown agent"))
    error = startup_error(Worker(AgentConfig("agt_test", "wrong"), client, FakeBackend()))
    assert isinstance(error, StartupError)
    assert str(error).startswith("server rejected our signature: check AGENT_ID/AGENT_SECRET")


def test_a_clock_far_from_the_servers_stops_the_agent_saying_by_how_much():
    client = FakeClient(ClockSkew(-93.4))
    error = startup_error(Worker(AgentConfig("agt_test", "s"), client, FakeBackend()))
    assert isinstance(error, StartupError)
    assert "clock differs from the server's by -93 s" in str(error) and "AGENT_SECRET" not in str(error)


def test_a_revoked_agent_stops_polling_and_exits_with_status_3():
    client = FakeClient(None, AgentRevoked("this agent was removed by an operator"))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(Worker(AgentConfig("agt_test", "s"), client,
                                                                  FakeBackend()).work()))
    thread.start()
    thread.join(10)
    assert status == [EXIT_REVOKED] and EXIT_REVOKED == 3
    assert len(client.polls) == 2          # the revoking poll was the last


def test_a_rejected_signature_after_the_server_accepted_us_is_only_backed_off(run_worker):
    client = FakeClient(None, SignatureRejected("stale timestamp"), job("j1"))
    run_worker(client)
    wait_until(lambda: client.final("j1"), message="the job after the rejection")


def test_an_unreachable_backend_stops_the_agent_at_start():
    class Down(FakeBackend):
        def models(self):
            raise BackendError("Ollama at http://127.0.0.1:1 is not reachable: connection refused")

    error = startup_error(Worker(AgentConfig("agt_test", "s"), FakeClient(), Down()))
    assert isinstance(error, StartupError) and str(error).startswith("Ollama at http://127.0.0.1:1 is not reachable")


def test_a_warm_stop_lets_the_running_job_finish_and_stops_polling(run_worker):
    gate = threading.Event()
    backend = FakeBackend()
    backend.answers = {"slow": FakeStream(["finished"], gate=gate)}
    client = FakeClient(job("j1", "slow"), job("never-taken"))
    worker = run_worker(client, backend)
    wait_until(lambda: worker.running_jobs == 1, message="the job running")
    worker.request_stop()
    polls = len(client.polls)
    gate.set()
    assert wait_until(lambda: client.final("j1"), message="the job finished").error is None
    assert len(client.polls) == polls and "never-taken" in {a.id for a in client.answers}


def test_a_warm_stop_tells_the_server_at_once_before_the_running_job_ends(run_worker):
    gate = threading.Event()
    backend = FakeBackend()
    backend.answers = {"slow": FakeStream(["finished"], gate=gate)}
    client = FakeClient(job("j1", "slow"))
    worker = run_worker(client, backend)
    wait_until(lambda: worker.running_jobs == 1, message="the job running")
    worker.request_stop()
    wait_until(lambda: client.left, message="the goodbye")
    assert client.final("j1") is None  # said while the job still runs: its models go at once
    gate.set()
    wait_until(lambda: client.final("j1"), message="the job finished")
    assert len(client.left) == 1


def test_an_agent_the_server_never_answered_says_no_goodbye(run_worker):
    client = FakeClient(*[TransportError("connection refused")] * 1000)
    worker = run_worker(client)
    wait_until(lambda: len(client.polls) >= 3, message="a few failed polls")
    worker.request_stop()
    wait_until(lambda: not worker._loop_thread.is_alive(), message="the stop")
    assert client.left == []


def test_jobs_still_running_at_the_shutdown_deadline_end_with_an_error(run_worker):
    backend = FakeBackend()
    backend.answers = {"slow": FakeStream(["x"], gate=threading.Event())}
    client = FakeClient(job("j1", "slow"))
    worker = run_worker(client, backend, shutdown_timeout=0.05)
    wait_until(lambda: worker.running_jobs == 1, message="the job running")
    worker.request_stop()
    assert wait_until(lambda: client.final("j1"), message="the final POST").error == SHUTDOWN_REASON
    assert backend.streams[0].closed


def test_a_job_lease_is_renewed_by_heartbeats_while_no_token_comes(run_worker):
    gate = threading.Event()
    backend = FakeBackend()
    backend.answers = {"loading": FakeStream(["late"], gate=gate)}
    client = FakeClient(job("j1", "loading", lease=1.5))  # heartbeat every 0.5 s
    run_worker(client, backend)
    wait_until(lambda: sum(b.job_id == "j1" for b in client.posts) >= 3, message="two heartbeats after the ack")
    gate.set()
    wait_until(lambda: client.final("j1"), message="the job done")
    assert client.text("j1") == "late"


def test_the_legacy_poster_posts_each_token_alone_with_the_chunk_field():
    client = FakeClient()
    cancelled = threading.Event()
    poster = LegacyPoster("j1", client, cancelled.set)
    poster.heartbeat()
    for token in ("a", "b"):
        poster.add(token)
    assert poster.finish(stats=STATS)
    assert client.legacy_posts == [("j1", "", False, None), ("j1", "a", False, None), ("j1", "b", False, None),
                                   ("j1", "", True, None)]
    client.cancelled.add("j1")
    poster.add("c")
    assert poster.cancelled and cancelled.is_set()
    poster.add("d")
    assert len(client.legacy_posts) == 5


def test_a_lost_server_mid_job_ends_the_legacy_post_but_not_the_job():
    class Flaky(FakeClient):
        def send_legacy(self, *args):
            raise TransportError("connection refused")

    poster = LegacyPoster("j1", Flaky())
    poster.add("a")
    assert not poster.finish() and not poster.cancelled


def test_job_gone_cancels_the_legacy_poster():
    class Gone(FakeClient):
        def send_legacy(self, *args):
            raise JobGone("lease expired", status=410)

    poster = LegacyPoster("j1", Gone())
    poster.add("a")
    assert poster.cancelled


def test_models_come_from_the_backend_and_are_refreshed():
    backend = FakeBackend(models=("sim",))
    client = FakeClient()
    worker = Worker(AgentConfig("agt_test", "s", poll_interval=0.005), client, backend)
    worker.models_refresh = 0.05
    thread = threading.Thread(target=worker.work, daemon=True)
    thread.start()
    try:
        wait_until(lambda: client.polls, message="a first poll")
        assert client.polls[0][0] == ["sim"]
        backend.available = ["sim", "llama3"]
        wait_until(lambda: client.polls[-1][0] == ["sim", "llama3"], message="the new model declared")
    finally:
        worker.request_stop()
        thread.join(10)


def test_configured_models_are_declared_as_given(run_worker):
    client = FakeClient()
    run_worker(client, FakeBackend(models=("sim",)), models=("sim", "ghost"))
    wait_until(lambda: client.polls, message="a first poll")
    assert client.polls[0] == (["sim", "ghost"], 1)


def test_a_long_poll_asks_the_server_to_hold_it(run_worker):
    waits: list[float] = []

    class LongPolled(FakeClient):
        def poll(self, models, slots, wait=0, kinds=None):
            waits.append(wait)
            return super().poll(models, slots, wait, kinds)

    run_worker(LongPolled(job("j1")), long_poll=20)
    wait_until(lambda: len(waits) >= 2, message="two polls")
    assert set(waits) == {20}
