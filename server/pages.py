"""The chat and operator pages, and the two small JSON endpoints they read.

The pages are static HTML plus a little JavaScript that uses only the public
API, so they double as an example for frontend authors; nothing in a page is
rendered from data on the server side.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
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
# An agent's "current" rate counts the chunks it stored over the last few
# seconds: the one-minute average showed 1.5 tokens/s for an agent streaming
# 50/s for two seconds.  Each request is read only over its newest chunks (a
# primary-key range), enough for 400 tokens/s per stream.
CURRENT_RATE_SECONDS = 5
CURRENT_RATE_MAX_CHUNKS = 2000
# The charts: a fixed number of points whatever the window (15 s buckets over
# the default 15 minutes), drawn from at most this many requests.
SERIES_DEFAULT_MINUTES = 15
SERIES_POINTS = 60
SERIES_REQUEST_LIMIT = 10_000

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
    minutes = _minutes_param(DEFAULT_WINDOW_MINUTES)
    db, now = get_db(), time.time()
    since = now - minutes * 60
    rates = agents.token_rates(db, now)
    current = current_token_rates(db, now)
    return jsonify({
        "now": now,
        "window_seconds": minutes * 60,
        "current_rate_seconds": CURRENT_RATE_SECONDS,
        "agents": [a | {"tokens_per_second": rates.get(a["id"], 0.0),
                        "current_tokens_per_second": current.get(a["id"], 0.0)} for a in _online_agents(db, now)],
        "queue": _queue_by_model(db),
        "requests": _outcomes(db, since),
        "first_token_latency": _first_token_latency(db, since),
    })


@bp.get("/api/v1/status/series")
@admin_required
def status_series():
    """The status page's charts: delivered tokens/s and first-token p50/p95 per bucket of the window."""
    minutes = _minutes_param(SERIES_DEFAULT_MINUTES)
    db, now = get_db(), time.time()
    window = minutes * 60
    rows, truncated = streamed_requests(db, now - window, SERIES_REQUEST_LIMIT)
    return jsonify({"now": now, "window_seconds": window, **bucket_series(rows, now, window, SERIES_POINTS),
                    "truncated": truncated})


def _minutes_param(default: int) -> int:
    raw = request.args.get("minutes", str(default))
    # Not str.isdigit(): it accepts "²" and other digits int() refuses (a 500).
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_WINDOW_MINUTES:
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


# --- the charts' queries: each takes the connection, each one indexed read ---------------------------

def streamed_requests(db: sqlite_utils.Database, since: float, limit: int) -> tuple[list[tuple], bool]:
    """``(created_at, first_token_at, finished_at, tokens)`` of requests that streamed since ``since``.

    Running ones (``finished_at`` None; the partial index of leased requests)
    and the newest ``limit`` finished ones (the ``finished_at`` index), never
    the chunks table; the flag says whether older finished ones were left out.
    """
    running = db.execute(
        "SELECT created_at, first_token_at, NULL, next_seq FROM requests"
        " WHERE status IN ('delivered', 'running') AND first_token_at IS NOT NULL").fetchall()
    finished = db.execute(
        "SELECT created_at, first_token_at, finished_at, next_seq FROM requests"
        " WHERE finished_at >= ? AND first_token_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
        (since, limit + 1)).fetchall()
    return running + finished[:limit], len(finished) > limit


def current_token_rates(db: sqlite_utils.Database, now: float,
                        window: float = CURRENT_RATE_SECONDS) -> dict[str, float]:
    """Tokens per second each agent stored over the last ``window`` seconds (its "current" rate)."""
    since = now - window
    rows = db.execute(
        """SELECT r.agent_id, count(*) FROM requests r
           JOIN chunks c ON c.request_id = r.id AND c.seq >= r.next_seq - ? AND c.created_at >= ?
           WHERE r.id IN (SELECT id FROM requests WHERE finished_at >= ?
                          UNION ALL SELECT id FROM requests WHERE status IN ('delivered', 'running'))
           GROUP BY r.agent_id""", (CURRENT_RATE_MAX_CHUNKS, since, since)).fetchall()
    return {agent_id: round(count / window, 1) for agent_id, count in rows if agent_id}


def bucket_series(rows: Iterable[tuple], now: float, window: float, points: int) -> dict[str, Any]:
    """Per bucket: tokens/s, and first-token p50/p95 of the requests whose first token fell in it.

    Buckets sit on multiples of their width, so a chart refreshed every few
    seconds keeps its points still; the newest one is still filling (its
    ``seconds`` say how much of it has passed).  A request's tokens are spread
    evenly from its first token to its end (now, while running): the requests
    table knows when an answer streamed, not when each chunk came.
    """
    width = window / points
    first_start = (math.floor(now / width) - points + 1) * width
    tokens = [0.0] * points
    latencies: list[list[float]] = [[] for _ in range(points)]
    for created, first_token, finished, count in rows:
        index = math.floor((first_token - first_start) / width)
        if 0 <= index < points:
            latencies[index].append(first_token - created)
        _spread(tokens, count, first_token, max(first_token, now if finished is None else finished), first_start, width)
    buckets = []
    for i in range(points):
        start = first_start + i * width
        seconds = min(width, now - start)
        samples = sorted(latencies[i])
        buckets.append({"start": start, "seconds": round(seconds, 3),
                        "tokens_per_second": round(tokens[i] / seconds, 2) if seconds > 0 else 0.0,
                        "first_tokens": len(samples),
                        "first_token_p50": percentile(samples, 50), "first_token_p95": percentile(samples, 95)})
    return {"bucket_seconds": width, "buckets": buckets}


def _spread(tokens: list[float], count: int, start: float, end: float, first_start: float, width: float) -> None:
    """Add ``count`` tokens streamed evenly over ``[start, end]`` to the buckets it overlaps."""
    first = max(0, math.floor((start - first_start) / width))
    last = min(len(tokens) - 1, math.floor((end - first_start) / width))
    if end == start:
        if first == last:  # inside the window: one bucket takes them all
            tokens[first] += count
        return
    for i in range(first, last + 1):
        bucket_start = first_start + i * width
        overlap = min(end, bucket_start + width) - max(start, bucket_start)
        if overlap > 0:
            tokens[i] += count * overlap / (end - start)
