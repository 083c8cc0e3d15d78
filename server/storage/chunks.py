"""Answers: the chunks an agent posts for the job it holds, stored once each by ``seq``."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.deltas import Delta

from ..errors import Conflict, Forbidden, Gone, NotFound, Unauthorized
from ..notifier import job_key
from .base import Connection
from .jobs import FINAL, Status

# Rows per insert statement of one POST; a batch from a normal agent is one slice.
INSERT_SLICE = 200


@dataclass(frozen=True)
class Appended:
    """The outcome of one chunk POST."""

    next_seq: int
    cancelled: bool
    stored: int = 0           # chunks newly written by this POST
    finished: bool = False    # this POST moved the job to a final state
    model: str = ""
    started: bool = False     # this POST was the agent's first: delivered -> running

    @property
    def changed(self) -> bool:
        """Whether a stream following the job has something new to read."""
        return bool(self.stored or self.finished or self.started)


def chunks_after(conn: Connection, job_id: str, after_seq: int) -> list[tuple[int, str]]:
    """Stored chunks with ``seq > after_seq``, in order (one indexed range query)."""
    return conn.execute("SELECT seq, text FROM chunks WHERE job_id = ? AND seq > ? ORDER BY seq",
                        (job_id, after_seq)).fetchall()


def append_chunks(conn: Connection, agent_id: str, job_id: str, seq: int | None, chunks: Sequence[str | Delta],
                  done: bool,
                  now: float, lease_seconds: float, stats: dict[str, Any] | None = None,
                  error: str | None = None) -> Appended:
    """Store one POST's chunks, renew the lease and touch the agent, in one transaction.

    A chunk is plain text or a Delta (thinking, tool calls, an embedding: kept as JSON
    beside its text).  ``seq=None`` appends (legacy agents).  Raises NotFound (unknown id),
    Forbidden (another agent's job), Gone (this agent no longer holds it), Conflict with
    ``expected_seq`` (a gap) or Unauthorized (the agent was removed); then nothing is written.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT status, agent_id, next_seq, cancel_requested, model, released, error_code"
            f" FROM jobs WHERE id = ?{conn.for_update}", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}", code="job_not_found")
        held = _HeldJob(job_id, *row)
        _check_holder(held, agent_id)
        result = _store_post(conn, held, seq, chunks, done, now, lease_seconds, stats, error)
        completed = result.finished and done and not error and not result.cancelled
        # The agent's presence rides in this transaction: no second write per POST. An agent removed since it
        # signed (an open WebSocket's) stores nothing more: the rollback takes the chunks back.
        updated = conn.execute("UPDATE agents SET last_seen = ?, tokens_streamed = tokens_streamed + ?,"
                               " jobs_done = jobs_done + ? WHERE id = ? AND removed_at IS NULL",
                               (now, result.stored, int(completed), agent_id))
        if updated.rowcount == 0:
            raise Unauthorized("this agent was removed", code="bad_signature")
        if result.changed:
            conn.notify(job_key(job_id))
    return result


def _insert(conn: Connection, job_id: str, first_seq: int, chunks: Sequence[str | Delta], now: float) -> None:
    """Insert chunks in slices of one multi-row INSERT each, letting other greenlets run between them.

    One statement per slice, not per chunk (a round trip each on PostgreSQL).  A slice takes ~0.3 ms on
    SQLite here; a full POST (1,000 chunks) no longer holds every stream of the worker for one long
    statement.  The transaction stays open across the yields (all of a POST or nothing): other writers
    wait their turn on the lock, readers (streams) are not blocked under WAL.
    """
    for start in range(0, len(chunks), INSERT_SLICE):
        if start:
            time.sleep(0)         # gevent's sleep once patched: a yield to the event loop
        part = chunks[start:start + INSERT_SLICE]
        conn.execute("INSERT INTO chunks (job_id, seq, text, created_at, parts) VALUES "
                     + ", ".join(["(?, ?, ?, ?, ?)"] * len(part)),
                     [value for i, chunk in enumerate(part)
                      for value in (job_id, first_seq + start + i, _text(chunk), now, _parts(chunk))])


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


def _store_post(conn: Connection, job: _HeldJob, seq: int | None, chunks: Sequence[str | Delta], done: bool,
                now: float,
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
    _insert(conn, job.id, next_seq, fresh, now)
    new_next = next_seq + len(fresh)
    started = job.status == Status.DELIVERED
    if job.cancel_requested:
        conn.execute("UPDATE jobs SET status = 'cancelled', next_seq = ?, finished_at = ?, lease_expires = NULL"
                     " WHERE id = ?", (new_next, now, job.id))
        return Appended(new_next, True, len(fresh), True, job.model, started)
    if done:
        final = Status.FAILED if error else Status.DONE
        conn.execute(
            """UPDATE jobs SET status = ?, next_seq = ?, finished_at = ?, lease_expires = NULL,
                   first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END),
                   stats = ?, error_code = ?, error_message = ? WHERE id = ?""",
            (final.value, new_next, now, bool(fresh), now, json.dumps(stats) if stats else None,
             "agent_error" if error else None, error, job.id))
        return Appended(new_next, False, len(fresh), True, job.model, started)
    conn.execute(
        """UPDATE jobs SET status = 'running', next_seq = ?, lease_expires = ?,
               first_token_at = coalesce(first_token_at, CASE WHEN ? THEN ? END) WHERE id = ?""",
        (new_next, now + lease_seconds, bool(fresh), now, job.id))
    return Appended(new_next, False, len(fresh), False, job.model, started)


def _text(chunk: str | Delta) -> str:
    return chunk if isinstance(chunk, str) else chunk.text


def _parts(chunk: str | Delta) -> str | None:
    parts = None if isinstance(chunk, str) else chunk.parts()
    return None if parts is None else json.dumps(parts, ensure_ascii=False)
