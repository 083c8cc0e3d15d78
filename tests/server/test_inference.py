"""The agent protocol against the app in-process: signatures, poll, stream, leases, bad input."""
from __future__ import annotations

import json
import time

import pytest

from devtools.processes import wait_until
from server.notifier import job_key, queue_key
from server.storage import agents, chunks, get_storage, jobs, migrated
from tests.signed import BackgroundPoll, agent_get, agent_post, parked, sign

pytestmark = pytest.mark.engines("sqlite", "postgres")

POLL = "/api/v1/inference/poll"
STREAM = "/api/v1/inference/stream"
HELLO = [{"role": "user", "content": "hello"}]


def queue(app, db, model="llama") -> str:
    """Queue a job as this app's chat endpoint would: its commit wakes a parked poll."""
    return jobs.create_job(db, model, HELLO, {"temperature": 0}, time.time())


def queue_elsewhere(app, model="llama") -> str:
    """Queue a job through a storage of its own, as another worker process would: nothing here is woken."""
    with migrated(app.config["DATABASE"]) as conn:
        return jobs.create_job(conn, model, HELLO, {"temperature": 0}, time.time())


def request_record(db, job_id) -> dict:
    return jobs.get_job(db, job_id)


def stored(db, job_id) -> list[str]:
    return [text for _, text in chunks.chunks_after(db, job_id, -1)]


def post_raw(client, creds, body: bytes, content_type="application/json"):
    return client.post(STREAM, data=body, headers=sign(creds, "POST", STREAM, body) | {"Content-Type": content_type})


def error_code(response) -> str:
    return response.get_json()["error"]["code"]


def sweep(app, db, after: float):
    return app.extensions["sweeper"].sweep(db, now=time.time() + after)


@pytest.fixture
def other_creds(dbconn):
    return agents.add_agent(dbconn, "other-agent")


@pytest.fixture
def running_job(app, client, dbconn, agent_creds) -> str:
    """A job ``agent_creds`` polled and acknowledged."""
    job_id = queue(app, dbconn)
    assert agent_get(client, agent_creds, POLL).get_json()["id"] == job_id
    assert agent_post(client, agent_creds, STREAM, {"id": job_id, "chunks": [], "seq": 0}).status_code == 200
    return job_id


# --- signatures -------------------------------------------------------------

