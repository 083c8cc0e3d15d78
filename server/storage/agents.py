"""Agent records: registration, secrets, presence and the models they serve."""
from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.models import CHAT, LEGACY_KINDS, canonical_model
from protocol.signing import derive_key

from .. import keywrap
from ..config import DEFAULTS
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
        if conn.execute("SELECT 1 FROM agents WHERE id = ? AND removed_at IS NULL", (agent_id,)).fetchone() is None:
            return False
        # The jobs' rows first, then the agent's: the order a chunk POST locks them in (append_chunks).
        # The other order deadlocked against the agent's POST on PostgreSQL.
        fail_revoked_jobs(conn, agent_id, now)
        cursor = conn.execute("UPDATE agents SET removed_at = ? WHERE id = ? AND removed_at IS NULL", (now, agent_id))
    return cursor.rowcount > 0


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


# The one definition of "online", in SQL: not removed, not gone (SIGTERM), seen within the window.
ONLINE_SQL = "removed_at IS NULL AND left_at IS NULL AND last_seen >= ?"
_COLUMNS = "id, name, last_seen, models, slots, jobs_done, tokens_streamed, created_at, removed_at, left_at"


class AgentLeft(Exception):
    """The agent said it was leaving after this poll began: the poll must end without a job."""


def touch(conn: Connection, agent_id: str, now: float, models: list[str] | None = None,
          slots: int | None = None, kinds: list[str] | None = None,
          poll_started: float | None = None) -> list[str] | None:
    """Record a poll: the agent was seen, what it declared, and that it serves (again, if it had left).

    Returns its models (None: serves any). One statement: a poll that omits
    ``models`` gets the remembered list back from it; ``kinds`` is what this
    poll said (None: an older agent).  Raises Unauthorized if the agent was
    removed meanwhile, and AgentLeft if it said it was leaving after
    ``poll_started`` (a long poll still parked from before its goodbye).
    """
    started = now if poll_started is None else poll_started
    declared = None if models is None else json.dumps(models)
    # A goodbye newer than this poll stays; an older one is undone: the agent polls, so it serves again.
    row = conn.execute(
        "UPDATE agents SET last_seen = ?, models = coalesce(?, models), slots = coalesce(?, slots), kinds = ?,"
        " left_at = CASE WHEN left_at >= ? THEN left_at ELSE NULL END"
        " WHERE id = ? AND removed_at IS NULL RETURNING models, left_at",
        (now, declared, slots, None if kinds is None else json.dumps(kinds), started, agent_id)).fetchone()
    if row is None:
        raise Unauthorized("this agent was removed by an operator", code="agent_revoked")
    if row[1] is not None:
        raise AgentLeft(agent_id)
    return json.loads(row[0]) or None


def store_report(conn: Connection, agent_id: str, report: dict[str, Any], now: float) -> None:
    """Keep what the agent's Ollama says of its models (protocol/models.py).

    Not a sign of life: an agent reports before its first poll or announce, and online with no models
    declared yet it would have read as serving any model (``make run`` once printed a curl line for a
    model nobody served).  Its polls, announces and POSTs keep it online.
    """
    conn.execute("UPDATE agents SET report = ?, reported_at = ? WHERE id = ?",
                 (json.dumps(report, ensure_ascii=False), now, agent_id))


def reports(conn: Connection, now: float, window: float) -> list[dict[str, Any]]:
    """The model reports of agents online within ``window`` seconds, the freshest first."""
    rows = conn.execute(f"SELECT report FROM agents WHERE {ONLINE_SQL} AND report IS NOT NULL"
                        " ORDER BY reported_at DESC", (now - window,)).fetchall()
    return [json.loads(row[0]) for row in rows]


def leave(conn: Connection, agent_id: str, now: float) -> None:
    """Record the agent's goodbye: it takes no more jobs, and is not online from now on (its running jobs
    may still post). Its next poll undoes this."""
    conn.execute("UPDATE agents SET last_seen = ?, left_at = ? WHERE id = ? AND removed_at IS NULL",
                 (now, now, agent_id))


class AgentState(StrEnum):
    """What operators see: serving, stopped cleanly, silent past the online window, or revoked."""

    ONLINE = "online"
    LEFT = "left"
    OFFLINE = "offline"
    REMOVED = "removed"


