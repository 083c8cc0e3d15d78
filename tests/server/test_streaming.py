"""The streaming engine in-process: intake (server/frontdoor.py), following a job (server/streaming.py),
disconnects (server/disconnect.py).

The agent is played through the storage functions the inference endpoints call (their writes wake the streams);
tests/e2e/test_chat_live.py drives the same paths through gunicorn and real sockets.
"""
from __future__ import annotations

import threading
import time
from unittest import mock

import pytest

from devtools.processes import wait_until
from server import frontdoor, streaming
from server.disconnect import DisconnectGuard, open_streams
from server.errors import BadRequest, NotFound
from server.notifier import ANY_MODEL_KEY, job_key, queue_key
from server.storage import StorageError, agents, chunks, get_storage, jobs
from server.streaming import ChunkEvent, DoneEvent, ErrorEvent, KeepaliveEvent, StatusEvent

pytestmark = pytest.mark.engines("sqlite", "postgres")

MODEL = "m"
MESSAGES = [{"role": "user", "content": "hi"}]
ANY_MESSAGE = mock.ANY


class FakeAgent:
    """Claims and posts through the same storage calls as server/inference.py."""

    def __init__(self, app, db, creds) -> None:
        self.app, self.db, self.id = app, db, creds.id

    def claim(self) -> str:
        return jobs.claim_job(self.db, self.id, [MODEL], time.time(), 5.0, 30.0).id

    def post(self, request_id: str, texts: list[str], done: bool = False, **kwargs) -> chunks.Appended:
        return chunks.append_chunks(self.db, self.id, request_id, None, texts, done, time.time(), 30.0, **kwargs)


@pytest.fixture
def agent(app, dbconn, agent_creds) -> FakeAgent:
    agents.touch(dbconn, agent_creds.id, time.time(), [MODEL])
    return FakeAgent(app, dbconn, agent_creds)


def start(app, dbconn, model: str = MODEL) -> str:
    return frontdoor.start_chat(dbconn, app.config, model, MESSAGES, {})


def collect(events) -> list:
    """Every event up to and including the final one."""
    out = []
    for event in events:
        out.append(event)
        if isinstance(event, (DoneEvent, ErrorEvent)):
            break
    return out


def when_parked(app, request_id: str, action) -> threading.Thread:
    """Run ``action`` in a thread once a stream waits on the request's notifier key."""
    def run() -> None:
        wait_until(lambda: get_storage(app).notifier.waiting(job_key(request_id)), message="a parked stream")
        action()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


# --- validation -----------------------------------------------------------

def test_validate_chat_keeps_role_and_content_and_defaults_options():
    body = {"model": "llama3", "messages": [{"role": "system", "content": "", "name": "x"},
                                            {"role": "user", "content": "héllo 👋"}], "stream": True}
    assert frontdoor.validate_chat(body) == (
        "llama3", [{"role": "system", "content": ""}, {"role": "user", "content": "héllo 👋"}], {})
    assert frontdoor.validate_chat(body | {"options": {"temperature": 0}})[2] == {"temperature": 0}


