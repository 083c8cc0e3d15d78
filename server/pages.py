"""The chat and operator pages, and the two small JSON endpoints they read.

The pages are static HTML plus a little JavaScript that uses only the public
API, so they double as an example for frontend authors; nothing in a page is
rendered from data on the server side.
"""
from __future__ import annotations

import math
import time
from typing import Any

import sqlite_utils
from flask import Blueprint, current_app, jsonify, render_template, request

from . import agents
from .auth import admin_required, api_key_required
from .db import get_db
from .errors import BadRequest

bp = Blueprint("pages", __name__)

DEFAULT_WINDOW_MINUTES = 5
MAX_WINDOW_MINUTES = 60
# Latency percentiles come from the newest finished requests only, so one
# status call stays one short indexed read however busy the server is.
LATENCY_SAMPLE_LIMIT = 2000

# The pages load only their own scripts and styles and talk only to this
# server: even a rendering bug could not run injected script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@bp.get("/")
def chat_page():
    return render_template("chat.html", script="chat.js"), PAGE_HEADERS


@bp.get("/status")
def status_page():
    return render_template("status.html", script="status.js"), PAGE_HEADERS


@bp.get("/api/v1/models")
@api_key_required
def models():
    """Models served by online agents: ``{"models": [{"name", "agents", "slots"}]}``."""
    online = _online_agents(get_db(), time.time())
    served: dict[str, dict[str, Any]] = {}
    for agent in online:
        for name in agent["models"]:
            entry = served.setdefault(name, {"name": name, "agents": 0, "slots": 0})
            entry["agents"] += 1
            entry["slots"] += agent["slots"] or 0
    return jsonify({"models": sorted(served.values(), key=lambda m: m["name"])})


@bp.get("/api/v1/status")
@admin_required
def status():
    """What an operator watches: agents, queues, recent outcomes, first-token latency."""
    minutes = _window_minutes()
    db, now = get_db(), time.time()
    since = now - minutes * 60
    rates = agents.token_rates(db, now)
    return jsonify({
        "now": now,
        "window_seconds": minutes * 60,
        "agents": [a | {"tokens_per_second": rates.get(a["id"], 0.0)} for a in _online_agents(db, now)],
        "queue": _queue_by_model(db),
        "requests": _outcomes(db, since),
        "first_token_latency": _first_token_latency(db, since),
    })


def _window_minutes() -> int:
    raw = request.args.get("minutes", str(DEFAULT_WINDOW_MINUTES))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WINDOW_MINUTES:
        raise BadRequest(f"minutes must be a whole number from 1 to {MAX_WINDOW_MINUTES}", code="bad_window")
    return int(raw)


def _online_agents(db: sqlite_utils.Database, now: float) -> list[dict[str, Any]]:
    return agents.online(db, now, current_app.config["AGENT_ONLINE_SECONDS"])


def _queue_by_model(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Queued and in-flight requests per model; each query matches one partial index."""
    depth: dict[str, dict[str, Any]] = {}
    for column, where in (("queued", "status = 'queued'"), ("active", "status IN ('delivered', 'running')")):
        for model, count in db.execute(f"SELECT model, count(*) FROM requests WHERE {where} GROUP BY model"):
            depth.setdefault(model, {"model": model, "queued": 0, "active": 0})[column] = count
    return [depth[model] for model in sorted(depth)]


def _outcomes(db: sqlite_utils.Database, since: float) -> dict[str, Any]:
    """Requests finished since ``since``: counts by final status, and failures by error code."""
    by_status = {"done": 0, "failed": 0, "cancelled": 0}
    errors: dict[str, int] = {}
    rows = db.execute("SELECT status, error_code, count(*) FROM requests WHERE finished_at >= ?"
                      " GROUP BY status, error_code", (since,))
    for status, error_code, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        if error_code:
            errors[error_code] = errors.get(error_code, 0) + count
    return {"by_status": by_status, "errors": errors}


def _first_token_latency(db: sqlite_utils.Database, since: float) -> dict[str, Any]:
    """p50 and p95 of ``first_token_at - created_at`` over recently finished requests, in seconds."""
    samples = sorted(row[0] for row in db.execute(
        "SELECT first_token_at - created_at FROM requests WHERE finished_at >= ? AND first_token_at IS NOT NULL"
        " ORDER BY finished_at DESC LIMIT ?", (since, LATENCY_SAMPLE_LIMIT)))
    return {"samples": len(samples), "p50": percentile(samples, 50), "p95": percentile(samples, 95)}


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