@pytest.mark.parametrize("missing", ["X-Agent-Id", "X-Agent-Timestamp", "X-Agent-Signature"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_request_missing_a_signature_header_is_401(client, agent_creds, missing, method):
    path = POLL if method == "GET" else STREAM
    headers = sign(agent_creds, method, path, b"{}")
    del headers[missing]
    response = client.open(path, method=method, data=b"{}", headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 401
    assert error_code(response) == "missing_signature"


def test_unknown_agent_is_401(client, agent_creds):
    stranger = agents.AgentCredentials("agt_unknown", agent_creds.secret)
    response = agent_get(client, stranger, POLL)
    assert (response.status_code, error_code(response)) == (401, "bad_signature")


def test_removed_agent_is_401(client, dbconn, agent_creds):
    assert agent_get(client, agent_creds, POLL).status_code == 204
    agents.remove_agent(dbconn, agent_creds.id)
    assert agent_get(client, agent_creds, POLL).status_code == 401


def test_wrong_secret_is_401(client, agent_creds):
    impostor = agents.AgentCredentials(agent_creds.id, "not-the-secret")
    assert agent_get(client, impostor, POLL).status_code == 401


def test_tampered_body_is_401_and_stores_nothing(client, dbconn, agent_creds, running_job):
    signed = json.dumps({"id": running_job, "chunks": ["a"], "seq": 0}).encode()
    sent = json.dumps({"id": running_job, "chunks": ["evil"], "seq": 0}).encode()
    headers = sign(agent_creds, "POST", STREAM, signed) | {"Content-Type": "application/json"}
    response = client.post(STREAM, data=sent, headers=headers)
    assert (response.status_code, error_code(response)) == (401, "bad_signature")
    assert stored(dbconn, running_job) == []


def test_tampered_query_is_401(client, agent_creds):
    headers = sign(agent_creds, "GET", POLL + "?models=llama")
    assert client.get(POLL + "?models=qwen", headers=headers).status_code == 401


@pytest.mark.parametrize("offset, status", [(-61, 401), (61, 401), (-55, 204), (55, 204)])
def test_timestamp_must_be_within_the_skew_of_the_server_clock(client, agent_creds, offset, status):
    headers = sign(agent_creds, "GET", POLL, timestamp=time.time() + offset)
    response = client.get(POLL, headers=headers)
    assert response.status_code == status
    if status == 401:
        assert error_code(response) == "stale_timestamp"
        assert "more than 60 s" in response.get_json()["error"]["message"]
        assert "ORCH_SIGNATURE_SKEW" in response.get_json()["error"]["message"]


@pytest.mark.parametrize("app_config", [{"SIGNATURE_SKEW": 5}])
def test_signature_skew_is_configurable(client, agent_creds):
    assert client.get(POLL, headers=sign(agent_creds, "GET", POLL, timestamp=time.time() - 10)).status_code == 401


def test_non_numeric_timestamp_is_401(client, agent_creds):
    headers = sign(agent_creds, "GET", POLL) | {"X-Agent-Timestamp": "yesterday"}
    assert error_code(client.get(POLL, headers=headers)) == "bad_timestamp"


# --- poll -------------------------------------------------------------------

def test_short_poll_without_jobs_answers_204_with_no_body(client, agent_creds):
    response = agent_get(client, agent_creds, POLL)
    assert (response.status_code, response.data) == (204, b"")


def test_poll_hands_out_the_job_as_json_and_wakes_its_stream(app, client, dbconn, agent_creds):
    job_id = queue(app, dbconn)
    version = get_storage(app).notifier.version(job_key(job_id))
    response = agent_get(client, agent_creds, POLL + "?models=llama&slots=2")
    assert response.status_code == 200
    assert response.get_json() == {"id": job_id, "model": "llama", "messages": HELLO,
                                   "options": {"temperature": 0}, "lease_seconds": 30.0}
    assert get_storage(app).notifier.version(job_key(job_id)) > version
    assert request_record(dbconn, job_id)["status"] == "delivered"


def test_poll_remembers_the_models_an_agent_declared(app, client, dbconn, agent_creds):
    assert agent_get(client, agent_creds, POLL + "?models=llama,mistral").status_code == 204
    queue(app, dbconn, "qwen")
    assert agent_get(client, agent_creds, POLL).status_code == 204
    mistral = queue(app, dbconn, "mistral")
    assert agent_get(client, agent_creds, POLL).get_json()["id"] == mistral
    listed = agents.list_agents(dbconn)[0]
    assert (listed["models"], listed["slots"]) == (["llama", "mistral"], 1)


def test_agent_that_never_declared_models_serves_any_model(app, client, dbconn, agent_creds):
    job_id = queue(app, dbconn, "anything:7b")
    assert agent_get(client, agent_creds, POLL).get_json()["id"] == job_id


def test_poll_with_no_free_slots_answers_204_at_once_and_takes_nothing(app, client, dbconn, agent_creds):
    job_id = queue(app, dbconn)
    assert agent_get(client, agent_creds, POLL + "?slots=0&wait=30").status_code == 204
    assert request_record(dbconn, job_id)["status"] == "queued"
    assert agents.list_agents(dbconn)[0]["slots"] == 0


def test_empty_models_list_answers_204_at_once_and_keeps_the_remembered_list(app, client, dbconn, agent_creds):
    agent_get(client, agent_creds, POLL + "?models=llama")
    job_id = queue(app, dbconn)
    assert agent_get(client, agent_creds, POLL + "?models=&wait=30").status_code == 204
    assert request_record(dbconn, job_id)["status"] == "queued"
    assert agents.list_agents(dbconn)[0]["models"] == ["llama"]


@pytest.mark.parametrize("query", [
    "wait=-1", "wait=soon", "wait=nan", "wait=inf", "slots=-1", "slots=1.5", "slots=many", "slots=1001",
    "models=" + "x" * 201, "models=llama%01", "models=" + ",".join(f"m{i}" for i in range(101)),
])
def test_malformed_poll_parameters_get_400(client, agent_creds, query):
    response = agent_get(client, agent_creds, f"{POLL}?{query}")
    assert (response.status_code, error_code(response)) == (400, "invalid_query")


def test_long_poll_answers_with_a_job_queued_while_it_waits(app, dbconn, agent_creds):
    poll = BackgroundPoll(app, agent_creds, "models=llama&wait=10")
    parked(app, queue_key("llama"))
    job_id = queue(app, dbconn, "llama")
    response = poll.result()
    assert (response.status_code, response.get_json()["id"]) == (200, job_id)


def test_long_poll_ignores_jobs_of_other_models(app, dbconn, agent_creds):
    poll = BackgroundPoll(app, agent_creds, "models=llama&wait=10")
    parked(app, queue_key("llama"))
    queue(app, dbconn, "qwen")
    parked(app, queue_key("llama"))      # woken by nothing, or re-parked
    llama = queue(app, dbconn, "llama")
    assert poll.result().get_json()["id"] == llama


def test_long_poll_ends_with_204_after_wait(app, client, agent_creds):
    assert agent_get(client, agent_creds, POLL + "?wait=0.2").status_code == 204


def test_long_poll_ends_with_204_when_the_server_shuts_down(app, agent_creds):
    poll = BackgroundPoll(app, agent_creds, "wait=10")
    parked(app)
    get_storage(app).notifier.close()
    assert poll.result().status_code == 204


def test_parked_long_poll_holds_no_database_connection(app, dbconn, agent_creds, loans):
    poll = BackgroundPoll(app, agent_creds, "wait=10")
    parked(app)
    assert loans.taken and not loans.out           # every connection the poll used is back in the pool
    assert loans.returned_in_transaction == 0
    job_id = queue(app, dbconn)
    assert poll.result().get_json()["id"] == job_id


def test_parked_poll_of_an_agent_removed_meanwhile_gets_401_and_takes_nothing(app, dbconn, agent_creds):
    poll = BackgroundPoll(app, agent_creds, "wait=10")
    parked(app)
    agents.remove_agent(dbconn, agent_creds.id)
    job_id = queue(app, dbconn)
    assert poll.result().status_code == 401
    assert request_record(dbconn, job_id)["status"] == "queued"


@pytest.mark.parametrize("app_config", [{"NOTIFIER": "poll", "POLL_INTERVAL": 0.02}])
def test_long_poll_in_poll_mode_finds_a_job_queued_by_another_process(app, dbconn, agent_creds):
    poll = BackgroundPoll(app, agent_creds, "wait=10")
    wait_until(lambda: agents.list_agents(dbconn)[0]["last_seen"], message="the poll to start")
    job_id = queue_elsewhere(app)
    assert poll.result().get_json()["id"] == job_id


def test_one_job_wakes_one_of_two_parked_polls_and_the_other_stays_parked(app, dbconn, agent_creds, other_creds):
    polls = [BackgroundPoll(app, creds, "wait=10") for creds in (agent_creds, other_creds)]
    parked(app, count=2)
    job_id = queue(app, dbconn)
    wait_until(lambda: any(p.response for p in polls), message="one poll to answer")
    parked(app, count=1)
    get_storage(app).notifier.close()
    assert sorted(p.result().status_code for p in polls) == [200, 204]
    assert request_record(dbconn, job_id)["attempts"] == 1


# --- stream -----------------------------------------------------------------

def test_batch_post_stores_its_chunks_and_replies_with_next_seq(client, dbconn, agent_creds, running_job):
    response = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["Hel", "lo"], "seq": 0,
                                                        "done": False})
    assert (response.status_code, response.get_json()) == (200, {"ok": True, "cancelled": False, "next_seq": 2})
    assert stored(dbconn, running_job) == ["Hel", "lo"]


def test_post_with_new_chunks_wakes_the_chat_stream(app, client, agent_creds, running_job):
    notifier = get_storage(app).notifier
    before = notifier.version(job_key(running_job))
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": [], "seq": 0})
    assert notifier.version(job_key(running_job)) == before        # a heartbeat changes nothing
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a"], "seq": 0})
    assert notifier.version(job_key(running_job)) == before + 1


def test_duplicate_post_stores_nothing_twice(client, dbconn, agent_creds, running_job):
    body = {"id": running_job, "chunks": ["a", "b"], "seq": 0, "done": False}
    agent_post(client, agent_creds, STREAM, body)
    response = agent_post(client, agent_creds, STREAM, body)
    assert (response.status_code, response.get_json()["next_seq"]) == (200, 2)
    assert stored(dbconn, running_job) == ["a", "b"]
    assert agents.list_agents(dbconn)[0]["tokens_streamed"] == 2


def test_post_that_leaves_a_gap_gets_409_with_the_expected_seq(client, dbconn, agent_creds, running_job):
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a"], "seq": 0})
    response = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["c"], "seq": 2})
    assert response.status_code == 409
    assert response.get_json()["error"] | {"message": ""} == {"code": "seq_gap", "message": "", "expected_seq": 1}
    assert stored(dbconn, running_job) == ["a"]


