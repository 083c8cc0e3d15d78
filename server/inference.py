"""Agent protocol: signed poll, chunk stream and model reports (docs/protocol.md).

    GET  /api/v1/inference/poll    a job (200) or nothing (204); ?models=a,b&slots=N&wait=S&kinds=...
    POST /api/v1/inference/stream  a batch of one job's chunks, a heartbeat, or its end
    POST /api/v1/inference/models  what the agent's Ollama says of its models (for /api/show, /api/ps)
    POST /api/v1/inference/leave   the agent is stopping: no more jobs, not online from now on
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.datastructures import MultiDict

from protocol import deltas
from protocol.deltas import STATS_FIELDS, Delta
from protocol.models import KINDS, LEGACY_KINDS
from protocol.wire import LEAVE_PATH, MAX_CHUNKS_PER_POST, MODELS_PATH, POLL_PATH, STREAM_PATH

from . import body, reports
from .auth import agent_required
from .errors import BadRequest, PayloadTooLarge
from .notifier import queue_keys
from .storage import Connection, agents, chunks, close_db, get_db, get_storage, jobs

bp = Blueprint("inference", __name__)

MAX_MODELS = 100
MAX_SLOTS = 1000


@dataclass(frozen=True)
class PollParams:
    models: list[str] | None    # None: not sent, the remembered list applies; []: serves nothing now
    slots: int
    wait: float                 # seconds; 0 is the short poll
    kinds: list[str] | None = None    # None: not sent, an older agent (plain chats only)

    @property
    def runs(self) -> tuple[str, ...]:
        """The job kinds this poll may be handed."""
        return LEGACY_KINDS if self.kinds is None else tuple(self.kinds)

    @property
    def takes_jobs(self) -> bool:
        return self.slots > 0 and self.models != []


@dataclass(frozen=True)
class ChunkPost:
    """One POST to the stream endpoint, checked."""

    id: str
    seq: int | None             # None: the legacy form, appended after what is stored
    chunks: list[str | Delta]
    done: bool
    stats: dict[str, Any] | None = None
    error: str | None = None


# --- poll -------------------------------------------------------------------

@bp.get(POLL_PATH)
@agent_required
def poll():
    app = current_app._get_current_object()
    params = poll_params(request.args, app.config["MAX_LONG_POLL"])
    started = time.time()
    try:
        job, models = _claim(app, g.agent_id, params, started)
        if job is None and params.takes_jobs and params.wait > 0:
            job = _wait_for_job(app, g.agent_id, models, params, started)
    except agents.AgentLeft:
        job = None  # the agent said goodbye while this poll was parked: it wants no job from it
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
    kinds = None
    if "kinds" in args:
        kinds = list(dict.fromkeys(k.strip() for raw in args.getlist("kinds") for k in raw.split(",") if k.strip()))
        if not set(kinds) <= set(KINDS):
            raise BadRequest(f"'kinds' takes names from {', '.join(KINDS)}", code="invalid_query")
    return PollParams(models, slots, min(wait, max_wait), kinds)


def checked_models(names: list[str], code: str) -> list[str]:
    """An agent's declared models, stripped and deduplicated in order; BadRequest (with ``code``) past the limits."""
    models = list(dict.fromkeys(m.strip() for m in names if m.strip()))
    if len(models) > MAX_MODELS or not all(map(body.is_model_name, models)):
        raise BadRequest(f"'models' takes at most {MAX_MODELS} names of at most {body.MAX_MODEL_NAME} "
                         "characters without control characters or line breaks", code=code)
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


def _claim(app: Flask, agent_id: str, params: PollParams,
           started: float) -> tuple[jobs.Job | None, list[str] | None]:
    """Record the agent's presence and claim one job, in one transaction; returns the job and its models.

    Raises AgentLeft if the agent said goodbye after the poll ``started``.
    """
    try:
        return take_job(get_db(), app.config, agent_id, params.models, params.slots, params.takes_jobs, time.time(),
                        kinds=params.kinds, started=started)
    finally:
        # A long poll parks next: it must not hold a connection while it waits.
        close_db()


def take_job(conn: Connection, cfg: Mapping[str, Any], agent_id: str, models: list[str] | None, slots: int,
             takes_jobs: bool, now: float, *, kinds: list[str] | None = None,
             started: float | None = None) -> tuple[jobs.Job | None, list[str] | None]:
    """Record the agent's presence, models, job kinds and free slots, and claim one job if it ``takes_jobs``,
    in one transaction (a poll, or an agent socket's push); returns the job and the agent's models (None: any).

    ``kinds`` None: an older agent (plain chats only).  Raises AgentLeft if the agent said goodbye after
    ``started`` (a long poll parked from before it).
    """
    # An empty list is not remembered: stored, it would read as "never declared", which serves any model.
    declared = models or None
    runs = LEGACY_KINDS if kinds is None else tuple(kinds)
    with conn.transaction():
        models = agents.touch(conn, agent_id, now, declared, slots, kinds, poll_started=started)
        job = jobs.claim_job(conn, agent_id, models, now, cfg["DELIVERY_LEASE_SECONDS"],
                             cfg["LEASE_SECONDS"], runs) if takes_jobs else None
    return job, models


