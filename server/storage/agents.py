"""Agent records: registration, secrets, presence and the models they serve."""
from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from protocol.signing import derive_key

from .. import keywrap
from ..errors import Unauthorized
from ..notifier import job_key
from .base import Connection


@dataclass(frozen=True)
class AgentCredentials:
    id: str
    secret: str


@dataclass(frozen=True)
class SigningKey:
    """What verifies an agent's signatures (``derive_key`` of its secret), and whether it was removed."""

    key: bytes
    removed: bool


def add_agent(conn: Connection, name: str, now: float | None = None, *, secret_key: str = "") -> AgentCredentials:
    """Register an agent; the secret is returned here, never stored and never shown again.

    The database keeps its signing key, wrapped with ``secret_key`` (``ORCH_SECRET_KEY``) when one is set.
    """
    creds = AgentCredentials("agt_" + uuid.uuid4().hex[:16], secrets.token_urlsafe(32))
    conn.execute("INSERT INTO agents (id, name, secret, verifier, created_at) VALUES (?, ?, '', ?, ?)",
                 (creds.id, name, keywrap.seal(derive_key(creds.secret), secret_key),
                  now if now is not None else time.time()))
    return creds


REVOKED_MESSAGE = "the agent serving this request was removed by an operator"


def remove_agent(conn: Connection, agent_id: str, now: float | None = None) -> bool:
    """Remove an agent: its signatures stop working and its running jobs fail (``agent_revoked``) at once.

    True if it existed.  One transaction; the jobs' streams are woken when it commits.
    """
    now = now if now is not None else time.time()
    with conn.transaction():
        cursor = conn.execute("UPDATE agents SET removed_at = ? WHERE id = ? AND removed_at IS NULL", (now, agent_id))
        removed = cursor.rowcount > 0
        if removed:
            fail_revoked_jobs(conn, agent_id, now)
    return removed


def fail_revoked_jobs(conn: Connection, agent_id: str, now: float) -> list[str]:
    """Fail the removed agent's active jobs with ``agent_revoked`` and wake their streams; returns their ids.

    Jobs the CLI already failed are woken again: on SQLite the CLI's wake-ups reach no server
    process, so the server calls this when the revoked agent's next request arrives.
    """
    rows = conn.execute(
        """UPDATE jobs SET status = 'failed', finished_at = ?, lease_expires = NULL, error_code = 'agent_revoked',
               error_message = ? WHERE agent_id = ? AND status IN ('delivered', 'running') RETURNING id""",
        (now, REVOKED_MESSAGE, agent_id)).fetchall()
    failed = [row[0] for row in rows]
    failed += [row[0] for row in conn.execute(
        "SELECT id FROM jobs WHERE agent_id = ? AND error_code = 'agent_revoked' AND finished_at >= ?",
        (agent_id, now - REVOKED_WAKE_WINDOW)).fetchall() if row[0] not in failed]
    for job_id in failed:
        conn.notify(job_key(job_id))
    return failed


# A revoked agent's request wakes the streams of jobs failed this recently (the CLI's, on SQLite).
REVOKED_WAKE_WINDOW = 600.0


