"""The queue: a job's life from queued to a final state, and the reads that follow it.

Every function is one short transaction (or one statement) and takes ``now``
from the caller, so tests can move time.  Writes that someone waits for
announce it with ``conn.notify``: the wake-up goes out when the write commits.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.models import CHAT, canonical_model

from ..notifier import ANY_MODEL_KEY, cancel_key, job_key, queue_key
from .base import Connection

# A claim that found its job locked by another transaction tries again this many times, this far apart.
CLAIM_ATTEMPTS = 10
CLAIM_RETRY_SECONDS = 0.01


class Status(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"   # handed to an agent, awaiting its first POST
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.DELIVERED.value, Status.RUNNING.value)
FINAL = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
FINAL_SQL = ", ".join(f"'{s}'" for s in FINAL)
ACTIVE_SQL = ", ".join(f"'{s}'" for s in ACTIVE)


@dataclass(frozen=True)
class Job:
    """What a poll hands to an agent."""

    id: str
    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    lease_seconds: float
    kind: str = CHAT
    request: dict[str, Any] | None = None   # Ollama fields passed through (tools, format, think, input...)

    def to_json(self) -> dict[str, Any]:
        # A plain chat is exactly what older agents know; the rest only goes to agents that declared its kind.
        extra = {} if self.kind == CHAT else {"kind": self.kind, **(self.request or {})}
        return {"id": self.id, "model": self.model, "messages": self.messages,
                "options": self.options, "lease_seconds": self.lease_seconds, **extra}


@dataclass(frozen=True)
class Progress:
    """A job's state and the chunks after a point, read together (what a stream shows next)."""

    status: str
    error_code: str | None
    error_message: str | None
    stats: dict[str, Any] | None
    chunks: list[tuple[int, str, float, str | None]]    # (seq, text, stored_at, parts JSON)
    position: int | None                    # 1-based place in its model's queue, when asked and queued


def announce(conn: Connection, model: str) -> None:
    """Wake one long poll for ``model`` and one catch-all poll: a job was queued or requeued.

    wake=1: one job needs one poller, the rest stay parked.
    """
    conn.notify(queue_key(model), wake=1)
    conn.notify(ANY_MODEL_KEY, wake=1)


def create_job(conn: Connection, model: str, messages: list[dict[str, Any]], options: dict[str, Any],
               now: float, front_door: str = "native", kind: str = CHAT,
               request: dict[str, Any] | None = None) -> str:
    """Queue a new job and wake a long poll for it; returns its id."""
    job_id = uuid.uuid4().hex
    conn.execute(
        "INSERT INTO jobs (id, model, messages, options, front_door, created_at, kind, request)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (job_id, model, json.dumps(messages, ensure_ascii=False), json.dumps(options, ensure_ascii=False),
         front_door, now, kind, json.dumps(request, ensure_ascii=False) if request else None))
    announce(conn, model)
    return job_id


def claim_job(conn: Connection, agent_id: str, models: list[str] | None, now: float,
              delivery_lease: float, lease_seconds: float, kinds: tuple[str, ...] = (CHAT,)) -> Job | None:
    """Atomically hand the oldest queued job of ``models`` (any model if None) and ``kinds`` to ``agent_id``.

    A model matches with or without its ``:latest`` tag, as Ollama matches it.
    """
    where, params = f"status = 'queued' AND kind IN ({', '.join('?' * len(kinds))})", list(kinds)
    if models is not None:
        if not models:
            return None
        names = list(dict.fromkeys([*models, *(canonical_model(m) for m in models)]))
        where += f" AND model IN ({', '.join('?' * len(names))})"
        params += names
    # One UPDATE ... RETURNING statement: two pollers can never claim the same row (on SQLite the write
    # lock covers the statement; elsewhere the row lock is taken and contended rows are skipped).
    for _ in range(CLAIM_ATTEMPTS):
        row = conn.execute(
            f"""UPDATE jobs SET status = 'delivered', agent_id = ?, attempts = attempts + 1,
                    assigned_at = ?, lease_expires = ?
                WHERE id = (SELECT id FROM jobs WHERE {where} ORDER BY created_at, rowid LIMIT 1{conn.skip_locked})
                  AND status = 'queued'
                RETURNING id, model, messages, options, kind, request""",
            [agent_id, now, now + delivery_lease, *params]).fetchone()
        if row is not None or not conn.skip_locked:
            break
        # SKIP LOCKED passes over a queued job that another transaction holds a row lock on for a moment
        # (a cancel, another claimer). Nobody announces that job again: unless it is gone (claimed,
        # cancelled), look again shortly instead of leaving it to the next poll or ping, seconds away.
        if conn.execute(f"SELECT 1 FROM jobs WHERE {where} LIMIT 1", params).fetchone() is None:
            break
        time.sleep(CLAIM_RETRY_SECONDS)     # gevent's sleep once patched: only this claim waits
    if row is None:
        return None
    conn.notify(job_key(row[0]))
    return Job(row[0], row[1], json.loads(row[2]), json.loads(row[3]), lease_seconds, row[4],
               json.loads(row[5]) if row[5] else None)


