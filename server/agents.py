"""Agent records: registration, secrets, presence and the models they serve."""
from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlite_utils


@dataclass(frozen=True)
class AgentCredentials:
    id: str
    secret: str


def add_agent(db: sqlite_utils.Database, name: str, now: float | None = None) -> AgentCredentials:
    """Register an agent; the secret is returned here and never shown again."""
    creds = AgentCredentials("agt_" + uuid.uuid4().hex[:16], secrets.token_urlsafe(32))
    db.execute("INSERT INTO agents (id, name, secret, created_at) VALUES (?, ?, ?, ?)",
               (creds.id, name, creds.secret, now if now is not None else time.time()))
    return creds


def remove_agent(db: sqlite_utils.Database, agent_id: str, now: float | None = None) -> bool:
    """Mark an agent removed: its signatures stop working at once. True if it existed."""
    cursor = db.execute("UPDATE agents SET removed_at = ? WHERE id = ? AND removed_at IS NULL",
                        (now if now is not None else time.time(), agent_id))
    return cursor.rowcount > 0


def secret_for(db: sqlite_utils.Database, agent_id: str) -> str | None:
    """The secret of an active agent, or None if unknown or removed."""
    row = db.execute("SELECT secret FROM agents WHERE id = ? AND removed_at IS NULL", (agent_id,)).fetchone()
    return row[0] if row else None


def touch(db: sqlite_utils.Database, agent_id: str, now: float, models: list[str] | None = None,
          slots: int | None = None) -> None:
    """Record that the agent was seen, and what it declared."""
    if models is None:
        db.execute("UPDATE agents SET last_seen = ?, slots = coalesce(?, slots) WHERE id = ?",
                   (now, slots, agent_id))
    else:
        db.execute("UPDATE agents SET last_seen = ?, models = ?, slots = coalesce(?, slots) WHERE id = ?",
                   (now, json.dumps(models), slots, agent_id))


def declared_models(db: sqlite_utils.Database, agent_id: str) -> list[str] | None:
    """The agent's last declared models; None if it never declared any (serves anything)."""
    row = db.execute("SELECT models FROM agents WHERE id = ?", (agent_id,)).fetchone()
    models = json.loads(row[0]) if row else []
    return models or None


def online(db: sqlite_utils.Database, now: float, window: float) -> list[dict[str, Any]]:
    """Active agents seen within ``window`` seconds, without their secrets."""
    rows = db.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed FROM agents"
        " WHERE removed_at IS NULL AND last_seen >= ? ORDER BY name", (now - window,)).fetchall()
    return [_public(r) for r in rows]


def list_agents(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every registered agent (removed ones too), without secrets."""
    rows = db.execute(
        "SELECT id, name, last_seen, models, slots, jobs_done, tokens_streamed, created_at, removed_at"
        " FROM agents ORDER BY created_at").fetchall()
    return [_public(r[:7]) | {"created_at": r[7], "removed_at": r[8]} for r in rows]


def serves(agents: list[dict[str, Any]], model: str) -> bool:
    """Whether any of these agents serves ``model``; an agent that declared nothing serves any."""
    return any(not a["models"] or model in a["models"] for a in agents)


def _public(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "last_seen": row[2], "models": json.loads(row[3] or "[]"),
            "slots": row[4], "jobs_done": row[5], "tokens_streamed": row[6]}
