"""The benchmark's user: one streamed chat, each token timestamped as it arrives.

`stream_chat` reads the server's SSE (`id: N` / `data: {"delta": ...}` /
`data: [DONE]`); `stream_ollama` reads Ollama's own NDJSON, for the `direct`
configuration. Both use `http.client` on a new connection and take
`time.time()`, the clock of the simulator's emission log, when a token's line
has been read: a plain blocking reader adds no buffering of its own.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 120.0
SSE_PATH = "/api/v1/chat/stream"
OLLAMA_PATH = "/api/chat"


@dataclass
class Token:
    """One piece of text as the client saw it: when, with which SSE id (None for NDJSON)."""

    at: float
    text: str
    id: int | None = None


@dataclass
class Trace:
    """What one chat looked like from the client's side; times are `time.time()`."""

    started: float
    tokens: list[Token] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    finished: float = 0.0


def stream_chat(base_url: str, payload: dict, timeout: float = DEFAULT_TIMEOUT) -> Trace:
    """POST `payload` to the server's native SSE endpoint and read the stream to its end."""
    return _traced(base_url, SSE_PATH, payload, {"Accept": "text/event-stream"}, _read_sse, timeout)


def stream_ollama(base_url: str, payload: dict, timeout: float = DEFAULT_TIMEOUT) -> Trace:
    """POST `payload` (with `stream: true`) to Ollama's `/api/chat` and read the NDJSON to its end."""
    return _traced(base_url, OLLAMA_PATH, {**payload, "stream": True}, {}, _read_ndjson, timeout)


def _traced(base_url: str, path: str, payload: dict, headers: dict[str, str],
            read: Callable[[http.client.HTTPResponse, Trace], None], timeout: float) -> Trace:
    """One streamed POST, read by `read` into a Trace; any failure ends up in `trace.error`."""
    trace = Trace(time.time())
    conn = _connection(base_url, timeout)
    try:
        conn.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        if response.status != 200:
            trace.error = f"HTTP {response.status}: {response.read(500).decode(errors='replace')}"
        else:
            read(response, trace)
    except (OSError, http.client.HTTPException) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        trace.finished = time.time()
    return trace


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _read_sse(response: http.client.HTTPResponse, trace: Trace) -> None:
    event_id: int | None = None
    event_type, data = "message", []
    while line := response.readline():
        at = time.time()
        line = line.rstrip(b"\r\n").decode("utf-8")
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = int(value) if value.lstrip("-").isdigit() else None
            elif name == "event":
                event_type = value
            elif name == "data":
                data.append(value)
            continue  # comments (": keepalive") and unknown fields are ignored, as EventSource does
        if data and _dispatch(trace, at, event_type, event_id, "\n".join(data)):
            return
        event_id, event_type, data = None, "message", []
    trace.error = trace.error or "the stream ended without [DONE]"


def _dispatch(trace: Trace, at: float, event_type: str, event_id: int | None, data: str) -> bool:
    """Record one SSE event; True when it ends the stream."""
    if event_type == "error":
        trace.error = f"error event: {data}"
        return True
    if event_type != "message":
        return False  # status events
    if data == "[DONE]":
        trace.done = True
        return True
    delta = json.loads(data).get("delta")
    if isinstance(delta, str):
        trace.tokens.append(Token(at, delta, event_id))
    return False


def _read_ndjson(response: http.client.HTTPResponse, trace: Trace) -> None:
    while line := response.readline():
        at = time.time()
        if not line.strip():
            continue
        message = json.loads(line)
        if "error" in message:
            trace.error = f"Ollama error: {message['error']}"
            return
        text = (message.get("message") or {}).get("content")
        if text:
            trace.tokens.append(Token(at, text))
        if message.get("done"):
            trace.done = True
            return
    trace.error = "the stream ended without its final line"
