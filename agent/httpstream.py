"""A streamed chat over one HTTP connection that any thread can abort: what the Ollama and OpenAI backends share.

`HttpChatStream` connects, lets its subclass's `_send_request` write the
request and `_response` check the answer's headers, and yields what the
subclass's `_tokens` reads from the response; `close()` shuts the socket
down, which stops the engine generating. `send()` does the first part alone,
so a job can start the engine before anything else runs.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

from agent.backend import BackendError


class HttpEngine(Protocol):
    """Where a chat connects to, and how patiently."""

    url: str
    connect_timeout: float
    read_timeout: float


class HttpChatStream:
    """One streamed POST of `body` to `backend`; a `ChatStream` once a subclass sends it and reads its tokens."""

    peer = "the engine"  # who answers, as the error messages name it

    def __init__(self, backend: HttpEngine, model: str, body: dict) -> None:
        self._backend = backend
        self.model = model
        self._body = json.dumps(body, ensure_ascii=False).encode()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._sent = False
        self._closed = False
        self.stats: dict | None = None
        self.tokens = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Abort the request; a thread blocked reading it (or waiting for its headers) wakes up at once."""
        with self._lock:
            self._closed = True
            sock = self._sock
        if sock is not None:
            try:
                # shutdown, not close: close() would not wake a recv() blocked in another thread.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def send(self) -> None:
        """Connect and write the request now; iterating reads the answer (and sends first if this was not called).

        Raises `BackendError`; does nothing after `close()` or a first call.
        """
        if self._sent:
            return
        self._sent = True
        conn = self._connect()
        if conn is None:
            return
        try:
            self._send_request(conn)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if not self._closed:
                raise BackendError(self._lost(exc)) from None
            return
        self._conn = conn

    def __iter__(self) -> Iterator[str]:
        self.send()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            yield from self._tokens(self._response(conn))
        except (OSError, http.client.HTTPException) as exc:
            if not self._closed:
                raise BackendError(self._lost(exc)) from None
        finally:
            conn.close()

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        """Write the request on `conn`."""
        raise NotImplementedError

    def _response(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """The response on `conn`, once its headers say the request succeeded."""
        raise NotImplementedError

    def _tokens(self, response: http.client.HTTPResponse) -> Iterator[str]:
        """The answer's tokens, counted in `self.tokens`; sets `self.stats` when it ends normally."""
        raise NotImplementedError

    def _connect(self) -> http.client.HTTPConnection | None:
        """A connection with the read timeout set, or None when `close()` came first."""
        parts = urlsplit(self._backend.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self._backend.connect_timeout)
        if self._closed:
            return None
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            if self._closed:
                return None
            raise BackendError(f"{self.peer} at {self._backend.url} is not reachable: {exc}") from None
        with self._lock:
            if self._closed:  # close() ran while there was no socket to shut
                conn.close()
                return None
            # Our own reference: http.client drops conn.sock when the response says Connection: close.
            self._sock = conn.sock
        conn.sock.settimeout(self._backend.read_timeout)
        return conn

    def _lost(self, why: object) -> str:
        return f"the connection to {self.peer} was lost after {self.tokens} tokens ({why or 'connection closed'})"
