"""Agent protocol: signed poll and chunk stream (docs/protocol.md).

    GET  /api/v1/inference/poll    a job (200) or nothing (204); ?models=a,b&slots=N&wait=S
    POST /api/v1/inference/stream  a batch of one job's chunks, a heartbeat, or its end
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.datastructures import MultiDict

from protocol.wire import POLL_PATH, STREAM_PATH

from . import body
from .auth import agent_required
from .errors import BadRequest
from .notifier import ANY_MODEL_KEY, queue_key
from .storage import Connection, agents, chunks, close_db, get_db, get_storage, jobs

bp = Blueprint("inference", __name__)

MAX_MODELS = 100
MAX_MODEL_NAME = 200
MAX_SLOTS = 1000
# Ollama's final-line fields kept as a job's stats; other keys are dropped.
STATS_FIELDS = ("done_reason", "eval_count", "eval_duration", "prompt_eval_count", "total_duration",
                "load_duration")


@dataclass(frozen=True)
class PollParams:
    models: list[str] | None    # None: not sent, the remembered list applies; []: serves nothing now
    slots: int
    wait: float                 # seconds; 0 is the short poll

    @property
    def takes_jobs(self) -> bool:
        return self.slots > 0 and self.models != []


@dataclass(frozen=True)
class ChunkPost:
    """One POST to the stream endpoint, checked."""

    id: str
    seq: int | None             # None: the legacy form, appended after what is stored
    chunks: list[str]
    done: bool
    stats: dict[str, Any] | None = None
    error: str | None = None


# --- poll -------------------------------------------------------------------

@bp.get(POLL_PATH)
@agent_required
def poll():
    app = current_app._get_current_object()
    params = poll_params(request.args, app.config["MAX_LONG_POLL"])
    job, models = _claim(app, g.agent_id, params)
    if job is None and params.takes_jobs and params.wait > 0:
        job = _wait_for_job(app, g.agent_id, models, params)
    if job is None:
        return app.response_class(status=204)
    return jsonify(job.to_json())


def poll_params(args: MultiDict, max_wait: float) -> PollParams:
    """The poll's query parameters, or BadRequest."""
    models = None
    if "models" in args:
        models = checked_models([m for raw in args.getlist("models") for m in raw.split(",")], "invalid_query")
    slots = _query_number(args, "slots", 1, int)
    if not 0 <= slots <= MAX_SLOTS:
        raise BadRequest(f"'slots' must be between 0 and {MAX_SLOTS}", code="invalid_query")
    wait = _query_number(args, "wait", 0.0, float)
    if not (math.isfinite(wait) and wait >= 0):
        raise BadRequest("'wait' must be a number of seconds, 0 or more", code="invalid_query")
    return PollParams(models, slots, min(wait, max_wait))


def checked_models(names: list[str], code: str) -> list[str]:
    """An agent's declared models, stripped and deduplicated in order; BadRequest (with ``code``) past the limits."""
    models = list(dict.fromkeys(m.strip() for m in names if m.strip()))
    if len(models) > MAX_MODELS or any(len(m) > MAX_MODEL_NAME or not m.isprintable() for m in models):
        raise BadRequest(f"'models' takes at most {MAX_MODELS} printable names of at most "
                         f"{MAX_MODEL_NAME} characters", code=code)
    return models


def _query_number(args: MultiDict, name: str, default, parse):
    raw = args.get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise BadRequest(f"'{name}' must be {kind}, got {raw!r}", code="invalid_query") from None


def _claim(app: Flask, agent_id: str, params: PollParams) -> tuple[jobs.Job | None, list[str] | None]:
    """Record the agent's presence and claim one job, in one transaction; returns the job and its models."""
    try:
        return take_job(get_db(), app.config, agent_id, params.models, params.slots, params.takes_jobs, time.time())
    finally:
        # A long poll parks next: it must not hold a connection while it waits.
        close_db()


def take_job(conn: Connection, cfg: Mapping[str, Any], agent_id: str, models: list[str] | None, slots: int,
             takes_jobs: bool, now: float) -> tuple[jobs.Job | None, list[str] | None]:
    """Record the agent's presence, models and free slots, and claim one job if it ``takes_jobs``, in one
    transaction (a poll, or an agent socket's push); returns the job and the agent's models (None: any)."""
    # An empty list is not remembered: stored, it would read as "never declared", which serves any model.
    declared = models or None
    with conn.transaction():
        models = agents.touch(conn, agent_id, now, declared, slots)
        job = jobs.claim_job(conn, agent_id, models, now, cfg["DELIVERY_LEASE_SECONDS"],
                             cfg["LEASE_SECONDS"]) if takes_jobs else None
    return job, models


