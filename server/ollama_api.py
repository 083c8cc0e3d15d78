"""Ollama-compatible front door: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/version``.

A client pointed at the orchestrator instead of one Ollama works unchanged:
NDJSON streams (or one object with ``"stream": false``), ``options`` passed
to the agents as they are, Ollama's final-line statistics, and Ollama's error
shape ``{"error": "message"}`` on every route here.
"""
from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, jsonify
from werkzeug.exceptions import HTTPException

from . import body, frontdoor, streaming
from .auth import api_key_required
from .errors import ApiError, storage_unavailable
from .storage import StorageError

bp = Blueprint("ollama_api", __name__)

VERSION = "0.6.0"    # the Ollama API version whose behaviour this door follows
NDJSON = "application/x-ndjson"
# Request fields whose meaning no agent can honour: refused rather than silently dropped.
UNSUPPORTED = ("tools", "format", "images", "suffix")
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
         "eval_duration")


class OllamaError(Exception):
    """An error rendered as Ollama's ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@bp.errorhandler(OllamaError)
def _render(exc: OllamaError):
    response = jsonify({"error": exc.message})
    response.status_code = exc.status
    return response


@bp.errorhandler(ApiError)
def _render_api_error(exc: ApiError):
    return _render(OllamaError(exc.message, exc.status))


@bp.errorhandler(StorageError)
def _render_storage_error(exc: StorageError):
    api = storage_unavailable(exc)
    return _render(OllamaError(api.message, api.status))


@bp.errorhandler(HTTPException)
def _render_http_error(exc: HTTPException):
    return _render(OllamaError(exc.description or exc.name, exc.code or 500))


@bp.get("/api/version")
def version():
    return {"version": VERSION}


@bp.get("/api/tags")
@api_key_required
def tags():
    names = frontdoor.served_models()
    # Agents offer both `m:latest` and `m` for Ollama's models; Ollama itself lists only the full name.
    listed = [n for n in names if ":" in n.rsplit("/", 1)[-1] or f"{n}:latest" not in names]
    return {"models": [_tag(name) for name in listed]}


def _tag(name: str) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": _timestamp(), "size": 0, "digest": "",
            "details": {"format": "", "family": "", "families": None, "parameter_size": "",
                        "quantization_level": ""}}


@bp.post("/api/chat")
@api_key_required
def chat():
    payload = body.json_object()
    _refuse_unsupported(payload, ("messages",))
    messages = payload.get("messages")
    return _answer(payload, [] if messages is None else messages, "chat")


@bp.post("/api/generate")
@api_key_required
def generate():
    payload = body.json_object()
    _refuse_unsupported(payload, ())
    prompt = payload.get("prompt") or ""
    messages = [{"role": "user", "content": prompt}] if prompt else []
    if payload.get("system"):
        messages.insert(0, {"role": "system", "content": payload["system"]})
    return _answer(payload, messages if prompt else [], "generate")


def _refuse_unsupported(payload: dict[str, Any], nested_in: tuple[str, ...]) -> None:
    for name in UNSUPPORTED:
        if payload.get(name):
            raise OllamaError(f"'{name}' is not supported by this server")
    for field in nested_in:
        items = payload.get(field)
        if isinstance(items, list) and any(isinstance(m, dict) and (m.get("images") or m.get("tool_calls"))
                                           for m in items):
            raise OllamaError(f"images and tool calls in '{field}' are not supported by this server")


def _answer(payload: dict[str, Any], messages: Any, kind: str):
    stream = body.boolean(payload.get("stream", True), "stream")
    if messages == []:
        # Ollama's "load a model" request: no prompt, one final object, even when streaming.
        model = body.model_name(payload.get("model")) if payload.get("model") is not None else ""
        if model not in frontdoor.served_models():
            raise _model_not_found(model)
        return _line_dict(kind, model, "", done=True, done_reason="load")
    try:
        model, messages, options = frontdoor.validate_chat(
            {"model": payload.get("model"), "messages": messages, "options": payload.get("options")})
        request_id = frontdoor.start(model, messages, options, "ollama")
    except ApiError as exc:
        if exc.code == "model_not_found":
            raise _model_not_found(payload.get("model")) from None
        raise
    events = frontdoor.guarded_events(request_id)
    if stream:
        return streaming.stream_response(events, LineEncoder(kind, model), request_id=request_id, mimetype=NDJSON)
    try:
        answer = frontdoor.collect(events)
    except frontdoor.AnswerFailed as exc:
        raise OllamaError(exc.message, exc.status) from None
    return _line_dict(kind, model, answer.text, **_final_fields(answer.stats))


def _model_not_found(model: Any) -> OllamaError:
    return OllamaError(f'model "{model}" not found, try pulling it first', 404)


class LineEncoder:
    """Engine events as Ollama's NDJSON lines; the last carries ``done`` and the statistics."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model

    def __call__(self, event: streaming.Event) -> bytes:
        if isinstance(event, streaming.ChunkEvent):
            return _line(_line_dict(self.kind, self.model, event.text, done=False))
        if isinstance(event, streaming.DoneEvent):
            return _line(_line_dict(self.kind, self.model, "", **_final_fields(event.stats)))
        if isinstance(event, streaming.ErrorEvent):
            return _line({"error": event.message})
        # NDJSON has no comment line: Ollama's clients parse every line, so a keepalive sends nothing.
        return b""


def _final_fields(stats: dict[str, Any] | None) -> dict[str, Any]:
    stats = stats or {}
    return {"done": True, "done_reason": stats.get("done_reason") or "stop",
            **{k: stats[k] for k in STATS if k in stats}}


def _line_dict(kind: str, model: str, text: str, **fields: Any) -> dict[str, Any]:
    head: dict[str, Any] = {"model": model, "created_at": _timestamp()}
    if kind == "chat":
        head["message"] = {"role": "assistant", "content": text}
    else:
        head["response"] = text
    return {**head, **fields}


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _timestamp() -> str:
    """Now in Ollama's RFC 3339 form with nanoseconds, UTC."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"