@pytest.mark.parametrize("body", [
    {"messages": MESSAGES},
    {"model": "", "messages": MESSAGES},
    {"model": "  ", "messages": MESSAGES},
    {"model": 7, "messages": MESSAGES},
    {"model": "m"},
    {"model": "m", "messages": []},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": ["hi"]},
    {"model": "m", "messages": [{"role": "user"}]},
    {"model": "m", "messages": [{"content": "hi"}]},
    {"model": "m", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": 3}]},
    {"model": "m", "messages": [{"role": "user", "content": ["hi"]}]},
    {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
    {"model": "m", "messages": MESSAGES, "options": [1]},
])
def test_validate_chat_rejects(body):
    with pytest.raises(BadRequest):
        frontdoor.validate_chat(body)


# --- starting -------------------------------------------------------------

def test_start_chat_queues_and_wakes_long_polls(app, dbconn, agent):
    notifier = get_storage(app).notifier
    before = notifier.version(queue_key(MODEL)), notifier.version(ANY_MODEL_KEY)
    request_id = start(app, dbconn)
    assert jobs.get_job(dbconn, request_id)["status"] == "queued"
    assert (notifier.version(queue_key(MODEL)), notifier.version(ANY_MODEL_KEY)) > before


@pytest.mark.parametrize("models, seen_ago, model", [
    ([MODEL], 3600, MODEL),           # offline
    (["other"], 0, MODEL),            # serves another model
])
def test_start_chat_needs_an_online_agent_for_the_model(app, dbconn, agent_creds, models, seen_ago, model):
    agents.touch(dbconn, agent_creds.id, time.time() - seen_ago, models)
    with pytest.raises(NotFound) as info:
        start(app, dbconn, model)
    assert info.value.code == "model_not_found"
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_agent_declaring_no_models_serves_any(app, dbconn, agent_creds):
    agents.touch(dbconn, agent_creds.id, time.time())
    assert start(app, dbconn, "anything")


# --- following ------------------------------------------------------------

def test_follow_sends_chunks_live_in_order_then_done(app, dbconn, agent):
    request_id = start(app, dbconn)

    def answer() -> None:
        agent.claim()
        agent.post(request_id, ["Hel", "lo"])
        agent.post(request_id, [" 👩\u200d", "💻"])
        agent.post(request_id, ["e", "\u0301"], done=True, stats={"eval_count": 6})

    thread = when_parked(app, request_id, answer)
    events = collect(streaming.follow(app, request_id))
    thread.join()
    assert events == [ChunkEvent(0, "Hel"), ChunkEvent(1, "lo"), ChunkEvent(2, " 👩\u200d"), ChunkEvent(3, "💻"),
                      ChunkEvent(4, "e"), ChunkEvent(5, "\u0301"), DoneEvent({"eval_count": 6})]


def test_follow_after_seq_replays_only_the_rest(app, dbconn, agent):
    request_id = start(app, dbconn)
    agent.claim()
    agent.post(request_id, ["a", "b", "c"], done=True)
    assert collect(streaming.follow(app, request_id, 1)) == [ChunkEvent(2, "c"), DoneEvent(None)]
    assert collect(streaming.follow(app, request_id, 2)) == [DoneEvent(None)]


def test_status_events_report_queue_position_then_assignment(app, dbconn, agent):
    start(app, dbconn)
    request_id = start(app, dbconn)
    events = streaming.follow(app, request_id, status_events=True)
    assert next(events) == StatusEvent("queued", 2)
    agent.claim()            # the older request
    agent.claim()
    thread = when_parked(app, request_id, lambda: agent.post(request_id, ["x"], done=True))
    assert collect(events) == [StatusEvent("assigned"), ChunkEvent(0, "x"), DoneEvent(None)]
    thread.join()


def test_status_events_are_off_by_default(app, dbconn, agent):
    request_id = start(app, dbconn)
    agent.claim()
    agent.post(request_id, ["x"], done=True)
    assert collect(streaming.follow(app, request_id)) == [ChunkEvent(0, "x"), DoneEvent(None)]


def test_keepalive_after_silence(app, dbconn, agent):
    app.config["KEEPALIVE_SECONDS"] = 0.05
    request_id = start(app, dbconn)
    events = streaming.follow(app, request_id)
    assert next(events) == KeepaliveEvent()
    assert next(events) == KeepaliveEvent()
    agent.claim()
    agent.post(request_id, ["x"], done=True)
    assert [e for e in collect(events) if not isinstance(e, KeepaliveEvent)] == [ChunkEvent(0, "x"), DoneEvent(None)]


def _fail_queue(app, dbconn, agent, request_id):
    app.extensions["sweeper"].sweep(dbconn, now=time.time() + app.config["QUEUE_TIMEOUT"] + 1)


def _lose_agent(app, dbconn, agent, request_id):
    agent.claim()
    agent.post(request_id, ["half"])
    app.extensions["sweeper"].sweep(dbconn, now=time.time() + 3600)


def _agent_error(app, dbconn, agent, request_id):
    agent.claim()
    agent.post(request_id, ["half"])
    agent.post(request_id, [], done=True, error="model 'm' not found, try pulling it first")


def _exhaust_attempts(app, dbconn, agent, request_id):
    for _ in range(app.config["MAX_ATTEMPTS"]):
        agent.claim()    # and never posts: the delivery lease runs out
        app.extensions["sweeper"].sweep(dbconn, now=time.time() + app.config["DELIVERY_LEASE_SECONDS"] + 1)


def _cancel(app, dbconn, agent, request_id):
    jobs.cancel_job(dbconn, request_id, time.time())


@pytest.mark.parametrize("fail, code", [
    (_fail_queue, "queue_timeout"), (_lose_agent, "agent_lost"), (_agent_error, "agent_error"),
    (_exhaust_attempts, "attempts_exhausted"), (_cancel, "cancelled"),
])
def test_every_failure_ends_the_stream_with_one_error(app, dbconn, agent, fail, code):
    request_id = start(app, dbconn)
    thread = when_parked(app, request_id, lambda: fail(app, dbconn, agent, request_id))
    events = collect(streaming.follow(app, request_id))
    thread.join()
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == code and events[-1].message
    assert all(isinstance(e, ChunkEvent) for e in events[:-1])


def test_server_shutdown_ends_a_waiting_stream_with_an_error(app, dbconn, agent):
    request_id = start(app, dbconn)
    thread = when_parked(app, request_id, get_storage(app).notifier.close)
    events = collect(streaming.follow(app, request_id))
    thread.join()
    assert events == [ErrorEvent("server_shutting_down", events[0].message)]
    assert "Last-Event-ID" in events[0].message


def test_waiting_stream_holds_no_transaction(app, dbconn, agent, loans):
    app.config["KEEPALIVE_SECONDS"] = 0.05
    request_id = start(app, dbconn)
    events = streaming.follow(app, request_id)
    assert next(events) == KeepaliveEvent()          # it read, then waited
    assert loans.taken and not loans.out and loans.returned_in_transaction == 0
    agent.claim()
    agent.post(request_id, ["x"], done=True)          # a writer is not blocked
    assert collect(events)[-1] == DoneEvent(None)


def test_finished_streams_leave_no_state_behind(app, dbconn, agent):
    notifier = get_storage(app).notifier
    for _ in range(3):
        request_id = start(app, dbconn)
        agent.claim()
        agent.post(request_id, ["x"], done=True)
        stream = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
        assert collect(stream)[-1] == DoneEvent(None)
        stream.close()
    assert len(open_streams(app)) == 0
    assert notifier.waiting(job_key(request_id)) == 0
    notifier.prune(idle_seconds=0)
    assert notifier.keys() == 0


# --- clients going away ---------------------------------------------------

def client_left_at(dbconn, request_id):
    return jobs.get_job(dbconn, request_id)["client_left_at"]


def test_client_leaving_records_the_time_and_the_sweeper_cancels_after_grace(app, dbconn, agent):
    request_id = start(app, dbconn)
    stream = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
    stream.close()
    assert client_left_at(dbconn, request_id) is not None
    app.extensions["sweeper"].sweep(dbconn, now=time.time() + app.config["CANCEL_GRACE"] + 1)
    assert jobs.get_job(dbconn, request_id)["status"] == "cancelled"


def test_resume_clears_client_left(app, dbconn, agent):
    request_id = start(app, dbconn)
    DisconnectGuard(app, request_id, streaming.follow(app, request_id)).close()
    resumed = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
    assert client_left_at(dbconn, request_id) is None
    app.extensions["sweeper"].sweep(dbconn, now=time.time() + app.config["CANCEL_GRACE"] + 1)
    assert jobs.get_job(dbconn, request_id)["status"] == "queued"
    resumed.close()


def test_another_open_stream_keeps_the_request_alive(app, dbconn, agent):
    app.config["CANCEL_GRACE"] = 0
    request_id = start(app, dbconn)
    first = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
    second = DisconnectGuard(app, request_id, streaming.follow(app, request_id, 5))
    first.close()
    assert jobs.get_job(dbconn, request_id)["status"] == "queued"
    second.close()
    assert jobs.get_job(dbconn, request_id)["status"] == "cancelled"


def test_grace_zero_cancels_a_running_job_at_its_next_post(app, dbconn, agent):
    app.config["CANCEL_GRACE"] = 0
    request_id = start(app, dbconn)
    agent.claim()
    agent.post(request_id, ["a"])
    stream = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
    assert next(stream) == ChunkEvent(0, "a")
    stream.close()
    assert agent.post(request_id, ["b"]).cancelled
    assert jobs.get_job(dbconn, request_id)["status"] == "cancelled"


def test_stream_closed_after_its_final_event_cancels_nothing(app, dbconn, agent):
    app.config["CANCEL_GRACE"] = 0
    request_id = start(app, dbconn)
    agent.claim()
    agent.post(request_id, ["a"], done=True)
    stream = DisconnectGuard(app, request_id, streaming.follow(app, request_id))
    assert collect(stream)[-1] == DoneEvent(None)
    stream.close()
    assert client_left_at(dbconn, request_id) is None
    assert jobs.get_job(dbconn, request_id)["status"] == "done"


def test_unreadable_database_ends_the_stream_with_an_error(app, dbconn, agent, monkeypatch):
    request_id = start(app, dbconn)

    def locked(*args):
        raise StorageError("SQLite: database is locked")

    monkeypatch.setattr(jobs, "progress", locked)
    assert collect(streaming.follow(app, request_id)) == [ErrorEvent("storage_unavailable", ANY_MESSAGE)]


def test_request_deleted_under_a_stream_ends_it_with_an_error(app, dbconn, agent):
    request_id = start(app, dbconn)
    events = streaming.follow(app, request_id, status_events=True)
    assert next(events) == StatusEvent("queued", 1)
    thread = when_parked(app, request_id, lambda: (
        dbconn.execute("DELETE FROM jobs WHERE id = ?", (request_id,)),
        get_storage(app).notifier.notify(job_key(request_id))))
    assert collect(events) == [ErrorEvent("not_found", ANY_MESSAGE)]
    thread.join()