def online(conn: Connection, now: float, window: float) -> list[dict[str, Any]]:
    """Agents that serve now (polled or posted within ``window`` seconds, not gone), without their secrets;
    ``kinds`` is what each runs."""
    rows = conn.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed, kinds FROM agents"
        f" WHERE {ONLINE_SQL} ORDER BY name", (now - window,)).fetchall()
    return [_public(r[:7]) | {"kinds": json.loads(r[7]) if r[7] else list(LEGACY_KINDS)} for r in rows]


def list_agents(conn: Connection, now: float | None = None, window: float | None = None) -> list[dict[str, Any]]:
    """Every registered agent (removed ones too) with its ``state`` (online within ``window`` seconds of
    ``now``, by default the server's ``AGENT_ONLINE_SECONDS`` before the present), without secrets."""
    now = time.time() if now is None else now
    window = DEFAULTS["AGENT_ONLINE_SECONDS"] if window is None else window
    rows = conn.execute(f"SELECT {_COLUMNS} FROM agents ORDER BY created_at, id").fetchall()
    return [_described(r, now, window) for r in rows]


def _described(row: tuple, now: float, window: float) -> dict[str, Any]:
    agent = _public(row[:7]) | {"created_at": row[7], "removed_at": row[8], "left_at": row[9]}
    if agent["removed_at"] is not None:
        state = AgentState.REMOVED
    elif agent["left_at"] is not None:
        state = AgentState.LEFT
    elif agent["last_seen"] is not None and agent["last_seen"] >= now - window:
        state = AgentState.ONLINE
    else:
        state = AgentState.OFFLINE
    return agent | {"state": state.value, "online": state is AgentState.ONLINE}


def is_removed(conn: Connection, agent_id: str) -> bool:
    """Whether an operator removed the agent (an open WebSocket's agent, signed before that)."""
    row = conn.execute("SELECT removed_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
    return row is not None and row[0] is not None


def name_of(conn: Connection, agent_id: str) -> str | None:
    """The agent's name (removed agents too), or None if unknown."""
    row = conn.execute("SELECT name FROM agents WHERE id = ?", (agent_id,)).fetchone()
    return row[0] if row else None


def serves(agents: list[dict[str, Any]], model: str, kind: str = CHAT) -> bool:
    """Whether any of these agents runs ``kind`` jobs of ``model`` (with or without ``:latest``);
    an agent that declared no models serves any."""
    name = canonical_model(model)
    return any((not a["models"] or name in {canonical_model(m) for m in a["models"]})
               and kind in a.get("kinds", LEGACY_KINDS) for a in agents)


def _public(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "last_seen": row[2], "models": json.loads(row[3] or "[]"),
            "slots": row[4], "jobs_done": row[5], "tokens_streamed": row[6]}


# "Recent tokens per second" averages the chunks stored over this window.
RATE_WINDOW_SECONDS = 60.0
# An agent's "current" rate counts the chunks it stored over the last few seconds: the one-minute
# average showed 1.5 tokens/s for an agent streaming 50/s for two seconds.  Each job is read only over
# its newest chunks (a primary-key range), enough for 400 tokens/s per stream.
CURRENT_RATE_SECONDS = 5
CURRENT_RATE_MAX_CHUNKS = 2000


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


def current_token_rates(conn: Connection, now: float, window: float = CURRENT_RATE_SECONDS) -> dict[str, float]:
    """Tokens per second each agent stored over the last ``window`` seconds (its "current" rate)."""
    since = now - window
    rows = conn.execute(
        """SELECT j.agent_id, count(*) FROM jobs j
           JOIN chunks c ON c.job_id = j.id AND c.seq >= j.next_seq - ? AND c.created_at >= ?
           WHERE j.id IN (SELECT id FROM jobs WHERE finished_at >= ?
                          UNION ALL SELECT id FROM jobs WHERE status IN ('delivered', 'running'))
           GROUP BY j.agent_id""", (CURRENT_RATE_MAX_CHUNKS, since, since)).fetchall()
    return {agent_id: round(count / window, 1) for agent_id, count in rows if agent_id}


def overview(conn: Connection, now: float, online_window: float) -> list[dict[str, Any]]:
    """Every agent for operators, removed ones too: state, declared models and slots, work done, recent rate."""
    rates = token_rates(conn, now)
    rows = conn.execute(f"SELECT {_COLUMNS} FROM agents ORDER BY name, id").fetchall()
    return [_described(row, now, online_window) | {"tokens_per_second": rates.get(row[0], 0.0)} for row in rows]
