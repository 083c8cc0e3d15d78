"""The one intake behind every chat front door (native SSE, OpenAI, Ollama): check, queue, follow.

Each door has its own wire format and error shape; underneath, a chat is the
same job on the same queue::

    model, messages, options = validate_chat(payload)            # BadRequest (400)
    request = features.request_fields(payload)                   # tools, format, think, keep_alive
    job_id = start(model, messages, options, "ollama", request)  # NotFound model_not_found (404)
    events = guarded_events(job_id, grace=0)                     # the client leaving cancels the job
    return streaming.stream_response(events, encode, request_id=job_id)

or ``collect(events)`` for a client that asked for the whole answer at once
(a client that hangs up on a non-streamed answer cancels it too).  Embeddings
are jobs of kind ``embed``: ``start_embed`` queues one, ``collect`` gathers
its vectors.  A chat that uses tools, images, format or think is of kind
``features`` and only goes to agents that pass those through.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, request

from protocol.models import EMBED, canonical_model

from . import body, features, limits, streaming
from .disconnect import DisconnectGuard
from .errors import BadRequest, NotFound
from .storage import Connection, agents, close_db, get_db, jobs

ROLES = ("system", "user", "assistant", "tool")
# HTTP statuses for a job that failed before a whole answer could be returned.
FAILURE_STATUS = {
    "queue_timeout": 503, "attempts_exhausted": 503, "server_shutting_down": 503,
    "storage_unavailable": 503, "agent_lost": 502, "agent_error": 502, "cancelled": 409, "not_found": 404,
}


@dataclass(frozen=True)
class Answer:
    """A whole answer, for clients that asked for no stream."""

    text: str
    stats: dict[str, Any]
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[list[float]] = field(default_factory=list)


class AnswerFailed(Exception):
    """The job ended with an error event instead of an answer."""

    def __init__(self, event: streaming.ErrorEvent) -> None:
        super().__init__(event.message)
        self.code = event.code
        self.message = event.message
        self.status = FAILURE_STATUS.get(event.code, 500)


def validate_chat(payload: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """``(model, messages, options)`` from a chat body, or BadRequest; unknown keys are ignored.

    A message keeps Ollama's ``images``, ``tool_calls``, ``tool_name`` and ``thinking``; an assistant
    turn that only called tools may have no content.
    """
    model = validate_model(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", code="invalid_field")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object with 'role' and 'content'", code="invalid_field")
        if message.get("role") not in ROLES:
            raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", code="invalid_field")
        content = message.get("content")
        if content is None and message["role"] == "assistant" and message.get("tool_calls"):
            content = ""
        content = body.text(content, f"messages[{i}].content", allow_empty=True)
        checked.append({"role": message["role"], "content": content,
                        **features.message_fields(message, f"messages[{i}]")})
    options = payload.get("options")
    return model, checked, {} if options is None else body.mapping(options, "options")


def validate_model(payload: dict[str, Any]) -> str:
    if payload.get("model") is None:
        raise BadRequest("'model' is required", code="invalid_field")
    return body.model_name(payload["model"])


def start_chat(conn: Connection, config: dict[str, Any], model: str, messages: list[dict[str, Any]],
               options: dict[str, Any], front_door: str = "native", request_fields: dict[str, Any] | None = None,
               kind: str | None = None) -> str:
    """Queue a job (it wakes a long poll); NotFound ``model_not_found`` if no online agent serves the model,
    ``kind_unavailable`` if none of those can run this kind of job.  The job keeps the canonical model name."""
    now = time.time()
    request_fields = request_fields or {}
    kind = kind or features.kind_of(messages, request_fields)
    online = agents.online(conn, now, config["AGENT_ONLINE_SECONDS"])
    if not agents.serves(online, model):
        raise NotFound(f"no online agent serves the model '{model}'", code="model_not_found")
    if not agents.serves(online, model, kind):
        what = "embeddings" if kind == EMBED else "tools, images, format or think"
        raise NotFound(f"the agents serving '{model}' run an older agent that cannot pass {what} through; "
                       "upgrade them", code="kind_unavailable")
    return jobs.create_job(conn, canonical_model(model), messages, options, now, front_door, kind,
                           request_fields or None)


def start(model: str, messages: list[dict[str, Any]], options: dict[str, Any], front_door: str,
          request_fields: dict[str, Any] | None = None) -> str:
    """``start_chat`` for the current request, once it has a stream slot (429 ``too_many_streams`` otherwise)."""
    limits.admit()
    job_id = start_chat(get_db(), current_app.config, model, messages, options, front_door, request_fields)
    # The job's wake-up went out with the INSERT: under gevent, the parked poll or agent socket it woke
    # claims and sends the job only when this greenlet yields; yield now, before the response is built,
    # so the job reaches its agent first (make bench, ws on loopback: pickup p50 ~6 -> ~4 ms).
    time.sleep(0)
    return job_id


def start_embed(model: str, inputs: list[str], options: dict[str, Any], front_door: str,
                request_fields: dict[str, Any] | None = None) -> str:
    """Queue an embedding job of ``inputs`` (one vector per input comes back, in order)."""
    return start_chat(get_db(), current_app.config, model, [], options, front_door,
                      {**(request_fields or {}), "input": inputs}, EMBED)


def guarded_events(job_id: str, after_seq: int = -1, *, status_events: bool = False,
                   grace: float | None = None) -> DisconnectGuard:
    """The job's events, cancelling it if the client leaves first (call inside the request).

    ``grace`` overrides CANCEL_GRACE: 0 for doors whose clients can never resume a stream.
    """
    # The intake's connection goes back first: the guard borrows its own, and a view holding one while
    # borrowing another would deadlock a bounded pool (PostgreSQL's) under load.
    close_db()
    app = current_app._get_current_object()
    slot = limits.hand_over()
    # The request is done with its connection: a stream borrows one per read, never holds one.
    close_db()
    return DisconnectGuard(app, job_id, streaming.follow(app, job_id, after_seq, status_events=status_events),
                           client_socket=request.environ.get("gunicorn.socket"), grace=grace, on_close=slot.release)


def collect(events: Iterator[streaming.Event]) -> Answer:
    """Wait for the whole answer; raises ``AnswerFailed`` on an error event."""
    text, thinking, calls, vectors = [], [], [], []
    try:
        for event in events:
            if isinstance(event, streaming.ChunkEvent):
                text.append(event.text)
                if event.parts:
                    thinking.append(event.parts.get("thinking", ""))
                    calls.extend(event.parts.get("tool_calls", ()))
                    if "embedding" in event.parts:
                        vectors.append(event.parts["embedding"])
            elif isinstance(event, streaming.DoneEvent):
                return Answer("".join(text), event.stats or {}, "".join(thinking), calls, vectors)
            elif isinstance(event, streaming.ErrorEvent):
                raise AnswerFailed(event)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    raise AnswerFailed(streaming.ErrorEvent("internal_error", "the answer ended without a final event"))


def served_models() -> list[str]:
    """Models declared by online agents, by canonical name (``sim`` is ``sim:latest``), once each, sorted.

    Agents that declared none serve anything, unlisted.
    """
    online = agents.online(get_db(), time.time(), current_app.config["AGENT_ONLINE_SECONDS"])
    return sorted({canonical_model(model) for agent in online for model in agent["models"]})


def serves(model: str) -> bool:
    """Whether an online agent serves ``model`` (with or without ``:latest``)."""
    return canonical_model(model) in served_models()