def _wait_for_job(app: Flask, agent_id: str, models: list[str] | None, params: PollParams) -> jobs.Job | None:
    """Park until a job for ``models`` is announced, then claim it; None at the deadline or shutdown.

    Only this greenlet waits: no connection, no transaction.  With
    NOTIFIER=poll the database is polled instead (other workers queue jobs).
    """
    notifier = get_storage(app).notifier
    keys = [queue_key(m) for m in models] if models else [ANY_MODEL_KEY]
    poll_every = app.config["POLL_INTERVAL"] if app.config["NOTIFIER"] == "poll" else None
    deadline = time.monotonic() + params.wait
    while not notifier.closed:
        # Versions before the claim: a job announced in between ends the wait at once.
        versions = {key: notifier.version(key) for key in keys}
        job, _ = _claim(app, agent_id, params)
        # A claim after the deadline too: a wake-up this poll took must not be lost with it.
        remaining = deadline - time.monotonic()
        if job is not None or remaining <= 0:
            return job
        if poll_every:
            time.sleep(min(poll_every, remaining))
        else:
            notifier.wait_any(versions, remaining)
    return None


# --- stream -----------------------------------------------------------------

@bp.post(STREAM_PATH)
@agent_required
def stream():
    post = chunk_post(body.json_object())
    # The stream following the job is woken as the transaction commits.
    result = store_post(get_db(), g.agent_id, post, time.time(), current_app.config["LEASE_SECONDS"])
    if result.changed:
        # Under gevent the woken stream only runs when this greenlet yields,
        # which would be after the reply is written; yield now so the token
        # reaches the user first (time.sleep is gevent's sleep once patched);
        # waking it before building the reply saves ~0.3-0.5 ms per batch.
        time.sleep(0)
    g.chunks_stored = (post.id, result.stored)   # for the metrics hook: no second parse of the body
    return jsonify(ok=True, cancelled=result.cancelled, next_seq=result.next_seq)


def store_post(conn: Connection, agent_id: str, post: ChunkPost, now: float, lease_seconds: float) -> chunks.Appended:
    """Store one checked batch (a POST or a socket's chunks frame): seq-idempotent, one transaction."""
    return chunks.append_chunks(conn, agent_id, post.id, post.seq, post.chunks, post.done, now, lease_seconds,
                                post.stats, post.error)


def chunk_post(payload: dict[str, Any]) -> ChunkPost:
    """Check a stream POST body, batched or legacy; BadRequest names the bad field."""
    if payload.get("id") is None:
        raise BadRequest("'id' is required", code="missing_field")
    job_id = body.text(payload["id"], "id")
    seq = None if payload.get("seq") is None else body.integer(payload["seq"], "seq")
    if "chunks" in payload:
        if "chunk" in payload:
            raise BadRequest("send 'chunks' (a list) or the legacy 'chunk', not both", code="invalid_field")
        if seq is None:
            raise BadRequest("'seq' is required with 'chunks'", code="missing_field")
        chunks = _chunk_list(payload["chunks"])
    elif payload.get("chunk") is not None:
        text = body.text(payload["chunk"], "chunk", allow_empty=True)
        # An empty legacy chunk adds nothing to the answer: store nothing.
        chunks = [text] if text else []
    else:
        chunks = []
    done = body.boolean(payload.get("done", False), "done")
    error = None if payload.get("error") is None else body.text(payload["error"], "error")
    if error is not None and not done:
        raise BadRequest("'error' ends the job: send it with \"done\": true", code="invalid_field")
    return ChunkPost(job_id, seq, chunks, done, _stats(payload.get("stats")), error)


def _chunk_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(type(c) is str for c in value):
        raise BadRequest("'chunks' must be a list of strings", code="invalid_field")
    # One encode for the batch instead of one per chunk: finds lone surrogates
    # (valid JSON escapes that SQLite cannot store as UTF-8).
    body.text("".join(value), "chunks", allow_empty=True)
    return value


def _stats(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    stats = body.mapping(value, "stats")
    kept = {}
    for name in STATS_FIELDS:
        field = stats.get(name)
        if field is None:
            continue
        if name == "done_reason":
            kept[name] = body.text(field, "stats.done_reason", allow_empty=True)
        elif isinstance(field, bool) or not isinstance(field, int | float) or not 0 <= field < math.inf:
            raise BadRequest(f"'stats.{name}' must be a number, 0 or more", code="invalid_field")
        else:
            kept[name] = field
    return kept or None
