"""What the compatibility front doors (OpenAI, Ollama) share beyond the streaming engine.

Each door has its own wire format and error shape; underneath, a chat is the
same request on the same queue as a native one, followed through
``streaming.follow`` behind a ``DisconnectGuard`` whether the client reads a
stream or waits for the whole answer (a client that hangs up on a
non-streamed answer cancels it too).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from . import agents, streaming
from .db import get_db
from .notifier import current_notifier

# HTTP statuses for a request that failed before a whole answer could be returned.
FAILURE_STATUS = {
    "queue_timeout": 503, "attempts_exhausted": 503, "server_shutting_down": 503,
    "agent_lost": 502, "agent_error": 502, "cancelled": 409, "not_found": 404,
}


@dataclass(frozen=True)
class Answer:
    """A whole answer, for clients that asked for no stream."""

    text: str
    stats: dict[str, Any]


class AnswerFailed(Exception):
    """The request ended with an error event instead of an answer."""

    def __init__(self, event: streaming.ErrorEvent) -> None:
        super().__init__(event.message)
        self.code = event.code
        self.message = event.message
        self.status = FAILURE_STATUS.get(event.code, 500)


def start(model: str, messages: list[dict[str, str]], options: dict[str, Any], front_door: str) -> str:
    """Queue a chat; NotFound ``model_not_found`` when no online agent serves ``model``."""
    return streaming.start_request(get_db(), current_notifier(), current_app.config, model, messages, options,
                                   front_door=front_door)


def guarded_events(request_id: str) -> streaming.DisconnectGuard:
    """The request's events, cancelling it if the client leaves first (call inside the request)."""
    app = current_app._get_current_object()
    return streaming.DisconnectGuard(app, request_id, streaming.follow(app, request_id),
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