def test_legacy_single_chunk_posts_are_appended(client, dbconn, agent_creds, running_job):
    for chunk in ["Hel", "", "lo"]:
        reply = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunk": chunk, "done": False})
        assert reply.get_json()["ok"]
    reply = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunk": "", "done": True})
    assert reply.get_json() == {"ok": True, "cancelled": False, "next_seq": 2}
    assert stored(dbconn, running_job) == ["Hel", "lo"]
    assert request_record(dbconn, running_job)["status"] == "done"


def test_heartbeat_renews_the_lease(client, dbconn, agent_creds, running_job):
    before = request_record(dbconn, running_job)["lease_expires"]
    wait_until(lambda: time.time() > before - 30 + 0.01, message="the clock to move")
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": [], "seq": 0})
    assert request_record(dbconn, running_job)["lease_expires"] > before


def test_done_post_carries_the_last_chunks_and_the_stats(client, dbconn, agent_creds, running_job):
    stats = {"done_reason": "stop", "eval_count": 2, "eval_duration": 1_000_000, "unknown": "dropped"}
    reply = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a", "b"], "seq": 0,
                                                     "done": True, "stats": stats})
    assert reply.get_json()["next_seq"] == 2
    record = request_record(dbconn, running_job)
    assert (record["status"], record["stats"]) == ("done", {"done_reason": "stop", "eval_count": 2,
                                                            "eval_duration": 1_000_000})
    assert agents.list_agents(dbconn)[0]["jobs_done"] == 1


