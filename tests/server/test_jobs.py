"""The job queue in SQLite: claiming, chunk batches, holders and leases (server/storage/jobs.py, chunks.py, leases.py, agents.py)."""
from __future__ import annotations

import threading

import pytest

from server.errors import Conflict, Forbidden, Gone, NotFound
from server.storage import agents, chunks, get_storage, jobs, leases

pytestmark = pytest.mark.engines("sqlite", "postgres")

NOW = 1_700_000_000.0
DELIVERY, LEASE = 5.0, 30.0
HELLO = [{"role": "user", "content": "hello"}]


def queue(db, model="llama", now=NOW) -> str:
    return jobs.create_job(db, model, HELLO, {}, now)


def claim(db, agent_id, models=None, now=NOW) -> jobs.Job | None:
    return jobs.claim_job(db, agent_id, models, now, DELIVERY, LEASE)


def post(db, agent_id, job_id, seq, texts, done=False, now=NOW, **kw) -> chunks.Appended:
    return chunks.append_chunks(db, agent_id, job_id, seq, texts, done, now, LEASE, **kw)


def stored(db, job_id) -> list[str]:
    return [text for _, text in chunks.chunks_after(db, job_id, -1)]


@pytest.fixture
def agent(dbconn):
    return agents.add_agent(dbconn, "gpu-1")


@pytest.fixture
def other(dbconn):
    return agents.add_agent(dbconn, "gpu-2")


@pytest.fixture
def running(dbconn, agent) -> str:
    """A job ``agent`` holds and has acknowledged."""
    job_id = queue(dbconn)
    claim(dbconn, agent.id)
    post(dbconn, agent.id, job_id, 0, [])
    return job_id


# --- claiming ---------------------------------------------------------------

def test_jobs_of_one_model_are_claimed_first_in_first_out(dbconn, agent):
    ids = [queue(dbconn, "llama", NOW + i) for i in range(3)]
    assert [claim(dbconn, agent.id, ["llama"]).id for _ in ids] == ids
    assert claim(dbconn, agent.id, ["llama"]) is None


def test_claim_takes_only_the_models_the_agent_serves(dbconn, agent):
    queue(dbconn, "qwen", NOW)
    llama = queue(dbconn, "llama", NOW + 1)
    assert claim(dbconn, agent.id, ["llama", "mistral"]).id == llama
    assert claim(dbconn, agent.id, ["llama"]) is None


def test_claim_without_a_models_list_takes_the_oldest_job_of_any_model(dbconn, agent):
    first, second = queue(dbconn, "qwen", NOW), queue(dbconn, "llama", NOW + 1)
    assert [claim(dbconn, agent.id).id, claim(dbconn, agent.id).id] == [first, second]


def test_claim_with_an_empty_models_list_takes_nothing(dbconn, agent):
    queue(dbconn)
    assert claim(dbconn, agent.id, []) is None


def test_claimed_job_is_delivered_under_the_delivery_lease(dbconn, agent):
    job_id = queue(dbconn, "llama")
    job = claim(dbconn, agent.id)
    assert job.to_json() == {"id": job_id, "model": "llama", "messages": HELLO, "options": {},
                             "lease_seconds": LEASE}
    record = jobs.get_job(dbconn, job_id)
    assert (record["status"], record["agent_id"], record["attempts"]) == ("delivered", agent.id, 1)
    assert record["lease_expires"] == NOW + DELIVERY


