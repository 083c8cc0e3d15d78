"""Operators' figures: queue depth, outcomes, latency and totals, each one short indexed read.

Read by the status endpoint and by the Prometheus collector at scrape time;
nothing here writes.
"""
from __future__ import annotations

import math
from typing import Any

from .agents import ONLINE_SQL
from .base import Connection

# Latency percentiles come from the newest finished jobs only, so one status
# call stays one short indexed read however busy the server is.
LATENCY_SAMPLE_LIMIT = 2000


def queue_by_model(conn: Connection) -> list[dict[str, Any]]:
    """Queued and in-flight jobs per model; each query matches one partial index."""
    depth: dict[str, dict[str, Any]] = {}
    for column, where in (("queued", "status = 'queued'"), ("active", "status IN ('delivered', 'running')")):
        for model, count in conn.execute(f"SELECT model, count(*) FROM jobs WHERE {where} GROUP BY model"):
            depth.setdefault(model, {"model": model, "queued": 0, "active": 0})[column] = count
    return [depth[model] for model in sorted(depth)]


def jobs_by_state(conn: Connection) -> dict[str, int]:
    """Jobs not finished yet: queued, delivered, running."""
    counts = {"queued": conn.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]}
    active = dict(conn.execute("SELECT status, count(*) FROM jobs WHERE status IN ('delivered', 'running')"
                               " GROUP BY status").fetchall())
    return counts | {state: active.get(state, 0) for state in ("delivered", "running")}


def outcomes(conn: Connection, since: float) -> dict[str, Any]:
    """Jobs finished since ``since``: counts by final status, and failures by error code."""
    by_status = {"done": 0, "failed": 0, "cancelled": 0}
    errors: dict[str, int] = {}
    rows = conn.execute("SELECT status, error_code, count(*) FROM jobs WHERE finished_at >= ?"
                        " GROUP BY status, error_code", (since,))
    for status, error_code, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        if error_code:
            errors[error_code] = errors.get(error_code, 0) + count
    return {"by_status": by_status, "errors": errors}


def finished_between(conn: Connection, after: float, until: float) -> dict[str, int]:
    """Jobs that reached each final status in ``(after, until]``: one range over the finished_at index."""
    return dict(conn.execute("SELECT status, count(*) FROM jobs WHERE finished_at > ? AND finished_at <= ?"
                             " GROUP BY status", (after, until)).fetchall())


def first_token_latency(conn: Connection, since: float) -> dict[str, Any]:
    """p50 and p95 of ``first_token_at - created_at`` over recently finished jobs, in seconds."""
    samples = sorted(row[0] for row in conn.execute(
        "SELECT first_token_at - created_at FROM jobs WHERE finished_at >= ? AND first_token_at IS NOT NULL"
        " ORDER BY finished_at DESC LIMIT ?", (since, LATENCY_SAMPLE_LIMIT)))
    return {"samples": len(samples), "p50": percentile(samples, 50), "p95": percentile(samples, 95)}


def streamed_jobs(conn: Connection, since: float, limit: int) -> tuple[list[tuple], bool]:
    """``(created_at, first_token_at, finished_at, tokens)`` of jobs that streamed since ``since``.

    Running ones (``finished_at`` None; the partial index of leased jobs) and
    the newest ``limit`` finished ones (the ``finished_at`` index), never the
    chunks table; the flag says whether older finished ones were left out.
    """
    running = conn.execute(
        "SELECT created_at, first_token_at, NULL, next_seq FROM jobs"
        " WHERE status IN ('delivered', 'running') AND first_token_at IS NOT NULL").fetchall()
    finished = conn.execute(
        "SELECT created_at, first_token_at, finished_at, next_seq FROM jobs"
        " WHERE finished_at >= ? AND first_token_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
        (since, limit + 1)).fetchall()
    return running + finished[:limit], len(finished) > limit


def first_token_wait(conn: Connection, job_id: str) -> float | None:
    """Seconds from the job's creation to its first stored token; None before it has one."""
    row = conn.execute("SELECT created_at, first_token_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row[1] is None:
        return None
    return max(0.0, row[1] - row[0])


def agent_totals(conn: Connection, now: float, online_window: float) -> dict[str, int]:
    """Agents online now, and the tokens and jobs all agents have streamed and finished."""
    online = conn.execute(f"SELECT count(*) FROM agents WHERE {ONLINE_SQL}", (now - online_window,)).fetchone()[0]
    tokens, jobs = conn.execute("SELECT coalesce(sum(tokens_streamed), 0), coalesce(sum(jobs_done), 0)"
                                " FROM agents").fetchone()
    return {"online": online, "tokens_streamed": tokens, "jobs_done": jobs}


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