def test_done_with_an_error_fails_the_job_with_that_message(client, dbconn, agent_creds, running_job):
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": [], "seq": 0, "done": True,
                                             "error": "model 'llama' not found"})
    record = request_record(dbconn, running_job)
    assert (record["status"], record["error_code"], record["error_message"]) == \
        ("failed", "agent_error", "model 'llama' not found")


def test_post_after_the_user_left_replies_cancelled(app, client, dbconn, agent_creds, running_job):
    jobs.cancel_job(dbconn, running_job, time.time())
    reply = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a"], "seq": 0})
    assert reply.get_json()["cancelled"] is True
    assert request_record(dbconn, running_job)["status"] == "cancelled"


def test_post_for_another_agents_job_is_403(client, dbconn, other_creds, running_job):
    response = agent_post(client, other_creds, STREAM, {"id": running_job, "chunks": ["x"], "seq": 0})
    assert (response.status_code, error_code(response)) == (403, "not_your_job")
    assert stored(dbconn, running_job) == []


def test_post_for_an_unknown_job_is_404(client, agent_creds):
    response = agent_post(client, agent_creds, STREAM, {"id": "no-such-job", "chunks": ["x"], "seq": 0})
    assert (response.status_code, error_code(response)) == (404, "job_not_found")


# --- leases -----------------------------------------------------------------

