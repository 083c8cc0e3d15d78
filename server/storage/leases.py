"""What the sweeper expires: leases that ran out, jobs no agent took, jobs whose clients left."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..notifier import job_key
from .base import Connection
from .jobs import FINAL_SQL, announce, cancel_job


@dataclass(frozen=True)
class Expired:
    """A job the sweeper changed, and how."""

    id: str
    model: str
    outcome: str              # requeued | failed | cancelled | cancel_requested
    extra: dict[str, Any] = field(default_factory=dict)


def renew_all(conn: Connection, now: float, lease_seconds: float, delivery_lease: float) -> int:
    """Give every active job with less than half its lease left a full one from ``now``; returns how many.

    After a start or an outage of the database: agents whose POSTs were refused meanwhile
    get a lease to reach the server again before they are declared lost.  A job with more
    than half a lease left keeps it (and its row): that is time enough for a retry.
    """
    renewed = 0
    with conn.transaction():
        for status, lease in (("running", lease_seconds), ("delivered", delivery_lease)):
            renewed += conn.execute("UPDATE jobs SET lease_expires = ? WHERE status = ? AND lease_expires < ?",
                                    (now + lease, status, now + lease / 2)).rowcount
    return renewed


def expire_leases(conn: Connection, now: float, max_attempts: int) -> list[Expired]:
    """Give back, fail or cancel every job whose lease ran out."""
    changed = []
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, model, agent_id, next_seq, attempts, cancel_requested, released FROM jobs"
            # A job whose row is locked is being posted to right now: its lease is being renewed.
            f" WHERE status IN ('delivered', 'running') AND lease_expires < ?{conn.skip_locked}", (now,)).fetchall()
        for job_id, model, agent_id, next_seq, attempts, cancel_requested, released in rows:
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
            conn.execute(f"UPDATE jobs SET {sql}, lease_expires = NULL, released = ? WHERE id = ?",
                         (*args, released, job_id))
            conn.notify(job_key(job_id))
            if outcome == "requeued":
                announce(conn, model)
            changed.append(Expired(job_id, model, outcome, {"agent_id": agent_id}))
    return changed


def expire_queue(conn: Connection, now: float, queue_timeout: float) -> list[Expired]:
    """Fail queued jobs that no agent took in time."""
    rows = conn.execute(
        """UPDATE jobs SET status = 'failed', finished_at = ?, error_code = 'queue_timeout',
               error_message = ? WHERE status = 'queued' AND created_at < ? RETURNING id, model""",
        (now, f"no agent took the job within {queue_timeout:g} s", now - queue_timeout)).fetchall()
    for job_id, _ in rows:
        conn.notify(job_key(job_id))
    return [Expired(r[0], r[1], "failed") for r in rows]


def cancel_abandoned(conn: Connection, now: float, grace: float) -> list[Expired]:
    """Cancel jobs whose last client left more than ``grace`` seconds ago."""
    rows = conn.execute(
        f"SELECT id, model FROM jobs WHERE client_left_at IS NOT NULL AND client_left_at <= ?"
        f" AND cancel_requested = 0 AND status NOT IN ({FINAL_SQL})", (now - grace,)).fetchall()
    changed = []
    for job_id, model in rows:
        status = cancel_job(conn, job_id, now)
        if status is not None:
            changed.append(Expired(job_id, model, "cancelled" if status == "cancelled" else "cancel_requested"))
    return changed