def signing_key(conn: Connection, agent_id: str, server_key: str) -> SigningKey | None:
    """The agent's signing key (removed agents too: they are told so), or None if unknown."""
    row = conn.execute("SELECT verifier, secret, removed_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
    if row is None:
        return None
    verifier, secret, removed_at = row
    # A row written before migration 0003 that the start-up conversion has not reached yet.
    key = keywrap.unseal(verifier, server_key) if verifier else derive_key(secret)
    return SigningKey(key, removed_at is not None)


def seal_stored_keys(conn: Connection, server_key: str) -> int:
    """At start: replace stored secrets by keys, wrap plain keys when a server key is set; returns rows changed.

    Raises ``keywrap.KeyWrapError`` when wrapped keys cannot be read with ``server_key``.
    """
    changed = 0
    with conn.transaction():
        rows = conn.execute("SELECT id, secret, verifier FROM agents").fetchall()
        for agent_id, secret, verifier in rows:
            if verifier:
                key = keywrap.unseal(verifier, server_key)     # checks the server key
                if keywrap.is_wrapped(verifier) or not server_key:
                    continue
            else:
                key = derive_key(secret)
            conn.execute("UPDATE agents SET verifier = ?, secret = '' WHERE id = ?",
                         (keywrap.seal(key, server_key), agent_id))
            changed += 1
    return changed


def touch(conn: Connection, agent_id: str, now: float, models: list[str] | None = None,
          slots: int | None = None) -> list[str] | None:
    """Record that the agent was seen, and what it declared; returns its models (None: serves any).

    One statement: a poll that omits ``models`` gets the remembered list back
    from it.  Raises Unauthorized if the agent was removed meanwhile (a parked poll).
    """
    active = "WHERE id = ? AND removed_at IS NULL RETURNING models"
    if models is None:
        row = conn.execute(f"UPDATE agents SET last_seen = ?, slots = coalesce(?, slots) {active}",
                         (now, slots, agent_id)).fetchone()
    else:
        row = conn.execute(f"UPDATE agents SET last_seen = ?, models = ?, slots = coalesce(?, slots) {active}",
                         (now, json.dumps(models), slots, agent_id)).fetchone()
    if row is None:
        raise Unauthorized("this agent was removed by an operator", code="agent_revoked")
    return json.loads(row[0]) or None


def online(conn: Connection, now: float, window: float) -> list[dict[str, Any]]:
    """Active agents seen within ``window`` seconds, without their secrets."""
    rows = conn.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed FROM agents"
        " WHERE removed_at IS NULL AND last_seen >= ? ORDER BY name", (now - window,)).fetchall()
    return [_public(r) for r in rows]


def list_agents(conn: Connection) -> list[dict[str, Any]]:
    """Every registered agent (removed ones too), without secrets."""
    rows = conn.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed, created_at, removed_at"
        " FROM agents ORDER BY created_at").fetchall()
    return [_public(r[:7]) | {"created_at": r[7], "removed_at": r[8]} for r in rows]


def name_of(conn: Connection, agent_id: str) -> str | None:
    """The agent's name (removed agents too), or None if unknown."""
    row = conn.execute("SELECT name FROM agents WHERE id = ?", (agent_id,)).fetchone()
    return row[0] if row else None


def serves(agents: list[dict[str, Any]], model: str) -> bool:
    """Whether any of these agents serves ``model``; an agent that declared nothing serves any."""
    return any(not a["models"] or model in a["models"] for a in agents)


def _public(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "last_seen": row[2], "models": json.loads(row[3] or "[]"),
            "slots": row[4], "jobs_done": row[5], "tokens_streamed": row[6]}


# "Recent tokens per second" averages the chunks stored over this window.
RATE_WINDOW_SECONDS = 60.0


def token_rates(conn: Connection, now: float, window: float = RATE_WINDOW_SECONDS) -> dict[str, float]:
    """Tokens per second each agent streamed over the last ``window`` seconds.

    Counted from the chunks table, so every worker process sees the same
    figure; only jobs active or finished within the window are joined.
    """
    since = now - window
    rows = conn.execute(
        """SELECT j.agent_id, count(*) FROM jobs j JOIN chunks c ON c.job_id = j.id AND c.created_at >= ?
           WHERE j.id IN (SELECT id FROM jobs WHERE finished_at >= ?
                          UNION ALL SELECT id FROM jobs WHERE status IN ('delivered', 'running'))
           GROUP BY j.agent_id""", (since, since)).fetchall()
    return {agent_id: round(count / window, 2) for agent_id, count in rows if agent_id}


def overview(conn: Connection, now: float, online_window: float) -> list[dict[str, Any]]:
    """Every active agent for operators: presence, declared models and slots, work done, recent rate."""
    rates = token_rates(conn, now)
    rows = conn.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed FROM agents"
        " WHERE removed_at IS NULL ORDER BY name, id").fetchall()
    listed = []
    for row in rows:
        agent = _public(row)
        agent["online"] = agent["last_seen"] is not None and agent["last_seen"] >= now - online_window
        agent["tokens_per_second"] = rates.get(agent["id"], 0.0)
        listed.append(agent)
    return listed