def test_unacknowledged_job_goes_back_to_the_queue_and_to_another_agent(app, client, dbconn, agent_creds,
                                                                        other_creds):
    job_id = queue(app, dbconn)
    agent_get(client, agent_creds, POLL)                  # delivered, never acknowledged
    assert [e.outcome for e in sweep(app, dbconn, after=6)] == ["requeued"]
    assert agent_get(client, other_creds, POLL).get_json()["id"] == job_id
    response = agent_post(client, agent_creds, STREAM, {"id": job_id, "chunks": ["late"], "seq": 0})
    assert (response.status_code, error_code(response)) == (410, "lease_expired")
    assert agent_post(client, other_creds, STREAM, {"id": job_id, "chunks": ["a"], "seq": 0}).status_code == 200


def test_requeue_wakes_a_parked_long_poll(app, client, dbconn, agent_creds, other_creds):
    job_id = queue(app, dbconn)
    agent_get(client, agent_creds, POLL)
    poll = BackgroundPoll(app, other_creds, "wait=10")
    parked(app)
    sweep(app, dbconn, after=6)
    assert poll.result().get_json()["id"] == job_id


def test_running_job_without_chunks_is_requeued_when_its_lease_runs_out(app, client, dbconn, agent_creds,
                                                                        running_job):
    assert [e.outcome for e in sweep(app, dbconn, after=31)] == ["requeued"]
    assert request_record(dbconn, running_job)["status"] == "queued"
    assert agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": [], "seq": 0}).status_code == 410


def test_job_that_streamed_chunks_fails_as_agent_lost_when_its_lease_runs_out(app, client, dbconn, agent_creds,
                                                                              running_job):
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["half"], "seq": 0})
    assert [e.outcome for e in sweep(app, dbconn, after=31)] == ["failed"]
    record = request_record(dbconn, running_job)
    assert (record["status"], record["error_code"]) == ("failed", "agent_lost")
    response = agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["rest"], "seq": 1})
    assert (response.status_code, error_code(response)) == (410, "lease_expired")


def test_job_handed_out_three_times_without_an_answer_fails_clearly(app, client, dbconn, agent_creds):
    job_id = queue(app, dbconn)
    for attempt in range(1, 4):
        assert agent_get(client, agent_creds, POLL).get_json()["id"] == job_id
        sweep(app, dbconn, after=6 * attempt)
    record = request_record(dbconn, job_id)
    assert (record["status"], record["error_code"]) == ("failed", "attempts_exhausted")
    assert agent_get(client, agent_creds, POLL).status_code == 204


# --- bad input --------------------------------------------------------------

