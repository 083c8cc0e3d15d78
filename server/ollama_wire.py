"""Ollama's wire format for the Ollama door: its error shape, NDJSON lines, timestamps.

Every route of the Ollama door renders errors as ``{"error": "message"}``
(``install_error_handlers``), including the shared body, API-key and model checks.
"""
from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, jsonify
from werkzeug.exceptions import HTTPException

from . import streaming
from .errors import ApiError, storage_unavailable
from .storage import StorageError

NDJSON = "application/x-ndjson"
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
         "eval_duration")


class OllamaError(Exception):
    """An error rendered as Ollama's ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def render(exc: OllamaError):
    response = jsonify({"error": exc.message})
    response.status_code = exc.status
    return response


def install_error_handlers(bp: Blueprint) -> None:
    """Render OllamaError, the shared ApiError checks and Werkzeug's errors in Ollama's shape on ``bp``."""
    bp.register_error_handler(OllamaError, render)
    bp.register_error_handler(ApiError, lambda exc: render(OllamaError(exc.message, exc.status)))
    bp.register_error_handler(StorageError, lambda exc: render(OllamaError(storage_unavailable(exc).message, 503)))
    bp.register_error_handler(HTTPException,
                              lambda exc: render(OllamaError(exc.description or exc.name, exc.code or 500)))


def model_not_found(model: Any) -> OllamaError:
    """Ollama's own words for a model it does not have."""
    return OllamaError(f'model "{model}" not found, try pulling it first', 404)


class LineEncoder:
    """Engine events as Ollama's NDJSON lines; the last carries ``done`` and the statistics."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model

    def __call__(self, event: streaming.Event) -> bytes:
        if isinstance(event, streaming.ChunkEvent):
            parts = event.parts or {}
            return line(answer(self.kind, self.model, event.text, parts.get("thinking", ""),
                               parts.get("tool_calls", ()), done=False))
        if isinstance(event, streaming.DoneEvent):
            return line(answer(self.kind, self.model, "", **final_fields(event.stats)))
        if isinstance(event, streaming.ErrorEvent):
            return line({"error": event.message})
        # NDJSON has no comment line: Ollama's clients parse every line, so a keepalive sends nothing.
        return b""


def final_fields(stats: dict[str, Any] | None) -> dict[str, Any]:
    stats = stats or {}
    return {"done": True, "done_reason": stats.get("done_reason") or "stop",
            **{k: stats[k] for k in STATS if k in stats}}


def answer(kind: str, model: str, text: str, thinking: str = "", tool_calls: Any = (), **fields: Any) -> dict[str, Any]:
    """One answer object of ``/api/chat`` (``message``) or ``/api/generate`` (``response``)."""
    head: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = list(tool_calls)
        head["message"] = message
    else:
        head["response"] = text
        if thinking:
            head["thinking"] = thinking
    return {**head, **fields}


def line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def timestamp() -> str:
    """Now in Ollama's RFC 3339 form with nanoseconds, UTC."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"
