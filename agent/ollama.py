"""The Ollama backend: `/api/tags` for the models, a streamed `/api/chat` per job."""
from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from agent.backend import BackendError

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


class OllamaChat:
    """One streamed `/api/chat`; `close()` from any thread shuts the socket, which stops Ollama."""

    def __init__(self, backend: OllamaBackend, model: str, messages: list[dict], options: dict) -> None:
        self._backend = backend
        self.model = model
        body: dict = {"model": model, "messages": messages, "stream": True}
        if options:
            body["options"] = options
        self._body = json.dumps(body, ensure_ascii=False).encode()
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False
        self.stats: dict | None = None
        self.tokens = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Abort the request; a thread blocked reading it wakes up at once."""
        with self._lock:
            self._closed = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                # shutdown, not close: close() would not wake a recv() blocked in another thread.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[str]:
        conn = self._connect()
        if conn is None:
            return
        try:
            yield from self._tokens(self._request(conn))
        except (OSError, http.client.HTTPException) as exc:
            if not self._closed:
                raise BackendError(self._lost(exc)) from None
        finally:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection | None:
        parts = urlsplit(self._backend.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self._backend.connect_timeout)
        with self._lock:
            if self._closed:
                return None
            self._conn = conn
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            if self._closed:
                return None
            raise BackendError(f"Ollama at {self._backend.url} is not reachable: {exc}") from None
        with self._lock:  # close() may have run while connect() had no socket to shut
            if self._closed:
                conn.close()
                return None
        conn.sock.settimeout(self._backend.read_timeout)
        return conn

    def _request(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        path = urlsplit(self._backend.url).path + "/api/chat"
        conn.request("POST", path, self._body, {"Content-Type": "application/json"})
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

    def _lost(self, why: object) -> str:
        return f"the connection to Ollama was lost after {self.tokens} tokens ({why or 'connection closed'})"


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
