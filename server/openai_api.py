"""OpenAI-compatible front door: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A chat here is an ordinary request on the shared queue (``front_door`` =
``openai``); only the wire format differs.  OpenAI's sampling parameters
become Ollama options, and Ollama options may also be passed as ``options``
(``extra_body`` in the official client).  Every error on these routes,
including the shared body and API-key checks, is OpenAI's error object.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from . import body, frontdoor, streaming
from .auth import api_key_required
from .errors import ApiError, storage_unavailable
from .storage import StorageError

bp = Blueprint("openai_api", __name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Parameters that change the answer in ways no agent can honour: refused, not silently dropped.
UNSUPPORTED = ("tools", "functions", "logit_bias", "audio", "prediction", "top_logprobs")
FINISH_REASONS = {"stop": "stop", "length": "length"}


class OpenAIError(Exception):
    """An error rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@bp.errorhandler(OpenAIError)
def _render(exc: OpenAIError):
    response = jsonify(exc.to_json())
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@bp.errorhandler(ApiError)
def _render_api_error(exc: ApiError):
    # The shared checks (body, API key, model lookup) speak the native envelope; translate.
    param = "model" if exc.code == "model_not_found" else _param_named_in(exc.message)
    return _render(OpenAIError(exc.message, exc.status, param=param, code=exc.code))


@bp.errorhandler(StorageError)
def _render_storage_error(exc: StorageError):
    api = storage_unavailable(exc)
    return _render(OpenAIError(api.message, api.status, code=api.code))


@bp.errorhandler(HTTPException)
def _render_http_error(exc: HTTPException):
    return _render(OpenAIError(exc.description or exc.name, exc.code or 500))


class _AnyPath(PathConverter):
    """Werkzeug's ``path`` stops at a line feed: no route matched, and the 404 lost OpenAI's shape."""

    regex = "[^/][\\s\\S]*?"


@bp.record_once
def _add_converter(state) -> None:
    # Recorded before the routes below, so it is in the URL map before they are added.
    state.app.url_map.converters["any_path"] = _AnyPath


def _param_named_in(message: str) -> str | None:
    match = re.match(r"'([^']+)'", message)
    return match.group(1) if match else None


@bp.route("/v1/<any_path:_rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@api_key_required
def unknown_route(_rest: str):
    raise OpenAIError(f"Invalid URL ({request.method} {request.path}): this server offers /v1/chat/completions "
                      "and /v1/models", 404, code="unknown_url")


@bp.get("/v1/models")
@api_key_required
def list_models():
    return {"object": "list", "data": [_model_entry(name) for name in frontdoor.served_models()]}


@bp.get("/v1/models/<any_path:model>")
@api_key_required
def show_model(model: str):
    if model not in frontdoor.served_models():
        raise OpenAIError(f"The model '{model}' does not exist or no online agent serves it", 404,
                          param="model", code="model_not_found")
    return _model_entry(model)


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ollama-orchestrator"}


@bp.post("/v1/chat/completions")
@api_key_required
def chat_completions():
    payload = body.json_object()
    model, messages, options = frontdoor.validate_chat(
        {"model": payload.get("model"), "messages": _messages(payload.get("messages")), "options": _options(payload)})
    stream = body.boolean(payload.get("stream", False), "stream")
    include_usage = _include_usage(payload, stream)
    request_id = frontdoor.start(model, messages, options, "openai")
    completion = {"id": "chatcmpl-" + request_id, "created": int(time.time()), "model": model}
    events = frontdoor.guarded_events(request_id)
    if stream:
        return streaming.stream_response(events, ChunkEncoder(completion, include_usage), request_id=request_id)
    try:
        answer = frontdoor.collect(events)
    except frontdoor.AnswerFailed as exc:
        raise OpenAIError(exc.message, exc.status, code=exc.code) from None
    message = {"role": "assistant", "content": answer.text}
    return {**completion, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(answer.stats)}],
            "usage": _usage(answer.stats)}


