"""Ollama-compatible front door, answers: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``.

A client pointed at the orchestrator instead of one Ollama works unchanged:
NDJSON streams (or one object with ``"stream": false``), ``options``,
``tools``, ``images``, ``format``, ``think`` and ``keep_alive`` passed to the
agents as they are, tool calls and thinking streamed back as Ollama streams
them, Ollama's final-line statistics, and Ollama's error shape on every route.
Bodies are read as JSON whatever their Content-Type, as Ollama reads them.
The model routes (tags, show, ps, version, management) are ``ollama_models``.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from . import body, features, frontdoor, streaming
from .auth import api_key_required
from .errors import ApiError
from .ollama_wire import NDJSON, LineEncoder, OllamaError, answer, final_fields, install_error_handlers, model_not_found

bp = Blueprint("ollama_api", __name__)
install_error_handlers(bp)

# /api/generate fields that only mean something to a single Ollama holding the raw prompt: generate runs
# as a chat on the agents, so these are refused rather than silently dropped.
GENERATE_ONLY = {"suffix": "'suffix' (fill-in-the-middle) is not supported: generate runs as a chat on the agents",
                 "raw": "'raw' prompts are not supported: generate runs as a chat on the agents",
                 "template": "'template' is not supported: each agent's Ollama applies its own template",
                 "context": "'context' is not supported: the fleet keeps no state between requests; "
                            "send the conversation to /api/chat"}


@bp.post("/api/chat")
@api_key_required
def chat():
    payload = body.json_object(any_content_type=True)
    messages = payload.get("messages")
    return _answer(payload, [] if messages is None else messages, "chat")


@bp.post("/api/generate")
@api_key_required
def generate():
    payload = body.json_object(any_content_type=True)
    for name, reason in GENERATE_ONLY.items():
        if payload.get(name):
            raise OllamaError(reason)
    prompt = payload.get("prompt") or ""
    if not prompt:
        return _answer(payload, [], "generate")
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if payload.get("images") is not None:
        user["images"] = payload["images"]
    messages = [user]
    if payload.get("system"):
        messages.insert(0, {"role": "system", "content": payload["system"]})
    return _answer(payload, messages, "generate")


def _answer(payload: dict[str, Any], messages: Any, kind: str):
    stream = body.boolean(payload.get("stream", True), "stream")
    if messages == []:
        # Ollama's "load a model" request: no prompt, one final object, even when streaming.
        model = body.model_name(payload.get("model")) if payload.get("model") is not None else ""
        if not frontdoor.serves(model):
            raise model_not_found(model)
        reason = "unload" if payload.get("keep_alive") == 0 else "load"
        return answer(kind, model, "", done=True, done_reason=reason)
    model, messages, options = frontdoor.validate_chat(
        {"model": payload.get("model"), "messages": messages, "options": payload.get("options")})
    request_id = _start(lambda: frontdoor.start(model, messages, options, "ollama",
                                                features.request_fields(payload)), payload)
    # An Ollama client can never resume a stream: its leaving cancels the job at once.
    events = frontdoor.guarded_events(request_id, grace=0)
    if stream:
        return streaming.stream_response(events, LineEncoder(kind, model), request_id=request_id, mimetype=NDJSON)
    result = _collected(events)
    return answer(kind, model, result.text, result.thinking, result.tool_calls, **final_fields(result.stats))


@bp.post("/api/embed")
@api_key_required
def embed():
    payload = body.json_object(any_content_type=True)
    model = frontdoor.validate_model(payload)
    inputs = features.embed_inputs(payload.get("input"))
    result = _embeddings(payload, model, inputs, {k: payload[k] for k in ("truncate", "dimensions")
                                                  if payload.get(k) is not None})
    stats = result.stats
    return {"model": model, "embeddings": result.embeddings,
            **{k: stats[k] for k in ("total_duration", "load_duration", "prompt_eval_count") if k in stats}}


@bp.post("/api/embeddings")
@api_key_required
def embeddings():
    """The legacy single-prompt form: ``{"model", "prompt"}`` -> ``{"embedding": [...]}``."""
    payload = body.json_object(any_content_type=True)
    model = frontdoor.validate_model(payload)
    prompt = body.text(payload.get("prompt"), "prompt", allow_empty=True)
    result = _embeddings(payload, model, [prompt], {})
    return {"embedding": result.embeddings[0] if result.embeddings else []}


def _embeddings(payload: dict[str, Any], model: str, inputs: list[str], fields: dict[str, Any]) -> frontdoor.Answer:
    if "truncate" in fields:
        body.boolean(fields["truncate"], "truncate")
    if "dimensions" in fields:
        body.integer(fields["dimensions"], "dimensions", minimum=1, maximum=65536)
    if payload.get("keep_alive") is not None:
        fields["keep_alive"] = features.keep_alive(payload["keep_alive"])
    options = body.mapping(payload["options"], "options") if payload.get("options") is not None else {}
    request_id = _start(lambda: frontdoor.start_embed(model, inputs, options, "ollama", fields), payload)
    return _collected(frontdoor.guarded_events(request_id, grace=0))


def _start(start, payload: dict[str, Any]) -> str:
    try:
        return start()
    except ApiError as exc:
        if exc.code == "model_not_found":
            raise model_not_found(payload.get("model")) from None
        raise


def _collected(events) -> frontdoor.Answer:
    try:
        return frontdoor.collect(events)
    except frontdoor.AnswerFailed as exc:
        raise OllamaError(exc.message, exc.status) from None
