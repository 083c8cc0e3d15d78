"""What operators watch: ``GET /api/v1/agents`` and ``GET /api/v1/status`` (admin token when one is set)."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from .auth import admin_required
from .errors import BadRequest
from .storage import agents, get_db, stats

bp = Blueprint("operators", __name__)

DEFAULT_WINDOW_MINUTES = 5
MAX_WINDOW_MINUTES = 60


@bp.get("/api/v1/agents")
@admin_required
def list_agents():
    """Every active agent: online, last_seen, models, slots, jobs_done, tokens_streamed, tokens_per_second."""
    listed = agents.overview(get_db(), time.time(), current_app.config["AGENT_ONLINE_SECONDS"])
    return jsonify({"agents": listed})


@bp.get("/api/v1/status")
@admin_required
def status():
    """Agents online, queues, recent outcomes and first-token latency over the last ``minutes``."""
    minutes = _window_minutes()
    conn, now = get_db(), time.time()
    since = now - minutes * 60
    rates = agents.token_rates(conn, now)
    online = agents.online(conn, now, current_app.config["AGENT_ONLINE_SECONDS"])
    return jsonify({
        "now": now,
        "window_seconds": minutes * 60,
        "agents": [a | {"tokens_per_second": rates.get(a["id"], 0.0)} for a in online],
        "queue": stats.queue_by_model(conn),
        "requests": stats.outcomes(conn, since),
        "first_token_latency": stats.first_token_latency(conn, since),
    })


def _window_minutes() -> int:
    raw = request.args.get("minutes", str(DEFAULT_WINDOW_MINUTES))
    # isascii: str.isdigit() accepts "²", which int() refuses (a 500).
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_WINDOW_MINUTES:
        raise BadRequest(f"minutes must be a whole number from 1 to {MAX_WINDOW_MINUTES}", code="bad_window")
    return int(raw)
