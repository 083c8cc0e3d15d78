"""Wake-ups between two processes' storages on one PostgreSQL database (server/storage/postgres.py).

Each storage stands for one server process: its own origin, notifier and listening connection.  A
transaction's keys travel with its COMMIT; these tests check they arrive whole, however odd the text of a
key (a queue key carries the client's model name), and never for a transaction that did not commit; and
that a claim does not pass over a job announced to it because another write held its row for a moment,
and that writers take rows in one order (no deadlock).
"""
from __future__ import annotations

import threading

import pytest

from devtools.processes import wait_until
from server.notifier import Notifier, job_key, queue_key
from server.storage import agents, jobs, migrated, open_storage

pytestmark = pytest.mark.engines("postgres")

ODD_MODELS = ["it's", "back\\slash", "quote'';--", "ünï ☃ 模型", "%s %(x)s $1", "two  spaces"]


@pytest.fixture
def two_processes(database_url):
    with migrated(database_url):
        pass
    writer, reader = open_storage(database_url, Notifier()), open_storage(database_url, Notifier())
    reader.start_listening(give_up_after=30)
    wait_until(reader.listener.connected.is_set, 10, message="the reader's LISTEN connection")
    yield writer, reader
    writer.close()
    reader.close()


def test_a_committed_jobs_queue_key_reaches_the_other_process_whatever_its_model_name(two_processes):
    writer, reader = two_processes
    for model in ODD_MODELS:
        key = queue_key(model)
        before = reader.notifier.version(key)
        with writer.connection() as conn, conn.transaction():
            job_id = jobs.create_job(conn, model, [{"role": "user", "content": "hi"}], {}, 1.0)
        wait_until(lambda key=key, before=before: reader.notifier.version(key) > before, 10,
                   message=f"the wake-up for {model!r}")
        with reader.connection() as conn:
            assert jobs.get_job(conn, job_id)["model"] == model      # visible when woken


def test_a_rolled_back_transaction_wakes_nobody_and_leaves_nothing_for_the_next_one(two_processes):
    writer, reader = two_processes
    lost, kept = job_key("rolled-back"), job_key("committed")
    with writer.connection() as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            conn.notify(lost)
            raise RuntimeError("the write failed")
        with conn.transaction():
            conn.notify(kept)
    wait_until(lambda: reader.notifier.version(kept) == 1, 10, message="the committed transaction's wake-up")
    assert reader.notifier.version(lost) == 0
    assert writer.notifier.version(lost) == 0 and writer.notifier.version(kept) == 1


def test_a_claim_takes_a_queued_job_another_transaction_holds_a_lock_on_for_a_moment(two_processes):
    """SKIP LOCKED passed over a job whose row another write held (a new chat's stream once did, at once):
    the job waited for the agent's next poll or ping, 20 s for a WebSocket agent.  Now the claim looks again."""
    storage, _ = two_processes
    with storage.connection() as conn, conn.transaction():
        agent = agents.add_agent(conn, "gpu-1")
        job_id = jobs.create_job(conn, "llama", [{"role": "user", "content": "hi"}], {}, 1.0)
    locked, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        with storage.connection() as conn, conn.transaction():
            jobs.set_client_left(conn, job_id, 2.0)
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(10)
        threading.Timer(0.03, release.set).start()          # a short write: it commits within the claim's retries
        with storage.connection() as conn, conn.transaction():
            job = jobs.claim_job(conn, agent.id, ["llama"], 3.0, 5.0, 30.0)
    finally:
        release.set()
        holder.join()
    assert job is not None and job.id == job_id


def test_removing_an_agent_while_its_chunk_post_holds_the_job_finishes_both_without_a_deadlock(two_processes):
    """`orchestrator agents remove` locked the agent's row, then its jobs'; a chunk POST locks the job's row,
    then the agent's: PostgreSQL broke the deadlock by failing the removal (a test of make test, once)."""
    storage, _ = two_processes
    with storage.connection() as conn, conn.transaction():
        agent = agents.add_agent(conn, "gpu-1")
        job_id = jobs.create_job(conn, "llama", [{"role": "user", "content": "hi"}], {}, 1.0)
    with storage.connection() as conn, conn.transaction():
        assert jobs.claim_job(conn, agent.id, ["llama"], 2.0, 5.0, 30.0).id == job_id
    job_locked, go_on, errors = threading.Event(), threading.Event(), []

    def chunk_post() -> None:
        # append_chunks' locking order, paused between its two locks.
        try:
            with storage.connection() as conn, conn.transaction():
                conn.execute("SELECT status FROM jobs WHERE id = ? FOR UPDATE", (job_id,))
                job_locked.set()
                go_on.wait(10)
                conn.execute("UPDATE agents SET last_seen = ? WHERE id = ?", (3.0, agent.id))
        except Exception as exc:   # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def remove() -> None:
        try:
            with storage.connection() as conn:
                assert agents.remove_agent(conn, agent.id, 4.0)
        except Exception as exc:   # noqa: BLE001
            errors.append(exc)

    def removal_waits_for_a_lock() -> bool:
        with storage.connection() as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]

    poster, remover = threading.Thread(target=chunk_post), threading.Thread(target=remove)
    poster.start()
    try:
        assert job_locked.wait(10)
        remover.start()
        wait_until(removal_waits_for_a_lock, 10, message="the removal waiting for the job's row")
    finally:
        go_on.set()
        poster.join()
        if remover.ident is not None:
            remover.join()
    assert errors == []
    with storage.connection() as conn:
        assert jobs.get_job(conn, job_id)["error_code"] == "agent_revoked"
        assert agents.is_removed(conn, agent.id)
