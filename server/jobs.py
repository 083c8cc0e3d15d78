"""The job queue: inference requests from queued to a final state, in SQLite.

Every function here is one short transaction (or one query) and takes
``now`` from the caller, so tests can move time.  Callers notify after the
commit; nothing here waits, yields or does network I/O.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlite_utils

from .db import transaction
from .errors import Conflict, Forbidden, Gone, NotFound

if TYPE_CHECKING:
    from .notifier import Notifier


class Status(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"   # handed to an agent, awaiting its first POST
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.DELIVERED.value, Status.RUNNING.value)
FINAL = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)


@dataclass(frozen=True)
class Job:
    """What a poll hands to an agent."""

    id: str
    model: str
    messages: list[dict[str, str]]
    options: dict[str, Any]
    lease_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "messages": self.messages,
                "options": self.options, "lease_seconds": self.lease_seconds}


@dataclass(frozen=True)
class Appended:
    """The outcome of one chunk POST."""

    next_seq: int
    cancelled: bool
    stored: int = 0           # chunks newly written by this POST
    finished: bool = False    # this POST moved the request to a final state
    model: str = ""
    started: bool = False     # this POST was the agent's first: delivered -> running


@dataclass(frozen=True)
class Expired:
    """A request the sweeper changed, and how."""

    id: str
    model: str
    outcome: str              # requeued | failed | cancelled
    extra: dict[str, Any] = field(default_factory=dict)


def create_request(db: sqlite_utils.Database, model: str, messages: list[dict[str, str]],
                   options: dict[str, Any], now: float, front_door: str = "native") -> str:
    """Queue a new request; returns its id."""
    request_id = uuid.uuid4().hex
    db.execute(
        "INSERT INTO requests (id, model, messages, options, front_door, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (request_id, model, json.dumps(messages, ensure_ascii=False), json.dumps(options, ensure_ascii=False),
         front_door, now))
    return request_id


# Notifier key every long poll of an agent that declared no models waits on.
ANY_MODEL_KEY = "jobs:*"


def queue_key(model: str) -> str:
    """The notifier key long polls for ``model`` wait on."""
    return "jobs:" + model


def announce(notifier: Notifier, model: str) -> None:
    """Wake one long poll for ``model`` and one catch-all poll: a job was queued or requeued.

    Call after the commit.  wake=1: one job needs one poller, the rest stay parked.
    """
    notifier.notify(queue_key(model), wake=1)
    notifier.notify(ANY_MODEL_KEY, wake=1)


def claim_job(db: sqlite_utils.Database, agent_id: str, models: list[str] | None, now: float,
              delivery_lease: float, lease_seconds: float) -> Job | None:
    """Atomically hand the oldest queued job of ``models`` (any model if None) to ``agent_id``."""
    where, params = "status = 'queued'", []
    if models is not None:
        if not models:
            return None
        where += f" AND model IN ({', '.join('?' * len(models))})"
        params += models
    # One UPDATE ... RETURNING statement: two pollers can never claim the same row.
    row = db.execute(
        f"""UPDATE requests SET status = 'delivered', agent_id = ?, attempts = attempts + 1,
                assigned_at = ?, lease_expires = ?
            WHERE id = (SELECT id FROM requests WHERE {where} ORDER BY created_at, rowid LIMIT 1)
            RETURNING id, model, messages, options""",
        [agent_id, now, now + delivery_lease, *params]).fetchone()
    if row is None:
        return None
    return Job(row[0], row[1], json.loads(row[2]), json.loads(row[3]), lease_seconds)


def get_request(db: sqlite_utils.Database, request_id: str) -> dict[str, Any] | None:
    cursor = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,))
    row = cursor.fetchone()
    if row is None:
        return None
    record = dict(zip([d[0] for d in cursor.description], row, strict=True))
    for key in ("messages", "options", "stats"):
        if record.get(key):
            record[key] = json.loads(record[key])
    return record


def chunks_after(db: sqlite_utils.Database, request_id: str, after_seq: int) -> list[tuple[int, str]]:
    """Stored chunks with ``seq > after_seq``, in order (one indexed range query)."""
    return db.execute("SELECT seq, text FROM chunks WHERE request_id = ? AND seq > ? ORDER BY seq",
                      (request_id, after_seq)).fetchall()


def queue_position(db: sqlite_utils.Database, request_id: str, model: str, created_at: float) -> int:
    """1-based place of a queued request among the queued requests of its model."""
    return db.execute("SELECT count(*) FROM requests WHERE status = 'queued' AND model = ? AND created_at <= ?",
                      (model, created_at)).fetchone()[0]


def append_chunks(db: sqlite_utils.Database, agent_id: str, request_id: str, seq: int | None,
                  chunks: list[str], done: bool, now: float, lease_seconds: float,
                  stats: dict[str, Any] | None = None, error: str | None = None) -> Appended:
    """Store one POST's chunks, renew the lease and touch the agent, in one transaction.

    ``seq=None`` appends (legacy agents).  Raises NotFound (unknown id),
    Forbidden (another agent's job), Gone (this agent no longer holds it) or
    Conflict with ``expected_seq`` (a gap); then nothing is written.
    """
    with transaction(db) as conn:
        row = conn.execute(
            "SELECT status, agent_id, next_seq, cancel_requested, model, released, error_code"
            " FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {request_id}", code="job_not_found")
        held = _HeldJob(request_id, *row)
        _check_holder(held, agent_id)
        result = _store_post(conn, held, seq, chunks, done, now, lease_seconds, stats, error)
        completed = result.finished and done and not error and not result.cancelled
        # The agent's presence rides in this transaction: no second write per POST.
        conn.execute("UPDATE agents SET last_seen = ?, tokens_streamed = tokens_streamed + ?,"
                     " jobs_done = jobs_done + ? WHERE id = ?", (now, result.stored, int(completed), agent_id))
    return result


@dataclass(frozen=True)
class _HeldJob:
    id: str
    status: str
    holder: str | None
    next_seq: int
    cancel_requested: int
    model: str
    released: str | None
    error_code: str | None


def _check_holder(job: _HeldJob, agent_id: str) -> None:
    lost_lease = agent_id in (job.released or "").split(",")
    if job.holder != agent_id and not lost_lease:
        raise Forbidden("this job is held by another agent", code="not_your_job")
    # The holder of a final job it lost to the sweeper, or a former holder:
    # either way the agent must stop (an agent given the same job again holds it anew).
    if job.holder != agent_id or (lost_lease and job.status in FINAL):
        raise Gone("this agent no longer holds the job: its lease ran out", code="lease_expired")


def _store_post(conn, job: _HeldJob, seq: int | None, chunks: list[str], done: bool, now: float,
                lease_seconds: float, stats: dict[str, Any] | None, error: str | None) -> Appended:
    next_seq = job.next_seq
    if job.status == Status.CANCELLED:
        return Appended(next_seq, True, model=job.model)
    if seq is None:
        seq = next_seq
    end = seq + len(chunks)
    if job.status in FINAL:
        if end <= next_seq and (job.status == Status.DONE or job.error_code == "agent_error"):
            return Appended(next_seq, False, model=job.model)      # a retried final POST
        raise Gone(f"the job is already {job.status}", code="job_" + job.status)
    if job.status == Status.QUEUED:
        raise Gone("the job went back to the queue", code="job_queued")
    if seq > next_seq:
        raise Conflict(f"seq {seq} leaves a gap: the server has {next_seq} chunks",
                       code="seq_gap", extra={"expected_seq": next_seq})
    fresh = chunks[next_seq - seq:] if end > next_seq else []
    if fresh:
        conn.executemany("INSERT INTO chunks (request_id, seq, text, created_at) VALUES (?, ?, ?, ?)",
                         [(job.id, next_seq + i, text, now) for i, text in enumerate(fresh)])
    new_next = next_seq + len(fresh)
    started = job.status == Status.DELIVERED
    if job.cancel_requested:
        conn.execute("UPDATE requests SET status = 'cancelled', next_seq = ?, finished_at = ?, lease_expires = NULL"
                     " WHERE id = ?", (new_next, now, job.id))
        return Appended(new_next, True, len(fresh), True, job.model, started)
    if done:
        final = Status.FAILED if error else Status.DONE
        conn.execute(
            """UPDATE requests SET status = ?, next_seq = ?, finished_at = ?, lease_expires = NULL,
                   first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END),
                   stats = ?, error_code = ?, error_message = ? WHERE id = ?""",
            (final.value, new_next, now, bool(fresh), now, json.dumps(stats) if stats else None,
             "agent_error" if error else None, error, job.id))
        return Appended(new_next, False, len(fresh), True, job.model, started)
    conn.execute(
        """UPDATE requests SET status = 'running', next_seq = ?, lease_expires = ?,
               first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END) WHERE id = ?""",
        (new_next, now + lease_seconds, bool(fresh), now, job.id))
    return Appended(new_next, False, len(fresh), False, job.model, started)


def fail_request(db: sqlite_utils.Database, request_id: str, code: str, message: str, now: float) -> bool:
    """Fail a request that is not final yet; True if it changed."""
    cursor = db.execute(
        f"""UPDATE requests SET status = 'failed', error_code = ?, error_message = ?, finished_at = ?,
               lease_expires = NULL WHERE id = ? AND status NOT IN ({_final_sql()})""",
        (code, message, now, request_id))
    return cursor.rowcount > 0


def request_cancel(db: sqlite_utils.Database, request_id: str, now: float) -> str | None:
    """Cancel a request: a queued one at once, a running one at its agent's next POST.

    Returns the resulting status, or None if it was already final.
    """
    with transaction(db) as conn:
        row = conn.execute("SELECT status FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None or row[0] in FINAL:
            return None
        if row[0] == Status.QUEUED:
            conn.execute("UPDATE requests SET status = 'cancelled', cancel_requested = 1, finished_at = ? WHERE id = ?",
                         (now, request_id))
            return Status.CANCELLED.value
        conn.execute("UPDATE requests SET cancel_requested = 1 WHERE id = ?", (request_id,))
        return row[0]


def set_client_left(db: sqlite_utils.Database, request_id: str, left_at: float | None) -> None:
    """Record when the last stream client left (None: a client is back)."""
    db.execute("UPDATE requests SET client_left_at = ? WHERE id = ?", (left_at, request_id))


def expire_leases(db: sqlite_utils.Database, now: float, max_attempts: int) -> list[Expired]:
    """Give back, fail or cancel every job whose lease ran out."""
    changed = []
    with transaction(db) as conn:
        rows = conn.execute(
            "SELECT id, model, agent_id, next_seq, attempts, cancel_requested, released FROM requests"
            " WHERE status IN ('delivered', 'running') AND lease_expires < ?", (now,)).fetchall()
        for request_id, model, agent_id, next_seq, attempts, cancel_requested, released in rows:
            released = ",".join(filter(None, [released, agent_id]))
            if cancel_requested:
                outcome, sql, args = "cancelled", "status = 'cancelled', finished_at = ?", (now,)
            elif next_seq == 0 and attempts < max_attempts:
                outcome, sql, args = "requeued", "status = 'queued', agent_id = NULL", ()
            elif next_seq == 0:
                outcome = "failed"
                sql, args = ("status = 'failed', finished_at = ?, error_code = 'attempts_exhausted', error_message = ?",
                             (now, f"no agent completed the job in {attempts} attempts"))
            else:
                outcome = "failed"
                sql, args = ("status = 'failed', finished_at = ?, error_code = 'agent_lost', error_message = ?",
                             (now, "the agent stopped responding mid-answer"))
            conn.execute(f"UPDATE requests SET {sql}, lease_expires = NULL, released = ? WHERE id = ?",
                         (*args, released, request_id))
            changed.append(Expired(request_id, model, outcome, {"agent_id": agent_id}))
    return changed


def expire_queue(db: sqlite_utils.Database, now: float, queue_timeout: float) -> list[Expired]:
    """Fail queued requests that no agent took in time."""
    rows = db.execute(
        """UPDATE requests SET status = 'failed', finished_at = ?, error_code = 'queue_timeout',
               error_message = ? WHERE status = 'queued' AND created_at < ? RETURNING id, model""",
        (now, f"no agent took the job within {queue_timeout:g} s", now - queue_timeout)).fetchall()
    return [Expired(r[0], r[1], "failed") for r in rows]


def cancel_abandoned(db: sqlite_utils.Database, now: float, grace: float) -> list[Expired]:
    """Cancel requests whose last client left more than ``grace`` seconds ago."""
    rows = db.execute(
        f"SELECT id, model FROM requests WHERE client_left_at IS NOT NULL AND client_left_at <= ?"
        f" AND cancel_requested = 0 AND status NOT IN ({_final_sql()})", (now - grace,)).fetchall()
    changed = []
    for request_id, model in rows:
        status = request_cancel(db, request_id, now)
        if status is not None:
            changed.append(Expired(request_id, model, "cancelled" if status == "cancelled" else "cancel_requested"))
    return changed


def _final_sql() -> str:
    return ", ".join(f"'{s}'" for s in FINAL)
