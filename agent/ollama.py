"""The Ollama backend: `/api/tags` for the models, a streamed `/api/chat` per chat, `/api/embed` per embedding.

Everything a job carries besides messages and options (tools, format, think,
keep_alive) goes into the request as Ollama's own clients send it; what comes
back besides text (thinking, tool calls) is streamed through as wire items
(`protocol.deltas`).  `describe()` gathers the model report the server shows
as `/api/tags`, `/api/show` and `/api/ps`.
"""
from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from agent.backend import BackendError
from agent.httpstream import HttpChatStream
from protocol.deltas import Delta
from protocol.models import KINDS, MAX_REPORTED_MODELS, RUNNING_FIELDS, SHOW_FIELDS, TAG_FIELDS

DEFAULT_CONNECT_TIMEOUT = 5.0
# No byte flows while Ollama loads a model, and its own OLLAMA_LOAD_TIMEOUT is
# 5 minutes: a shorter read timeout would fail every cold start of a big model.
DEFAULT_READ_TIMEOUT = 600.0
TAGS_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, 10.0)
MAX_LINE = 1 << 20
# Fields of the final line that are not statistics.
NOT_STATS = frozenset({"model", "created_at", "message", "response", "done", "embeddings"})
# The request fields an embedding takes besides model and input.
EMBED_FIELDS = ("truncate", "dimensions", "keep_alive")


class OllamaBackend:
    """Ollama's native API at `url`."""

    kinds = KINDS

    def __init__(self, url: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def models(self) -> list[str]:
        """Every model in `/api/tags`; `name:latest` is also offered as plain `name`, as Ollama accepts both."""
        try:
            response = requests.get(self.url + "/api/tags", timeout=TAGS_TIMEOUT)
        except requests.RequestException as exc:
            raise BackendError(f"Ollama at {self.url} is not reachable: {_reason(exc)}") from None
        if response.status_code != 200:
            raise BackendError(f"Ollama at {self.url} answered {response.status_code} to GET /api/tags")
        try:
            entries = response.json()["models"]
            names = [entry["name"] for entry in entries]
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"Ollama at {self.url} sent an unreadable /api/tags answer") from None
        models: dict[str, None] = {}
        for name in names:
            models[name] = None
            if name.endswith(":latest"):
                models[name.removesuffix(":latest")] = None
        return list(models)

    def chat(self, model: str, messages: list[dict], options: dict, request: dict | None = None) -> OllamaChat:
        return OllamaChat(self, model, messages, options, request)

    def embed(self, model: str, inputs: list[str], options: dict, request: dict | None = None) -> OllamaEmbed:
        return OllamaEmbed(self, model, inputs, options, request)

    def describe(self) -> dict:
        """The model report: `/api/tags`, `/api/show` of each model, `/api/ps` and `/api/version`."""
        tags = self._get_json("GET", "/api/tags").get("models") or []
        models = []
        for entry in tags[:MAX_REPORTED_MODELS]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            kept = {k: entry[k] for k in TAG_FIELDS if entry.get(k) is not None}
            try:
                shown = self._get_json("POST", "/api/show", {"model": entry["name"]})
                kept["show"] = {k: shown[k] for k in SHOW_FIELDS if shown.get(k) is not None}
            except BackendError:
                pass  # an older Ollama, or a model removed meanwhile: report what /api/tags said
            models.append(kept)
        running = self._get_json("GET", "/api/ps").get("models") or []
        version = self._get_json("GET", "/api/version").get("version")
        return {"models": models, "version": version if isinstance(version, str) else None,
                "running": [{k: e[k] for k in RUNNING_FIELDS if e.get(k) is not None}
                            for e in running if isinstance(e, dict) and isinstance(e.get("name"), str)]}

    def _get_json(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = requests.request(method, self.url + path, json=body, timeout=TAGS_TIMEOUT)
        except requests.RequestException as exc:
            raise BackendError(f"Ollama at {self.url} is not reachable: {_reason(exc)}") from None
        try:
            data = response.json() if response.status_code == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BackendError(f"Ollama at {self.url} answered {response.status_code} to {method} {path}")
        return data


class OllamaStream(HttpChatStream):
    """A POST to one of Ollama's generating endpoints; `close()` from any thread shuts the socket."""

    peer = "Ollama"
    path = ""

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        conn.request("POST", urlsplit(self._backend.url).path + self.path, self._body,
                     {"Content-Type": "application/json"})

    def _response(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        response = conn.getresponse()
        if response.status != 200:
            message = _error_message(response.read(MAX_LINE))
            # Ollama refusing the request itself (a model without tools, thinking or vision, an unknown
            # model) is the user's to read in Ollama's own words; anything else says who answered.
            raise BackendError(message if 400 <= response.status < 500 else
                               f"Ollama answered {response.status}: {message}")
        return response


class OllamaChat(OllamaStream):
    """One streamed `/api/chat`."""

    path = "/api/chat"

    def __init__(self, backend: OllamaBackend, model: str, messages: list[dict], options: dict,
                 request: dict | None = None) -> None:
        body: dict = {**(request or {}), "model": model, "messages": messages, "stream": True}
        if options:
            body["options"] = options
        super().__init__(backend, model, body)

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[str]:
        while line := response.readline(MAX_LINE):
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                raise BackendError(f"Ollama sent a line longer than {MAX_LINE} bytes")
            if not line.strip():
                continue
            message = _parse_line(line)
            if "error" in message:
                raise BackendError(f"Ollama: {message['error']}")
            item = _item(message.get("message"))
            if item:
                self.tokens += 1
                yield item
            if message.get("done") is True:
                self.stats = {k: v for k, v in message.items() if k not in NOT_STATS}
                return
        if not self._closed:
            raise BackendError(self._lost("the stream ended without its final line"))


class OllamaEmbed(OllamaStream):
    """One `/api/embed`: a single JSON answer, yielded as one `{"embedding": [...]}` item per input."""

    path = "/api/embed"

    def __init__(self, backend: OllamaBackend, model: str, inputs: list[str], options: dict,
                 request: dict | None = None) -> None:
        body: dict = {k: v for k, v in (request or {}).items() if k in EMBED_FIELDS}
        body.update(model=model, input=inputs)
        if options:
            body["options"] = options
        super().__init__(backend, model, body)

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[dict]:
        answer = _parse_line(response.read())
        vectors = answer.get("embeddings")
        if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
            raise BackendError("Ollama sent an embedding answer without 'embeddings'")
        for vector in vectors:
            self.tokens += 1
            yield {"embedding": vector}
        self.stats = {k: v for k, v in answer.items() if k not in NOT_STATS}


def _item(message: object) -> str | dict | None:
    """One streamed message as a wire item: its text alone when that is all it holds."""
    if not isinstance(message, dict):
        return None
    text, thinking, calls = message.get("content"), message.get("thinking"), message.get("tool_calls")
    text = text if isinstance(text, str) else ""
    if not thinking and not calls:
        return text or None
    return Delta(text, thinking if isinstance(thinking, str) else "",
                 tuple(calls) if isinstance(calls, list) else ()).to_wire()


def _parse_line(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        shown = line.strip()[:80].decode("utf-8", "replace")
        raise BackendError(f"Ollama sent a line that is not a JSON object: {shown!r}")
    return message


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or "no details"


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectionError):
        return "connection refused or host unreachable"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__