def test_concurrent_claims_from_many_connections_never_share_a_job(app, dbconn):
    queued = {queue(dbconn, now=NOW + i) for i in range(50)}
    claimed: list[str] = []
    barrier = threading.Barrier(8)

    def agent_loop(name):
        db = get_storage(app).connect()
        agent_id = agents.add_agent(db, name).id
        barrier.wait()
        while (job := claim(db, agent_id)) is not None:
            claimed.append(job.id)
        db.close()

    threads = [threading.Thread(target=agent_loop, args=(f"gpu-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(queued)


# --- chunk batches ----------------------------------------------------------

def test_first_post_acknowledges_a_delivered_job_and_starts_the_running_lease(dbconn, agent):
    job_id = queue(dbconn)
    claim(dbconn, agent.id)
    result = post(dbconn, agent.id, job_id, 0, [], now=NOW + 1)
    assert (result.started, result.stored, result.next_seq) == (True, 0, 0)
    record = jobs.get_job(dbconn, job_id)
    assert (record["status"], record["lease_expires"]) == ("running", NOW + 1 + LEASE)
    assert not post(dbconn, agent.id, job_id, 0, []).started


def test_batch_is_stored_in_order_and_counted_for_the_agent(dbconn, agent, running):
    result = post(dbconn, agent.id, running, 0, ["Hel", "lo", ""], now=NOW + 2)
    assert (result.stored, result.next_seq, result.cancelled) == (3, 3, False)
    assert stored(dbconn, running) == ["Hel", "lo", ""]
    record = jobs.get_job(dbconn, running)
    assert (record["next_seq"], record["first_token_at"]) == (3, NOW + 2)
    listed = agents.list_agents(dbconn)[0]
    assert (listed["last_seen"], listed["tokens_streamed"]) == (NOW + 2, 3)


def test_repeated_batch_stores_nothing_twice(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, ["a", "b"])
    again = post(dbconn, agent.id, running, 0, ["a", "b"])
    assert (again.stored, again.next_seq) == (0, 2)
    assert stored(dbconn, running) == ["a", "b"]
    assert agents.list_agents(dbconn)[0]["tokens_streamed"] == 2


def test_overlapping_batch_stores_only_its_new_tail(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, ["a", "b"])
    assert post(dbconn, agent.id, running, 1, ["b", "c", "d"]).stored == 2
    assert stored(dbconn, running) == ["a", "b", "c", "d"]


def test_batch_beyond_the_stored_chunks_is_a_conflict_naming_the_expected_seq(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, ["a"])
    with pytest.raises(Conflict) as raised:
        post(dbconn, agent.id, running, 2, ["c"], now=NOW + 9)
    assert raised.value.extra == {"expected_seq": 1}
    assert stored(dbconn, running) == ["a"]
    assert agents.list_agents(dbconn)[0]["last_seen"] == NOW   # rolled back with the rest


def test_legacy_post_without_seq_appends(dbconn, agent, running):
    post(dbconn, agent.id, running, None, ["a"])
    post(dbconn, agent.id, running, None, ["b"])
    assert stored(dbconn, running) == ["a", "b"]


def test_done_finishes_the_job_with_its_stats(dbconn, agent, running):
    result = post(dbconn, agent.id, running, 0, ["end"], True, stats={"eval_count": 1})
    assert result.finished
    record = jobs.get_job(dbconn, running)
    assert (record["status"], record["stats"], record["lease_expires"]) == ("done", {"eval_count": 1}, None)
    assert agents.list_agents(dbconn)[0]["jobs_done"] == 1


def test_done_with_an_error_fails_the_job_with_the_agents_message(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, [], True, error="model 'x' not found")
    record = jobs.get_job(dbconn, running)
    assert (record["status"], record["error_code"], record["error_message"]) == \
        ("failed", "agent_error", "model 'x' not found")
    assert agents.list_agents(dbconn)[0]["jobs_done"] == 0


@pytest.mark.parametrize("error", [None, "boom"])
def test_retried_final_post_is_acknowledged(dbconn, agent, running, error):
    post(dbconn, agent.id, running, 0, ["a"], True, error=error)
    again = post(dbconn, agent.id, running, 0, ["a"], True, error=error)
    assert (again.finished, again.cancelled, again.next_seq) == (False, False, 1)


def test_new_chunks_for_a_finished_job_are_gone(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, ["a"], True)
    with pytest.raises(Gone) as raised:
        post(dbconn, agent.id, running, 1, ["b"])
    assert raised.value.code == "job_done"


def test_post_after_a_cancel_request_cancels_the_job_and_says_so(dbconn, agent, running):
    jobs.cancel_job(dbconn, running, NOW)
    result = post(dbconn, agent.id, running, 0, ["a"])
    assert (result.cancelled, result.finished) == (True, True)
    assert jobs.get_job(dbconn, running)["status"] == "cancelled"
    assert post(dbconn, agent.id, running, 1, ["b"]).cancelled


# --- holders ----------------------------------------------------------------

def test_unknown_job_is_not_found(dbconn, agent):
    with pytest.raises(NotFound):
        post(dbconn, agent.id, "nope", 0, ["a"])


def test_another_agents_job_is_forbidden(dbconn, agent, other, running):
    with pytest.raises(Forbidden):
        post(dbconn, other.id, running, 0, ["a"])
    assert stored(dbconn, running) == []


def test_job_requeued_after_its_lease_ran_out_is_gone_for_the_old_holder(dbconn, agent, running):
    assert [e.outcome for e in leases.expire_leases(dbconn, NOW + LEASE + 1, 3)] == ["requeued"]
    with pytest.raises(Gone) as raised:
        post(dbconn, agent.id, running, 0, ["a"])
    assert raised.value.code == "lease_expired"


def test_job_failed_as_agent_lost_is_gone_for_its_holder(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, ["a"])
    assert [e.outcome for e in leases.expire_leases(dbconn, NOW + LEASE + 1, 3)] == ["failed"]
    record = jobs.get_job(dbconn, running)
    assert (record["status"], record["error_code"]) == ("failed", "agent_lost")
    with pytest.raises(Gone) as raised:
        post(dbconn, agent.id, running, 1, ["b"])
    assert raised.value.code == "lease_expired"


def test_agent_given_its_expired_job_again_holds_it_anew(dbconn, agent):
    job_id = queue(dbconn)
    claim(dbconn, agent.id)
    leases.expire_leases(dbconn, NOW + DELIVERY + 1, 3)
    assert claim(dbconn, agent.id, now=NOW + 10).id == job_id
    assert post(dbconn, agent.id, job_id, 0, ["a"]).stored == 1


def test_job_whose_delivery_lease_runs_out_goes_back_to_the_queue_in_its_place(dbconn, agent, other):
    first, second = queue(dbconn, now=NOW), queue(dbconn, now=NOW + 1)
    claim(dbconn, agent.id)
    leases.expire_leases(dbconn, NOW + DELIVERY + 1, 3)
    assert claim(dbconn, other.id, now=NOW + 10).id == first
    assert jobs.get_job(dbconn, first)["attempts"] == 2
    assert jobs.get_job(dbconn, second)["status"] == "queued"


def test_job_handed_out_max_attempts_times_fails(dbconn, agent):
    job_id = queue(dbconn)
    for attempt in range(3):
        now = NOW + attempt * 10
        assert claim(dbconn, agent.id, now=now).id == job_id
        outcome = leases.expire_leases(dbconn, now + DELIVERY + 1, 3)
    assert [e.outcome for e in outcome] == ["failed"]
    record = jobs.get_job(dbconn, job_id)
    assert (record["status"], record["error_code"]) == ("failed", "attempts_exhausted")
    assert "3 attempts" in record["error_message"]


def test_lease_is_renewed_by_every_post(dbconn, agent, running):
    post(dbconn, agent.id, running, 0, [], now=NOW + LEASE - 1)
    assert leases.expire_leases(dbconn, NOW + LEASE + 1, 3) == []


# --- agents -----------------------------------------------------------------

def test_touch_remembers_the_declared_models(dbconn, agent):
    assert agents.touch(dbconn, agent.id, NOW) is None              # never declared: serves any
    assert agents.touch(dbconn, agent.id, NOW, ["llama"], 2) == ["llama"]
    assert agents.touch(dbconn, agent.id, NOW + 1) == ["llama"]
    listed = agents.list_agents(dbconn)[0]
    assert (listed["last_seen"], listed["models"], listed["slots"]) == (NOW + 1, ["llama"], 2)


def test_token_rate_counts_each_agents_chunks_of_the_last_minute(dbconn, agent, other, running):
    post(dbconn, agent.id, running, 0, ["old"] * 30, now=NOW)
    post(dbconn, agent.id, running, 30, ["new"] * 60, now=NOW + 100)
    assert agents.token_rates(dbconn, NOW + 120) == {agent.id: 1.0}
    overview = {a["name"]: a for a in agents.overview(dbconn, NOW + 120, online_window=60)}
    assert (overview["gpu-1"]["online"], overview["gpu-1"]["tokens_per_second"]) == (True, 1.0)
    assert (overview["gpu-2"]["online"], overview["gpu-2"]["tokens_per_second"]) == (False, 0.0)
