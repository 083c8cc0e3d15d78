"""The native chat API: SSE streams, resume, history, cancellation.

The default event format is the legacy server's, byte for byte, because
existing frontends parse it line by line::

    id: 0
    data: {"delta": "Hel"}

    : keepalive

    data: [DONE]

The JSON after ``data:`` is one line, keeps non-ASCII as UTF-8, and uses
``json.dumps``' default ``": "`` and ``", "`` separators, as the legacy
``{"delta": "<text>"}`` did.  A chunk that carries more than text (a
reasoning model's thinking, tool calls) adds fields beside ``delta``, which
is then often ``""``: ``{"delta": "", "thinking": "..."}``,
``{"delta": "", "tool_calls": [{"function": {"name", "arguments"}}]}``; a
client that reads only ``delta`` shows the answer and nothing else.  A failure is ``event: error`` with
``data: {"error": {"code": ..., "message": ...}}``; ``event: status`` lines
appear only when the client asks with ``"status_events": true``.
"""
from __future__ import annotations

import json
import time

from flask import Blueprint, current_app, jsonify, request

from protocol.models import canonical_model

from . import body, features, frontdoor, streaming
from .auth import api_key_required
from .errors import BadRequest, NotFound
from .storage import agents, chunks, get_db, jobs

bp = Blueprint("chat", __name__)

KEEPALIVE = b": keepalive\n\n"
DONE = b"data: [DONE]\n\n"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode_event(event: streaming.Event) -> bytes:
    """One event in the native SSE format."""
    if isinstance(event, streaming.ChunkEvent):
        data = {"delta": event.text, **event.parts} if event.parts else {"delta": event.text}
        line = f"id: {event.seq}\ndata: {_json(data)}\n\n"
    elif isinstance(event, streaming.KeepaliveEvent):
        return KEEPALIVE
    elif isinstance(event, streaming.DoneEvent):
        return DONE
    elif isinstance(event, streaming.ErrorEvent):
        line = f"event: error\ndata: {_json({'error': {'code': event.code, 'message': event.message}})}\n\n"
    else:
        status: dict[str, object] = {"state": event.state}
        if event.position is not None:
            status["position"] = event.position
        line = f"event: status\ndata: {_json(status)}\n\n"
    return line.encode("utf-8")


@bp.post("/api/v1/chat/stream")
@api_key_required
def start_stream():
    payload = body.json_object()
    model, messages, options = frontdoor.validate_chat(payload)
    status_events = body.boolean(payload.get("status_events", False), "status_events")
    job_id = frontdoor.start(model, messages, options, "native", features.request_fields(payload))
    return _stream(job_id, -1, status_events)


@bp.get("/api/v1/chat/stream/<request_id>")
@api_key_required
def resume_stream(request_id: str):
    _existing(request_id)
    status_events = request.args.get("status_events", "").lower() in ("1", "true", "yes")
    return _stream(request_id, _resume_point(), status_events)


@bp.get("/api/v1/models")
@api_key_required
def models():
    """Models served by online agents: ``{"models": [{"name", "agents", "slots"}]}``."""
    online = agents.online(get_db(), time.time(), current_app.config["AGENT_ONLINE_SECONDS"])
    served: dict[str, dict] = {}
    for agent in online:
        for name in {canonical_model(model) for model in agent["models"]}:
            entry = served.setdefault(name, {"name": name, "agents": 0, "slots": 0})
            entry["agents"] += 1
            entry["slots"] += agent["slots"] or 0
    return jsonify({"models": sorted(served.values(), key=lambda m: m["name"])})


@bp.get("/api/v1/chat/<request_id>")
@api_key_required
def show(request_id: str):
    record = _existing(request_id)
    text = "".join(chunk for _, chunk in chunks.chunks_after(get_db(), request_id, -1))
    agent = None
    if record["agent_id"]:
        agent = {"id": record["agent_id"], "name": agents.name_of(get_db(), record["agent_id"])}
    final = streaming.final_event(record["status"], record["error_code"], record["error_message"], record["stats"])
    error = {"code": final.code, "message": final.message} if isinstance(final, streaming.ErrorEvent) else None
    return jsonify({
        "id": request_id, "status": record["status"], "model": record["model"], "text": text,
        "chunks": record["next_seq"], "stats": record["stats"], "agent": agent, "error": error,
        "timings": {"queued_at": record["created_at"], "assigned_at": record["assigned_at"],
                    "first_token_at": record["first_token_at"], "done_at": record["finished_at"]},
    })


@bp.delete("/api/v1/chat/<request_id>")
@api_key_required
def cancel(request_id: str):
    """Cancel at once (a Stop button): a queued job leaves the queue, a running one stops at its agent's next POST."""
    _existing(request_id)
    jobs.cancel_job(get_db(), request_id, time.time())
    record = _existing(request_id)
    return jsonify({"id": request_id, "status": record["status"],
                    "cancel_requested": bool(record["cancel_requested"])})


def _existing(request_id: str) -> dict:
    record = jobs.get_job(get_db(), request_id)
    if record is None:
        raise NotFound(f"no chat request {request_id}", code="request_not_found")
    return record


def _resume_point() -> int:
    # Last-Event-ID wins over ?after=: an EventSource reconnecting to a URL
    # that carries ?after= sends the newer position in the header.
    raw = request.headers.get("Last-Event-ID") or request.args.get("after")
    if raw is None or raw == "":
        return -1
    try:
        after = int(raw)
    except ValueError:
        raise BadRequest("Last-Event-ID / ?after= must be a chunk number", code="invalid_field") from None
    if not -1 <= after <= body.MAX_SEQ:
        # Past 64 bits the database driver overflows mid-stream (a dropped connection, not an answer).
        raise BadRequest(f"Last-Event-ID / ?after= must be from -1 to {body.MAX_SEQ}", code="invalid_field")
    return after


def _stream(job_id: str, after_seq: int, status_events: bool):
    if request.method == "HEAD":
        # Headers only: following the job would park a greenlet until it ends.
        return streaming.stream_response(iter(()), encode_event, request_id=job_id)
    events = frontdoor.guarded_events(job_id, after_seq, status_events=status_events)
    return streaming.stream_response(events, encode_event, request_id=job_id)