def get_job(conn: Connection, job_id: str) -> dict[str, Any] | None:
    """The job's row as a dict (JSON columns decoded), or None."""
    cursor = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
    row = cursor.fetchone()
    if row is None:
        return None
    record = dict(zip([d[0] for d in cursor.description], row, strict=True))
    for key in ("messages", "options", "stats", "request"):
        if record.get(key):
            record[key] = json.loads(record[key])
    return record


# One statement over both primary keys: a job row and its new chunks,
# consistent with each other (a final status never comes without its chunks).
_PROGRESS_SQL = """
SELECT j.status, j.error_code, j.error_message, j.stats, j.model, j.created_at, c.seq, c.text, c.created_at, c.parts
FROM jobs AS j LEFT JOIN chunks AS c ON c.job_id = j.id AND c.seq > ?
WHERE j.id = ? ORDER BY c.seq"""


def progress(conn: Connection, job_id: str, after_seq: int, with_position: bool = False) -> Progress | None:
    """The job's state and its chunks after ``after_seq``; None for an unknown job."""
    rows = conn.execute(_PROGRESS_SQL, (after_seq, job_id)).fetchall()
    if not rows:
        return None
    status, code, message, stats, model, created_at = rows[0][:6]
    chunks = [(seq, text, stored_at, parts) for *_, seq, text, stored_at, parts in rows if seq is not None]
    position = None
    if with_position and status == Status.QUEUED:
        position = conn.execute("SELECT count(*) FROM jobs WHERE status = 'queued' AND model = ? AND created_at <= ?",
                                (model, created_at)).fetchone()[0]
    return Progress(status, code, message, json.loads(stats) if stats else None, chunks, position)


def cancel_job(conn: Connection, job_id: str, now: float) -> str | None:
    """Cancel a job: a queued one at once, a running one at its agent's next POST.

    Returns the resulting status, or None if it was already final.
    """
    with conn.transaction():
        row = conn.execute(f"SELECT status FROM jobs WHERE id = ?{conn.for_update}", (job_id,)).fetchone()
        if row is None or row[0] in FINAL:
            return None
        if row[0] == Status.QUEUED:
            conn.execute("UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? WHERE id = ?",
                         (now, job_id))
            status = Status.CANCELLED.value
        else:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            status = row[0]
            conn.notify(cancel_key(job_id))     # an agent socket holding it pushes the cancel at once
        conn.notify(job_key(job_id))
        return status


def close_cancelled(conn: Connection, job_id: str, now: float) -> bool:
    """End a handed-out job whose user asked to cancel it, as its agent is told to stop; False if it was not so."""
    cursor = conn.execute(
        "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_expires = NULL"
        f" WHERE id = ? AND cancel_requested = 1 AND status IN ({ACTIVE_SQL})", (now, job_id))
    if cursor.rowcount:
        conn.notify(job_key(job_id))
    return cursor.rowcount > 0


def set_client_left(conn: Connection, job_id: str, left_at: float | None) -> None:
    """Record when the last stream client left (None: a client is back)."""
    if left_at is None:
        # Only a job someone left is written: every new chat's stream comes here the moment its job is
        # queued, and on PostgreSQL the row lock of a needless write made a claim skip the job (SKIP LOCKED).
        conn.execute("UPDATE jobs SET client_left_at = NULL WHERE id = ? AND client_left_at IS NOT NULL", (job_id,))
    else:
        conn.execute("UPDATE jobs SET client_left_at = ? WHERE id = ?", (left_at, job_id))
