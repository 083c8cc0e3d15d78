"""Faults survived, nothing lost: agents, the server and Ollama killed, a network that resets connections.

Everything is a real process: gunicorn with the gevent worker, `python -m agent`
subprocesses and the Ollama simulator, whose tokens `expected` predicts.  An
answer is checked where the user sees it (the SSE stream) and where it is kept
(the database, through `GET /api/v1/chat/<id>`).
"""
from __future__ import annotations

import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from devtools.processes import LiveServer, start_simulator, wait_until
from server.storage import migrated
from tests.e2e.chat_client import Answer, EventStream, chat, expected, start_chat
from tests.e2e.flaky_proxy import Fate, FlakyProxy
from tests.signed import sign

pytestmark = pytest.mark.engines("sqlite", "postgres")

# Leases short enough that a lost agent is noticed within a test, swept five times a second.
FAST_LEASES = {"ORCH_LEASE_SECONDS": 2, "ORCH_DELIVERY_LEASE_SECONDS": 2, "ORCH_SWEEP_INTERVAL": 0.2}
# The promise is lease + 1 s (3 s here); the rest is slack for a loaded 2-core machine.
AGENT_LOST_DEADLINE = 12.0


def rows(server: LiveServer, sql: str, *params) -> list[tuple]:
    """Query the server's database directly (it may be down)."""
    with migrated(server.database) as db:
        return db.execute(sql, params).fetchall()


