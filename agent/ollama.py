"""The Ollama backend: `/api/tags` for the models, a streamed `/api/chat` per job."""
from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from agent.backend import BackendError
from agent.httpstream import HttpChatStream

DEFAULT_CONNECT_TIMEOUT = 5.0
# No byte flows while Ollama loads a model, and its own OLLAMA_LOAD_TIMEOUT is
# 5 minutes: a shorter read timeout would fail every cold start of a big model.
DEFAULT_READ_TIMEOUT = 600.0
TAGS_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, 10.0)
MAX_LINE = 1 << 20
# Fields of the final line that are not statistics.
NOT_STATS = frozenset({"model", "created_at", "message", "response", "done"})


class OllamaBackend:
    """Ollama's native API at `url`."""

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

    def chat(self, model: str, messages: list[dict], options: dict) -> OllamaChat:
        return OllamaChat(self, model, messages, options)


class OllamaChat(HttpChatStream):
    """One streamed `/api/chat`; `close()` from any thread shuts the socket, which stops Ollama."""

    peer = "Ollama"

    def __init__(self, backend: OllamaBackend, model: str, messages: list[dict], options: dict) -> None:
        body: dict = {"model": model, "messages": messages, "stream": True}
        if options:
            body["options"] = options
        super().__init__(backend, model, body)

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        path = urlsplit(self._backend.url).path + "/api/chat"
        conn.request("POST", path, self._body, {"Content-Type": "application/json"})

    def _response(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        response = conn.getresponse()
        if response.status != 200:
            raise BackendError(f"Ollama answered {response.status}: {_error_message(response.read(MAX_LINE))}")
        return response

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[str]:
        while line := response.readline(MAX_LINE):
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                raise BackendError(f"Ollama sent a line longer than {MAX_LINE} bytes")
            if not line.strip():
                continue
            message = _parse_line(line)
            if "error" in message:
                raise BackendError(f"Ollama: {message['error']}")
            content = message.get("message")
            text = content.get("content") if isinstance(content, dict) else None
            if isinstance(text, str) and text:
                self.tokens += 1
                yield text
            if message.get("done") is True:
                self.stats = {k: v for k, v in message.items() if k not in NOT_STATS}
                return
        if not self._closed:
            raise BackendError(self._lost("the stream ended without its final line"))


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
