"""The job queue: inference requests from queued to a final state, in SQLite.

Every function here is one short transaction (or one query) and takes
``now`` from the caller, so tests can move time.  Callers notify after the
commit; nothing here waits, yields or does network I/O.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import sqlite_utils

from .db import transaction
from .errors import Conflict, Forbidden, Gone, NotFound


class Status(str, Enum):
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
    row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
    if row is None:
        return None
    record = dict(zip([d[0] for d in db.conn.execute("SELECT * FROM requests LIMIT 0").description], row))
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
    """Store one POST's chunks in one transaction; ``seq=None`` appends (legacy agents).

    Raises NotFound (unknown id), Forbidden (another agent's job), Gone (this
    agent no longer holds it) or Conflict with ``expected_seq`` (a gap).
    """
    with transaction(db) as conn:
        row = conn.execute(
            "SELECT status, agent_id, next_seq, cancel_requested, model, released FROM requests WHERE id = ?",
            (request_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {request_id}")
        status, holder, next_seq, cancel_requested, model, released = row
        if holder != agent_id:
            if agent_id in (released or "").split(","):
                raise Gone("this agent no longer holds the job: its lease ran out", code="lease_expired")
            raise Forbidden("this job is held by another agent", code="not_your_job")
        if status == Status.CANCELLED:
            return Appended(next_seq, True, model=model)
        if seq is None:
            seq = next_seq
        end = seq + len(chunks)
        if status == Status.DONE and end <= next_seq:
            return Appended(next_seq, False, model=model)      # a retried final POST
        if status in FINAL or status == Status.QUEUED:
            raise Gone(f"the job is {status}", code="job_" + status)
        if seq > next_seq:
            raise Conflict(f"seq {seq} leaves a gap: the server has {next_seq} chunks",
                           code="seq_gap", extra={"expected_seq": next_seq})
        fresh = chunks[next_seq - seq:] if end > next_seq else []
        if fresh:
            conn.executemany("INSERT INTO chunks (request_id, seq, text, created_at) VALUES (?, ?, ?, ?)",
                             [(request_id, next_seq + i, text, now) for i, text in enumerate(fresh)])
            conn.execute("UPDATE agents SET tokens_streamed = tokens_streamed + ? WHERE id = ?",
                         (len(fresh), agent_id))
        new_next = next_seq + len(fresh)
        if cancel_requested:
            conn.execute("UPDATE requests SET status = 'cancelled', next_seq = ?, finished_at = ?, lease_expires = NULL"
                         " WHERE id = ?", (new_next, now, request_id))
            return Appended(new_next, True, len(fresh), True, model)
        if done:
            final = Status.FAILED if error else Status.DONE
            conn.execute(
                """UPDATE requests SET status = ?, next_seq = ?, finished_at = ?, lease_expires = NULL,
                       first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END),
                       stats = ?, error_code = ?, error_message = ? WHERE id = ?""",
                (final.value, new_next, now, bool(fresh), now, json.dumps(stats) if stats else None,
                 "agent_error" if error else None, error, request_id))
            conn.execute("UPDATE agents SET jobs_done = jobs_done + 1 WHERE id = ?", (agent_id,))
            return Appended(new_next, False, len(fresh), True, model)
        conn.execute(
            """UPDATE requests SET status = 'running', next_seq = ?, lease_expires = ?,
                   first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END) WHERE id = ?""",
            (new_next, now + lease_seconds, bool(fresh), now, request_id))
        return Appended(new_next, False, len(fresh), False, model)


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
        f" AND status NOT IN ({_final_sql()})", (now - grace,)).fetchall()
    changed = []
    for request_id, model in rows:
        status = request_cancel(db, request_id, now)
        if status is not None:
            changed.append(Expired(request_id, model, "cancelled" if status == "cancelled" else "cancel_requested"))
    return changed


def _final_sql() -> str:
    return ", ".join(f"'{s}'" for s in FINAL)