def stored(server: LiveServer, request_id: str) -> dict:
    """The request as `GET /api/v1/chat/<id>` reports it: status, text, error."""
    response = requests.get(f"{server.url}/api/v1/chat/{request_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def stand_in_agent(server: LiveServer, model: str) -> None:
    """An agent online for ``model`` that takes no job (``slots=0``): chats for it stay queued."""
    creds = server.add_agent("stand-in-" + model)
    path = f"/api/v1/inference/poll?models={model}&slots=0"
    assert requests.get(server.url + path, headers=sign(creds, "GET", path), timeout=10).status_code == 204


def read_within(events: EventStream, seconds: float) -> Answer:
    """The rest of the stream; fails if it has not ended (or broken off) within ``seconds``."""
    reader = threading.Thread(target=events.read, daemon=True)
    reader.start()
    reader.join(seconds)
    assert not reader.is_alive(), f"the stream was still open {seconds:g} s later"
    return events.answer


def sim_records(sim, tag: str) -> dict[int, list[dict]]:
    """The simulator's records of the /api/chat calls tagged ``tag``, by its request number."""
    records = sim.records()
    reqs = [r["req"] for r in records if r["event"] == "start" and r.get("tag") == tag]
    return {req: [r for r in records if r["req"] == req] for req in reqs}


# --- agents killed --------------------------------------------------------------

def test_agent_killed_before_its_first_token_gives_the_job_back_and_another_agent_answers_it_once(
        live_server_factory, simulator, start_agent):
    server = live_server_factory(**FAST_LEASES)
    first = start_agent(server, simulator.url, "first")
    # A slow first token holds the job between the agent's acknowledgement and its first chunk.
    options = {"sim_tokens": 20, "sim_first_token_ms": 3000, "sim_tag": "requeued"}
    with start_chat(server, "who answers?", **options) as response:
        wait_until(lambda: sim_records(simulator, "requeued"), 15, message="the first agent calling Ollama")
        first.stop(signal.SIGKILL)
        second = start_agent(server, simulator.url, "second")
        answer = EventStream(response).read()
    assert answer.done, answer.error
    assert answer.ids == list(range(20)) and answer.text == expected("who answers?", 20)
    record = stored(server, answer.request_id)
    assert (record["status"], record["text"], record["agent"]["id"]) == ("done", answer.text, second.creds.id)
    assert rows(server, "SELECT attempts FROM jobs WHERE id = ?", answer.request_id) == [(2,)]

    # Ollama saw the first agent go before it sent a token, then served the second once.
    def both_calls_ended() -> list[list[tuple]]:
        calls = [[(r["event"], r.get("i")) for r in call if r["event"] != "start"]
                 for call in sim_records(simulator, "requeued").values()]
        return len(calls) == 2 and all(call and call[-1][0] in ("done", "client_gone") for call in calls) and calls

    calls = wait_until(both_calls_ended, 10, message="both /api/chat calls ended in the simulator's log")
    assert calls == [[("client_gone", 0)], [("token", i) for i in range(20)] + [("done", None)]]


def test_agent_killed_mid_answer_ends_the_stream_with_agent_lost_before_the_deadline(
        live_server_factory, simulator, start_agent):
    server = live_server_factory(**FAST_LEASES)
    agent = start_agent(server, simulator.url)
    with start_chat(server, "a long story", sim_tokens=5000, sim_interval_ms=20) as response:
        events = EventStream(response)
        events.read(stop_after=5)
        agent.stop(signal.SIGKILL)
        answer = read_within(events, AGENT_LOST_DEADLINE)
    assert answer.error == {"code": "agent_lost", "message": "the agent stopped responding mid-answer"}
    # The user kept every chunk that was stored, in order, and nothing else.
    record = stored(server, answer.request_id)
    assert record["status"] == "failed" and record["text"] == answer.text
    assert answer.ids == list(range(len(answer.ids))) and answer.text == expected("a long story", len(answer.ids))
    # A client that comes back later gets the same chunks and the same end at once.
    with requests.get(f"{server.url}/api/v1/chat/stream/{answer.request_id}", stream=True, timeout=10) as again:
        replay = read_within(EventStream(again), 10)
    assert (replay.ids, replay.text, replay.error) == (answer.ids, answer.text, answer.error)


# --- the server killed ------------------------------------------------------------

@pytest.fixture
def two_model_simulator(tmp_path):
    """The simulator serving "sim" and "other", with the timing of conftest's `simulator`."""
    sim = start_simulator(tmp_path, "--models", "sim,other", "--first-token-ms", "20", "--interval-ms", "5",
                          "--tokens", "30")
    yield sim
    sim.stop()


# What an agent's log says once it has noticed the server is gone, by transport.
OUTAGE_NOTICED = {"http": " failed (", "ws": "WebSocket closed"}


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_server_killed_mid_answer_and_restarted_on_its_database_loses_duplicates_and_forgets_nothing(
        live_server, two_model_simulator, start_agent, transport):
    agent = start_agent(live_server, two_model_simulator.url, MODELS="sim", TRANSPORT=transport)
    stand_in_agent(live_server, "other")
    waiting = [start_chat(live_server, f"queued {i}", "other") for i in range(3)]
    queued = [r.headers["X-Request-Id"] for r in waiting]
    tokens = 100
    with start_chat(live_server, "survive this", sim_tokens=tokens, sim_interval_ms=20) as response:
        before = EventStream(response).read(stop_after=5)
        live_server.kill()
    for waiter in waiting:
        waiter.close()
    request_id = before.request_id
    assert rows(live_server, "SELECT next_seq FROM jobs WHERE id = ?", request_id)[0][0] < tokens
    wait_until(lambda: OUTAGE_NOTICED[transport] in agent.log(), 15, message="the agent noticing the dead server")
    live_server.start()

    # Resuming from the last chunk seen brings exactly the missing ones, then [DONE].
    resumed = requests.get(f"{live_server.url}/api/v1/chat/stream/{request_id}", stream=True, timeout=(5, 60),
                           headers={"Last-Event-ID": str(before.ids[-1])})
    with resumed:
        after = EventStream(resumed).read()
    assert after.done, after.error
    assert before.ids == list(range(5)) and after.ids == list(range(5, tokens))
    assert before.text + after.text == expected("survive this", tokens)
    # What the agent retried after the restart is stored once: the kept answer is the simulator's, byte for byte.
    record = stored(live_server, request_id)
    assert record["status"] == "done" and record["text"].encode() == expected("survive this", tokens).encode()
    assert rows(live_server, "SELECT count(*), max(seq) FROM chunks WHERE job_id = ?", request_id) == [
        (tokens, tokens - 1)]
    assert rows(live_server, "SELECT attempts FROM jobs WHERE id = ?", request_id) == [(1,)]
    if transport == "ws":   # it reconnected and went on from the server's next_seq, on the same job
        assert "resending 1 job(s) from their last acknowledged token" in agent.log(), agent.log_path

    # The chats that were queued are still queued, in their order, and are answered once an agent comes.
    assert [stored(live_server, q)["status"] for q in queued] == ["queued"] * 3
    assert [r[0] for r in rows(live_server, "SELECT id FROM jobs WHERE status = 'queued'"
                                            " ORDER BY created_at")] == queued
    start_agent(live_server, two_model_simulator.url, "later", MODELS="other")
    for i, request_id in enumerate(queued):
        with requests.get(f"{live_server.url}/api/v1/chat/stream/{request_id}", stream=True, timeout=(5, 60)) as r:
            answer = EventStream(r).read()
        assert answer.done and answer.text == expected(f"queued {i}", 30, "other"), answer.error


# --- a flaky network ------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["http", "ws"])
def test_a_network_resetting_one_exchange_in_ten_between_agents_and_server_loses_and_duplicates_nothing(
        live_server_factory, simulator, start_agent, transport):
    # A poll whose reply was lost hands out a job nobody acknowledges: a short delivery lease requeues it,
    # and each loss costs an attempt: more than 3 keeps the attempt cap out of this test.
    server = live_server_factory(ORCH_DELIVERY_LEASE_SECONDS=2, ORCH_SWEEP_INTERVAL=0.2, ORCH_MAX_ATTEMPTS=10)
    tokens, count = 40, 16
    with FlakyProxy(server.url, reset_rate=0.1, seed=7).start() as proxy:
        for name in ("one", "two"):
            start_agent(server, simulator.url, name, API_BASE=proxy.url, MAX_JOBS=4, TRANSPORT=transport)
        # Tokens 20 ms apart go out about one a POST (a frame): hundreds, so resets surely hit both sides of a commit.
        with ThreadPoolExecutor(count) as users:
            answers = list(users.map(lambda i: chat(server, f"flaky {i}", sim_tokens=tokens, sim_interval_ms=20),
                                     range(count)))
        resets = list(proxy.resets)
    for i, answer in enumerate(answers):
        assert answer.done, (i, answer.error)
        assert answer.ids == list(range(tokens)) and answer.text == expected(f"flaky {i}", tokens), i
        record = stored(server, answer.request_id)
        assert record["status"] == "done" and record["text"].encode() == answer.text.encode(), i
    if transport == "http":
        # The network really did lose chunk POSTs the server had stored, and POSTs it never saw.
        cut = Counter(r.fate for r in resets if r.request_line.startswith("POST /api/v1/inference/stream "))
    else:
        # Sockets were reset mid-answer (an exchange is the frames sent until the server's next frame), after
        # frames the server stored and before frames it saw: the agents reconnected and resent what was unacked.
        cut = Counter(r.fate for r in resets if not r.request_line.startswith("GET /api/v1/agents/connect "))
    assert cut[Fate.AFTER_REQUEST] and cut[Fate.BEFORE_REQUEST], resets


def test_a_job_handed_back_to_the_agent_still_running_it_is_not_run_twice(live_server_factory, simulator, start_agent):
    # The agent's acknowledgements are reset until its delivery lease runs out: the job goes back to the queue
    # and, the agent having a free slot, to the same agent again, whose first run still holds it.  The lease
    # outlasts the acknowledgement's retry back-off (2 s at most), so that run gets through once the network is back.
    server = live_server_factory(ORCH_DELIVERY_LEASE_SECONDS=4, ORCH_SWEEP_INTERVAL=0.2, ORCH_MAX_ATTEMPTS=10)
    with FlakyProxy(server.url, reset_rate=0).start() as proxy:
        agent = start_agent(server, simulator.url, API_BASE=proxy.url, MAX_JOBS=2, TRANSPORT="http")
        proxy.refuse("POST /api/v1/inference/stream ")
        with start_chat(server, "only once") as response:
            wait_until(lambda: rows(server, "SELECT attempts FROM jobs") == [(2,)], 20,
                       message="the job handed to the same agent a second time")
            proxy.refuse(None)
            answer = EventStream(response).read()
        assert answer.done and answer.text == expected("only once", 30), answer.error

        def runs() -> str:
            """The agent's log lines about this job as "start" and "end", in order."""
            lines = [line for line in agent.log().splitlines() if f" job {answer.request_id} " in line]
            return " ".join("start" if " started (" in line else "end" for line in lines
                            if " started (" in line or " after " in line)

        wait_until(lambda: runs().endswith("end"), 10, message="the agent's summary of the job")
    assert "start start" not in runs(), (runs(), agent.log_path)


# --- Ollama failing ---------------------------------------------------------------------

def test_ollama_killed_mid_answer_ends_the_chat_with_an_error_and_the_agent_serves_again_once_it_is_back(
        live_server, simulator, start_agent, tmp_path):
    agent = start_agent(live_server, simulator.url, MODELS="sim")
    with start_chat(live_server, "cut short", sim_tokens=5000, sim_interval_ms=20) as response:
        events = EventStream(response)
        events.read(stop_after=3)
        simulator.proc.kill()
        simulator.proc.wait(10)
        answer = read_within(events, 30)
    assert answer.error["code"] == "agent_error", answer.error
    assert answer.error["message"].startswith("the connection to Ollama was lost after")
    assert answer.text == expected("cut short", len(answer.ids))

    # While Ollama is down, a chat fails at once with the reason instead of hanging.
    down = chat(live_server, "anyone there?")
    assert down.error["code"] == "agent_error" and "is not reachable" in down.error["message"], down.error

    # Ollama restarts on its port (the fixture's settings): the same agent process serves the next chat.
    revived = start_simulator(tmp_path, "--port", str(urlsplit(simulator.url).port), "--first-token-ms", "20",
                              "--interval-ms", "5", "--tokens", "30")
    try:
        back = chat(live_server, "and now?")
    finally:
        revived.stop()
    assert back.done and back.text == expected("and now?", 30), back.error
    assert agent.proc.poll() is None and "Traceback" not in agent.log()


# --- many agents ------------------------------------------------------------------------

def test_twenty_agents_answer_two_hundred_queued_chats_each_exactly_once(live_server, simulator, start_agent):
    """Answered once: every stream ends with [DONE] after chunks 0-4 of its own prompt's answer, every
    request was handed out once (attempts 1) and stored its 5 chunks, Ollama got one /api/chat per
    chat, and the agents count 200 jobs done between them."""
    tokens, count = 5, 200
    stand_in_agent(live_server, "sim")      # so the chats are accepted before any real agent exists
    options = {"sim_tokens": tokens, "sim_interval_ms": 1}
    responses = [start_chat(live_server, f"question {i}", sim_tag=f"q{i}", **options) for i in range(count)]
    assert rows(live_server, "SELECT count(*) FROM jobs WHERE status = 'queued'") == [(count,)]
    with ThreadPoolExecutor(count) as users:
        reading = [users.submit(lambda r=r: EventStream(r).read()) for r in responses]
        with ThreadPoolExecutor(20) as launcher:
            list(launcher.map(lambda n: start_agent(live_server, simulator.url, f"gpu-{n}", LONG_POLL=5), range(20)))
        answers = [future.result(60) for future in reading]
    for response in responses:
        response.close()

    for i, answer in enumerate(answers):
        assert answer.done and answer.ids == list(range(tokens)), (i, answer)
        assert answer.text == expected(f"question {i}", tokens), i
    # The database holds these 200 requests and nothing else.
    assert rows(live_server, "SELECT status, attempts, next_seq, count(*) FROM jobs GROUP BY 1, 2, 3") == [
        ("done", 1, tokens, count)]
    assert rows(live_server, "SELECT count(*) FROM chunks") == [(count * tokens,)]
    assert rows(live_server, "SELECT sum(jobs_done) FROM agents") == [(count,)]
    starts = Counter(r.get("tag") for r in simulator.records() if r["event"] == "start")
    assert starts == Counter({f"q{i}": 1 for i in range(count)})
