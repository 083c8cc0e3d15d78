"""The OpenAI-compatible backend: llama.cpp's `llama-server`, vLLM, LM Studio...

`/v1/models` for the models, a streamed `/v1/chat/completions` per job.  Jobs
carry Ollama's options; they are renamed here, and the answer's `usage` and
`finish_reason` become Ollama-style statistics, so the server and the worker
never learn which engine answered.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from agent.backend import BackendError
from agent.httpstream import HttpChatStream
from agent.openai_request import ToolCallAssembler, openai_messages, request_fields
from protocol.deltas import Delta
from protocol.models import KINDS

DEFAULT_CONNECT_TIMEOUT = 5.0
# Nothing flows while the engine loads a model on a cold start: be as patient as with Ollama.
DEFAULT_READ_TIMEOUT = 600.0
MODELS_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, 10.0)
MAX_LINE = 1 << 20

# Ollama's option names that OpenAI's API spells differently.
RENAMED_OPTIONS = {"num_predict": "max_tokens"}
# Ollama's options that configure the runner rather than the sampling: meaningless to another engine.
RUNNER_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "use_mmap", "use_mlock",
    "numa", "low_vram", "vocab_only", "f16_kv", "logits_all", "penalize_newline",
})


def openai_options(options: dict) -> dict:
    """A job's Ollama options as request fields: `num_predict` becomes `max_tokens`, runner settings are dropped.

    The rest (`temperature`, `top_p`, `stop`, `seed`, and extensions such as
    `top_k`, `min_p`, `repeat_penalty`) keep their names: llama.cpp and vLLM
    accept them under those names and ignore fields they do not know.
    """
    fields = {}
    for name, value in options.items():
        if name in RUNNER_OPTIONS:
            continue
        if name == "num_predict" and (not isinstance(value, int) or value <= 0):
            continue  # Ollama's -1/-2 mean "no limit"; OpenAI has no such value
        fields[RENAMED_OPTIONS.get(name, name)] = value
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return fields


class OpenAIBackend:
    """An OpenAI-compatible server at `url` (with or without the trailing `/v1`)."""

    kinds = KINDS

    def __init__(self, url: str, *, api_key: str = "", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        return headers

    def models(self) -> list[str]:
        """The ids in `/v1/models`."""
        try:
            response = requests.get(self.url + "/v1/models", headers=self.headers(), timeout=MODELS_TIMEOUT)
        except requests.RequestException as exc:
            raise BackendError(f"the OpenAI-compatible server at {self.url} is not reachable: "
                               f"{type(exc).__name__}") from None
        if response.status_code != 200:
            raise BackendError(f"the server at {self.url} answered {response.status_code} to GET /v1/models")
        try:
            return list(dict.fromkeys(entry["id"] for entry in response.json()["data"]))
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"the server at {self.url} sent an unreadable /v1/models answer") from None

    def chat(self, model: str, messages: list[dict], options: dict, request: dict | None = None) -> OpenAIChat:
        return OpenAIChat(self, model, messages, options, request)

    def embed(self, model: str, inputs: list[str], options: dict, request: dict | None = None) -> OpenAIEmbed:
        return OpenAIEmbed(self, model, inputs, request)

    def describe(self) -> None:
        """OpenAI's API says nothing of sizes, families or loaded models: no report."""
        return None


