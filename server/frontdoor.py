"""The one intake behind every chat front door (native SSE, OpenAI, Ollama): check, queue, follow.

Each door has its own wire format and error shape; underneath, a chat is the
same job on the same queue::

    model, messages, options = validate_chat(payload)            # BadRequest (400)
    job_id = start(model, messages, options, front_door="openai")  # NotFound model_not_found (404)
    events = guarded_events(job_id)                               # the client leaving cancels the job
    return streaming.stream_response(events, encode, request_id=job_id)

or ``collect(events)`` for a client that asked for the whole answer at once
(a client that hangs up on a non-streamed answer cancels it too).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from . import body, streaming
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


class AnswerFailed(Exception):
    """The job ended with an error event instead of an answer."""

    def __init__(self, event: streaming.ErrorEvent) -> None:
        super().__init__(event.message)
        self.code = event.code
        self.message = event.message
        self.status = FAILURE_STATUS.get(event.code, 500)


def validate_chat(payload: dict[str, Any]) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """``(model, messages, options)`` from a chat body, or BadRequest; unknown keys are ignored."""
    if payload.get("model") is None:
        raise BadRequest("'model' is required", code="invalid_field")
    model = body.text(payload["model"], "model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", code="invalid_field")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object with 'role' and 'content'", code="invalid_field")
        if message.get("role") not in ROLES:
            raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", code="invalid_field")
        content = body.text(message.get("content"), f"messages[{i}].content", allow_empty=True)
        checked.append({"role": message["role"], "content": content})
    options = payload.get("options")
    return model, checked, {} if options is None else body.mapping(options, "options")


def start_chat(conn: Connection, config: dict[str, Any], model: str, messages: list[dict[str, str]],
               options: dict[str, Any], front_door: str = "native") -> str:
    """Queue a chat (its job wakes a long poll); NotFound ``model_not_found`` if no online agent serves it."""
    now = time.time()
    if not agents.serves(agents.online(conn, now, config["AGENT_ONLINE_SECONDS"]), model):
        raise NotFound(f"no online agent serves the model '{model}'", code="model_not_found")
    return jobs.create_job(conn, model, messages, options, now, front_door)


def start(model: str, messages: list[dict[str, str]], options: dict[str, Any], front_door: str) -> str:
    """``start_chat`` for the current request."""
    job_id = start_chat(get_db(), current_app.config, model, messages, options, front_door)
    # The job's wake-up went out with the INSERT: under gevent, the parked poll or agent socket it woke
    # claims and sends the job only when this greenlet yields; yield now, before the response is built,
    # so the job reaches its agent first (make bench, ws on loopback: pickup p50 ~6 -> ~4 ms).
    time.sleep(0)
    return job_id


def guarded_events(job_id: str, after_seq: int = -1, *, status_events: bool = False) -> DisconnectGuard:
    """The job's events, cancelling it if the client leaves first (call inside the request)."""
    # The intake's connection goes back first: the guard borrows its own, and a view holding one while
    # borrowing another would deadlock a bounded pool (PostgreSQL's) under load.
    close_db()
    app = current_app._get_current_object()
    return DisconnectGuard(app, job_id, streaming.follow(app, job_id, after_seq, status_events=status_events),
                           client_socket=request.environ.get("gunicorn.socket"))


def collect(events: Iterator[streaming.Event]) -> Answer:
    """Wait for the whole answer; raises ``AnswerFailed`` on an error event."""
    parts = []
    try:
        for event in events:
            if isinstance(event, streaming.ChunkEvent):
                parts.append(event.text)
            elif isinstance(event, streaming.DoneEvent):
                return Answer("".join(parts), event.stats or {})
            elif isinstance(event, streaming.ErrorEvent):
                raise AnswerFailed(event)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    raise AnswerFailed(streaming.ErrorEvent("internal_error", "the answer ended without a final event"))


def served_models() -> list[str]:
    """Models declared by online agents, sorted (agents that declared none serve anything, unlisted)."""
    online = agents.online(get_db(), time.time(), current_app.config["AGENT_ONLINE_SECONDS"])
    return sorted({model for agent in online for model in agent["models"]})