def _wait_for_job(app: Flask, agent_id: str, models: list[str] | None, params: PollParams,
                  started: float) -> jobs.Job | None:
    """Park until a job for ``models`` is announced, then claim it; None at the deadline or shutdown.

    Only this greenlet waits: no connection, no transaction.  With
    NOTIFIER=poll the database is polled instead (other workers queue jobs).
    """
    notifier = get_storage(app).notifier
    # Jobs are queued under Ollama's full name (`m:latest`); the agent may have declared either spelling.
    keys = queue_keys(models)
    poll_every = app.config["POLL_INTERVAL"] if app.config["NOTIFIER"] == "poll" else None
    deadline = time.monotonic() + params.wait
    while not notifier.closed:
        # Versions before the claim: a job announced in between ends the wait at once.
        versions = {key: notifier.version(key) for key in keys}
        job, _ = _claim(app, agent_id, params, started)
        # A claim after the deadline too: a wake-up this poll took must not be lost with it.
        remaining = deadline - time.monotonic()
        if job is not None or remaining <= 0:
            return job
        if poll_every:
            time.sleep(min(poll_every, remaining))
        else:
            notifier.wait_any(versions, remaining)
    return None


# --- leave ------------------------------------------------------------------

@bp.post(LEAVE_PATH)
@agent_required
def leave():
    """The agent is stopping (SIGTERM): its models stop being offered at once; its running jobs may still post.

    No body (one sent is ignored, though signed like any other). Its next poll makes it online again.
    """
    agents.leave(get_db(), g.agent_id, time.time())
    return jsonify(ok=True)


# --- stream -----------------------------------------------------------------

@bp.post(STREAM_PATH)
@agent_required
def stream():
    post = chunk_post(body.json_object(), current_app.config["MAX_CHUNKS_PER_POST"])
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


def chunk_post(payload: dict[str, Any], max_chunks: int = MAX_CHUNKS_PER_POST) -> ChunkPost:
    """Check a stream POST body, batched or legacy; BadRequest names the bad field, 413 past ``max_chunks``."""
    if payload.get("id") is None:
        raise BadRequest("'id' is required", code="missing_field")
    job_id = body.text(payload["id"], "id")
    seq = None if payload.get("seq") is None else body.integer(payload["seq"], "seq")
    if "chunks" in payload:
        if "chunk" in payload:
            raise BadRequest("send 'chunks' (a list) or the legacy 'chunk', not both", code="invalid_field")
        if seq is None:
            raise BadRequest("'seq' is required with 'chunks'", code="missing_field")
        chunks = _chunk_list(payload["chunks"], max_chunks)
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


def _chunk_list(value: Any, max_chunks: int) -> list[str | Delta]:
    if not isinstance(value, list):
        raise BadRequest("'chunks' must be a list of strings or chunk objects", code="invalid_field")
    if len(value) > max_chunks:
        # 200,000 one-character chunks fit in 1 MiB and held the worker for 3 s in one insert.
        raise PayloadTooLarge(f"{len(value)} chunks in one POST; the server's limit is {max_chunks} "
                              "(ORCH_MAX_CHUNKS_PER_POST): send smaller batches",
                              code="too_many_chunks", extra={"max_chunks": max_chunks})
    if all(type(c) is str for c in value):
        # The common case, plain text: one encode for the batch instead of one per chunk finds
        # lone surrogates (valid JSON escapes that SQLite cannot store as UTF-8).
        body.text("".join(value), "chunks", allow_empty=True)
        return value
    try:
        parsed = [deltas.from_wire(item) for item in value]
    except deltas.WireError as exc:
        raise BadRequest(f"'chunks': {exc}", code="invalid_field") from None
    body.mapping({"chunks": value}, "chunks")       # lone surrogates anywhere, thinking and tool calls too
    return parsed


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


# --- model reports ----------------------------------------------------------

@bp.post(MODELS_PATH)
@agent_required
def report_models():
    report = reports.checked(body.json_object())
    agents.store_report(get_db(), g.agent_id, report, time.time())
    return jsonify(ok=True, models=len(report["models"]), running=len(report["running"]))