class OpenAIChat(HttpChatStream):
    """One streamed `/v1/chat/completions`; `close()` from any thread shuts the socket, which stops the engine."""

    peer = "the OpenAI-compatible server"

    path = "/v1/chat/completions"

    def __init__(self, backend: OpenAIBackend, model: str, messages: list[dict], options: dict,
                 request: dict | None = None) -> None:
        body = {**openai_options(options), **request_fields(request), "model": model,
                "messages": openai_messages(messages), "stream": True, "stream_options": {"include_usage": True}}
        super().__init__(backend, model, body)

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        path = urlsplit(self._backend.url).path + self.path
        conn.request("POST", path, self._body, self._backend.headers())
        self._started = time.perf_counter_ns()

    def _response(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        response = conn.getresponse()
        if response.status != 200:
            raise BackendError(f"the server answered {response.status}: {_error_message(response.read(MAX_LINE))}")
        return response

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[str | dict]:
        finish_reason, usage, first_at = None, None, None
        calls = ToolCallAssembler()
        for payload in _sse_data(response):
            if payload == "[DONE]":
                break
            event = _parse_event(payload)
            if event.get("error"):
                raise BackendError(f"the server: {_describe(event['error'])}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                item = _item(delta, calls)
                if item:
                    first_at = first_at or time.perf_counter_ns()
                    self.tokens += 1
                    yield item
                finish_reason = choice.get("finish_reason") or finish_reason
                if finish_reason and (whole := calls.finished()):
                    yield {"tool_calls": whole}
        else:
            # Some servers end with finish_reason and no [DONE]; without either the answer was cut.
            if finish_reason is None:
                if self._closed:
                    return
                raise BackendError(self._lost("the stream ended without finish_reason or [DONE]"))
        self.stats = self._stats(finish_reason, usage, first_at)

    def _stats(self, finish_reason: str | None, usage: object, first_at: int | None) -> dict:
        """Ollama's names for what OpenAI's stream reports, plus durations measured here."""
        now = time.perf_counter_ns()
        usage = usage if isinstance(usage, dict) else {}
        stats = {"done_reason": finish_reason or "stop",
                 "prompt_eval_count": usage.get("prompt_tokens"),
                 "eval_count": usage.get("completion_tokens", self.tokens),
                 "total_duration": now - self._started,
                 "eval_duration": now - first_at if first_at else 0}
        return {k: v for k, v in stats.items() if v is not None}


def _item(delta: object, calls: ToolCallAssembler) -> str | dict | None:
    """A streamed delta as a wire item; tool call pieces go to `calls` until the choice finishes."""
    if not isinstance(delta, dict):
        return None
    calls.add(delta.get("tool_calls"))
    text = delta.get("content") if isinstance(delta.get("content"), str) else ""
    # llama.cpp and vLLM name a reasoning model's thinking `reasoning_content`; others `reasoning`.
    thinking = delta.get("reasoning_content") or delta.get("reasoning")
    if not isinstance(thinking, str) or not thinking:
        return text or None
    return Delta(text, thinking).to_wire()


class OpenAIEmbed(OpenAIChat):
    """One `/v1/embeddings`: a single JSON answer, yielded as one `{"embedding": [...]}` item per input."""

    path = "/v1/embeddings"

    def __init__(self, backend: OpenAIBackend, model: str, inputs: list[str], request: dict | None = None) -> None:
        body: dict = {"model": model, "input": inputs, "encoding_format": "float"}
        if (request or {}).get("dimensions"):
            body["dimensions"] = request["dimensions"]
        HttpChatStream.__init__(self, backend, model, body)

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[dict]:
        answer = _parse_event(response.read().decode("utf-8", "replace"))
        data = answer.get("data")
        if not isinstance(data, list):
            raise BackendError("the server sent an embedding answer without 'data'")
        for entry in sorted(data, key=lambda e: e.get("index", 0) if isinstance(e, dict) else 0):
            self.tokens += 1
            yield {"embedding": entry.get("embedding") if isinstance(entry, dict) else None}
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        self.stats = {"prompt_eval_count": usage.get("prompt_tokens", 0)}


def _sse_data(response: http.client.HTTPResponse) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events body, one per line as OpenAI's servers send them."""
    while line := response.readline(MAX_LINE):
        if len(line) >= MAX_LINE and not line.endswith(b"\n"):
            raise BackendError(f"the server sent a line longer than {MAX_LINE} bytes")
        if line.startswith(b"data:"):
            yield line[5:].strip().decode("utf-8", "replace")
        elif line.strip() and not line.startswith((b":", b"event:", b"id:", b"retry:")):
            shown = line.strip()[:80].decode("utf-8", "replace")
            raise BackendError(f"the server sent something that is not an event stream: {shown!r}")


def _parse_event(payload: str) -> dict:
    try:
        event = json.loads(payload)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise BackendError(f"the server sent an event that is not a JSON object: {payload[:80]!r}")
    return event


def _describe(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        return _describe(parsed.get("error") or parsed.get("detail") or parsed)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip() or "no details"
