"""OpenAI-compatible front door: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``.

A chat here is an ordinary request on the shared queue (``front_door`` =
``openai``); only the wire format differs (``openai_wire``).  OpenAI's
sampling parameters become Ollama options, and Ollama options may also be
passed as ``options`` (``extra_body`` in the official client).  Every error on
these routes, including the shared body and API-key checks, is OpenAI's error object.
"""
from __future__ import annotations

import base64
import re
import struct
import time
from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from protocol.models import canonical_model

from . import body, features, frontdoor, openai_wire, streaming
from .auth import api_key_required
from .errors import ApiError, storage_unavailable
from .storage import StorageError

bp = Blueprint("openai_api", __name__)

# Parameters that change the answer in ways no agent can honour: refused, not silently dropped.
UNSUPPORTED = ("functions", "logit_bias", "audio", "prediction", "top_logprobs")


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
    raise OpenAIError(f"Invalid URL ({request.method} {request.path}): this server offers /v1/chat/completions, "
                      "/v1/embeddings and /v1/models", 404, code="unknown_url")


@bp.get("/v1/models")
@api_key_required
def list_models():
    return {"object": "list", "data": [_model_entry(name) for name in frontdoor.served_models()]}


@bp.get("/v1/models/<any_path:model>")
@api_key_required
def show_model(model: str):
    if not frontdoor.serves(model):
        raise OpenAIError(f"The model '{model}' does not exist or no online agent serves it", 404,
                          param="model", code="model_not_found")
    return _model_entry(canonical_model(model))


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ollama-orchestrator"}


@bp.post("/v1/chat/completions")
@api_key_required
def chat_completions():
    payload = body.json_object()
    try:
        converted = openai_wire.messages(payload.get("messages"))
        options = _options(payload)
        fields = openai_wire.request_fields(payload)
    except openai_wire.Refused as exc:
        raise OpenAIError(exc.message, param=exc.param, code=exc.code) from None
    model, messages, options = frontdoor.validate_chat(
        {"model": payload.get("model"), "messages": converted, "options": options})
    stream = body.boolean(payload.get("stream", False), "stream")
    include_usage = _include_usage(payload, stream)
    request_id = frontdoor.start(model, messages, options, "openai", fields)
    completion = {"id": "chatcmpl-" + request_id, "created": int(time.time()), "model": model}
    # An OpenAI client can never resume a stream: its leaving cancels the job at once.
    events = frontdoor.guarded_events(request_id, grace=0)
    if stream:
        encoder = openai_wire.ChunkEncoder(completion, include_usage, OpenAIError)
        return streaming.stream_response(events, encoder, request_id=request_id)
    answer = _collected(events)
    called = bool(answer.tool_calls)
    return {**completion, "object": "chat.completion",
            "choices": [{"index": 0, "message": openai_wire.message(answer, request_id[:12]), "logprobs": None,
                         "finish_reason": openai_wire.finish_reason(answer.stats, called)}],
            "usage": openai_wire.usage(answer.stats)}


@bp.post("/v1/embeddings")
@api_key_required
def embeddings():
    payload = body.json_object()
    model = frontdoor.validate_model(payload)
    raw = payload.get("input")
    if isinstance(raw, list) and raw and all(isinstance(x, int) or isinstance(x, list) for x in raw):
        raise OpenAIError("'input' as token arrays is not supported: send text", param="input",
                          code="unsupported_parameter")
    inputs = features.embed_inputs(raw)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise OpenAIError("'encoding_format' must be 'float' or 'base64'", param="encoding_format",
                          code="invalid_value")
    fields = {}
    if payload.get("dimensions") is not None:
        fields["dimensions"] = body.integer(payload["dimensions"], "dimensions", minimum=1, maximum=65536)
    request_id = frontdoor.start_embed(model, inputs, {}, "openai", fields)
    answer = _collected(frontdoor.guarded_events(request_id, grace=0))
    prompt_tokens = int(answer.stats.get("prompt_eval_count") or 0)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(vector, encoding)}
                     for i, vector in enumerate(answer.embeddings)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    # OpenAI's base64 form: the float32 values, little-endian, base64-encoded.
    return vector if encoding == "float" else base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _collected(events) -> frontdoor.Answer:
    try:
        return frontdoor.collect(events)
    except frontdoor.AnswerFailed as exc:
        raise OpenAIError(exc.message, exc.status, code=exc.code) from None


def _options(payload: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's parameters as Ollama options, over any ``options`` passed as is; refuses what no agent honours."""
    for name in UNSUPPORTED:
        if payload.get(name):
            raise _unsupported(name, f"'{name}' is not supported by this server")
    if payload.get("n") not in (None, 1):
        raise _unsupported("n", "'n' must be 1: this server returns one choice per request")
    if payload.get("logprobs"):
        raise _unsupported("logprobs", "'logprobs' is not supported by this server")
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