BAD_BODIES = [
    (b"not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"id": "JOB", "chunks": ["\xff\xfe"], "seq": 0}', "invalid_json"),
    (b'{"id": "JOB", "chunks": ["\\ud800"], "seq": 0}', "invalid_field"),
    (b'{"chunks": ["a"], "seq": 0}', "missing_field"),
    (b'{"id": 7, "chunks": ["a"], "seq": 0}', "invalid_field"),
    (b'{"id": "JOB", "chunks": "a", "seq": 0}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [1], "seq": 0}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [null], "seq": 0}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"]}', "missing_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": -1}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": 1.5}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": "0"}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": true}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": 0, "done": "yes"}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "seq": 0, "done": 1}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ["a"], "chunk": "a", "seq": 0}', "invalid_field"),
    (b'{"id": "JOB", "chunk": 5}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [], "seq": 0, "error": "boom"}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [], "seq": 0, "done": true, "error": 5}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [], "seq": 0, "done": true, "stats": "fast"}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [], "seq": 0, "done": true, "stats": {"eval_count": "many"}}', "invalid_field"),
    (b'{"id": "JOB", "chunks": [], "seq": 0, "done": true, "stats": {"eval_count": -1}}', "invalid_field"),
    (b'{"id": "JOB", "chunks": ' + b"[" * 40 + b"]" * 40 + b', "seq": 0}', "invalid_json"),
]


@pytest.mark.parametrize("raw, code", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_body_gets_400_and_leaves_the_job_untouched(client, dbconn, agent_creds, running_job, raw, code):
    before = request_record(dbconn, running_job)
    response = post_raw(client, agent_creds, raw.replace(b"JOB", running_job.encode()))
    assert (response.status_code, error_code(response)) == (400, code)
    assert request_record(dbconn, running_job) == before
    assert stored(dbconn, running_job) == []


def test_body_that_is_not_declared_json_gets_415(client, dbconn, agent_creds, running_job):
    body = json.dumps({"id": running_job, "chunks": ["a"], "seq": 0}).encode()
    response = post_raw(client, agent_creds, body, content_type="text/plain")
    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")
    assert stored(dbconn, running_job) == []


@pytest.mark.parametrize("app_config", [{"MAX_BODY_BYTES": 4096}])
def test_huge_body_gets_413_and_stores_nothing(client, dbconn, agent_creds, running_job):
    body = json.dumps({"id": running_job, "chunks": ["x" * 5000], "seq": 0}).encode()
    response = post_raw(client, agent_creds, body)
    assert (response.status_code, error_code(response)) == (413, "request_entity_too_large")
    assert stored(dbconn, running_job) == []


# --- presence and the operators' listing ------------------------------------

def test_posts_and_polls_keep_the_agent_online(client, dbconn, agent_creds, running_job):
    seen = agents.list_agents(dbconn)[0]["last_seen"]
    wait_until(lambda: time.time() > seen, message="the clock to move")
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a"], "seq": 0})
    assert agents.list_agents(dbconn)[0]["last_seen"] > seen


@pytest.mark.parametrize("app_config", [{"ADMIN_TOKEN": "op-token"}])
@pytest.mark.parametrize("authorization, status", [(None, 401), ("Bearer wrong", 401), ("Bearer op-token", 200)])
def test_agents_listing_needs_the_admin_token(client, authorization, status):
    headers = {"Authorization": authorization} if authorization else {}
    assert client.get("/api/v1/agents", headers=headers).status_code == status


def test_agents_listing_shows_presence_models_slots_and_work(client, dbconn, agent_creds, other_creds,
                                                             running_job):
    agent_get(client, agent_creds, POLL + "?models=llama&slots=3")
    agent_post(client, agent_creds, STREAM, {"id": running_job, "chunks": ["a", "b", "c"], "seq": 0, "done": True})
    listed = {a["name"]: a for a in client.get("/api/v1/agents").get_json()["agents"]}
    mine = listed["test-agent"]
    assert {k: mine[k] for k in ("online", "models", "slots", "jobs_done", "tokens_streamed", "tokens_per_second")} \
        == {"online": True, "models": ["llama"], "slots": 3, "jobs_done": 1, "tokens_streamed": 3,
            "tokens_per_second": 0.05}
    assert (listed["other-agent"]["online"], listed["other-agent"]["last_seen"]) == (False, None)
    assert "secret" not in mine