def _messages(messages: Any) -> Any:
    """OpenAI's message forms (content parts, the ``developer`` role) as plain {role, content}."""
    if not isinstance(messages, list):
        return messages           # validate_chat names the problem
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return messages
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(_text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
        elif content is None and message.get("role") == "assistant":
            content = ""          # an assistant turn that only carried tool calls
        role = message.get("role")
        # A list or object as the role would be unhashable here: leave it for validate_chat to refuse.
        plain.append({"role": ROLES.get(role, role) if isinstance(role, str) else role, "content": content})
    return plain


def _text_part(part: Any, name: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise OpenAIError(f"'{name}': content parts of type {kind!r} are not supported, only 'text'", param=name,
                      code="unsupported_content")


def _options(payload: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's parameters as Ollama options, over any ``options`` passed as is; refuses what no agent honours."""
    for name in UNSUPPORTED:
        if payload.get(name):
            raise _unsupported(name, f"'{name}' is not supported by this server")
    if payload.get("n") not in (None, 1):
        raise _unsupported("n", "'n' must be 1: this server returns one choice per request")
    if payload.get("logprobs"):
        raise _unsupported("logprobs", "'logprobs' is not supported by this server")
    if payload.get("tool_choice") not in (None, "none"):
        raise _unsupported("tool_choice", "'tool_choice' is not supported: this server has no tools")
    response_format = payload.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _unsupported("response_format", "only 'response_format': {'type': 'text'} is supported")
    options = dict(body.mapping(payload["options"], "options")) if payload.get("options") is not None else {}
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2),
                            ("frequency_penalty", -2, 2)):
        if payload.get(name) is not None:
            options[name] = _number(payload[name], name, low, high)
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = body.integer(max_tokens, "max_tokens", minimum=1)
    if payload.get("seed") is not None:
        options["seed"] = body.integer(payload["seed"], "seed", minimum=-(2**63), maximum=2**63 - 1)
    if payload.get("stop") is not None:
        options["stop"] = _stop(payload["stop"])
    return options


def _unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(message, 400, param=param, code="unsupported_parameter")


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIError(f"'{name}' must be a number from {low} to {high}", param=name, code="invalid_value")
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 0 < len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError("'stop' must be a string or a list of 1 to 4 non-empty strings", param="stop",
                          code="invalid_value")
    return stops


def _include_usage(payload: dict[str, Any], stream: bool) -> bool:
    stream_options = payload.get("stream_options")
    if stream_options is None:
        return False
    if not stream:
        raise OpenAIError("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                          code="invalid_value")
    return body.boolean(body.mapping(stream_options, "stream_options").get("include_usage", False),
                        "stream_options.include_usage")


def _finish_reason(stats: dict[str, Any] | None) -> str:
    return FINISH_REASONS.get((stats or {}).get("done_reason"), "stop")


def _usage(stats: dict[str, Any] | None) -> dict[str, int]:
    stats = stats or {}
    prompt, completion = int(stats.get("prompt_eval_count") or 0), int(stats.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChunkEncoder:
    """Engine events as ``chat.completion.chunk`` SSE events, role first, then ``data: [DONE]``."""

    def __init__(self, completion: dict[str, Any], include_usage: bool) -> None:
        self.completion = {**completion, "object": "chat.completion.chunk"}
        self.include_usage = include_usage
        self.role_sent = False

    def __call__(self, event: streaming.Event) -> bytes:
        if isinstance(event, streaming.KeepaliveEvent):
            return b": keepalive\n\n"
        if isinstance(event, streaming.StatusEvent):
            return b""
        if isinstance(event, streaming.ErrorEvent):
            error = OpenAIError(event.message, frontdoor.FAILURE_STATUS.get(event.code, 500), code=event.code)
            return _sse(error.to_json())
        out = b"" if self.role_sent else self._chunk({"role": "assistant", "content": ""})
        self.role_sent = True
        if isinstance(event, streaming.ChunkEvent):
            return out + self._chunk({"content": event.text})
        out += self._chunk({}, _finish_reason(event.stats))
        if self.include_usage:
            out += _sse({**self.completion, "choices": [], "usage": _usage(event.stats)})
        return out + b"data: [DONE]\n\n"

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        chunk = {**self.completion, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None     # OpenAI's rule: null on every chunk but the last
        return _sse(chunk)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
