"""What operators watch: ``GET /api/v1/agents``, ``GET /api/v1/status`` and its charts' series (admin token
when one is set)."""
from __future__ import annotations

import re
import time

from flask import Blueprint, current_app, jsonify, request

from .auth import admin_required
from .errors import BadRequest
from .series import bucket_series
from .storage import agents, get_db, stats

bp = Blueprint("operators", __name__)

DEFAULT_WINDOW_MINUTES = 5
MAX_WINDOW_MINUTES = 60
# The charts: a fixed number of points whatever the window (15 s buckets over
# the default 15 minutes), drawn from at most this many jobs.
SERIES_DEFAULT_MINUTES = 15
SERIES_POINTS = 60
SERIES_REQUEST_LIMIT = 10_000


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
    minutes = _minutes_param(DEFAULT_WINDOW_MINUTES)
    conn, now = get_db(), time.time()
    since = now - minutes * 60
    rates, current = agents.token_rates(conn, now), agents.current_token_rates(conn, now)
    online = agents.online(conn, now, current_app.config["AGENT_ONLINE_SECONDS"])
    return jsonify({
        "now": now,
        "window_seconds": minutes * 60,
        "current_rate_seconds": agents.CURRENT_RATE_SECONDS,
        "agents": [a | {"tokens_per_second": rates.get(a["id"], 0.0),
                        "current_tokens_per_second": current.get(a["id"], 0.0)} for a in online],
        "queue": stats.queue_by_model(conn),
        "requests": stats.outcomes(conn, since),
        "first_token_latency": stats.first_token_latency(conn, since),
    })


@bp.get("/api/v1/status/series")
@admin_required
def status_series():
    """The status page's charts: delivered tokens/s and first-token p50/p95 per bucket of the window."""
    minutes = _minutes_param(SERIES_DEFAULT_MINUTES)
    conn, now = get_db(), time.time()
    window = minutes * 60
    rows, truncated = stats.streamed_jobs(conn, now - window, SERIES_REQUEST_LIMIT)
    return jsonify({"now": now, "window_seconds": window, **bucket_series(rows, now, window, SERIES_POINTS),
                    "truncated": truncated})


def _minutes_param(default: int) -> int:
    raw = request.args.get("minutes", str(default))
    # Not str.isdigit() alone: it accepts "²" and other digits int() refuses (a 500).
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_WINDOW_MINUTES:
        raise BadRequest(f"minutes must be a whole number from 1 to {MAX_WINDOW_MINUTES}", code="bad_window")
    return int(raw)
