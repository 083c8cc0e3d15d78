"""A server-side WebSocket over the request's own socket, for gunicorn's gevent worker.

wsproto (python-hyper's sans-I/O RFC 6455 engine) frames, masks, checks UTF-8
and runs the close handshake; this module owns only the I/O, because that is
where simple-websocket (flask-sock's engine, the issue's first suggestion, built
on the same wsproto) falls short for agents, checked here under gevent:

- it writes with ``socket.send``, which under gevent writes *part* of a large
  frame when the socket's buffer is full (a job of 1 MiB over a slow link), and
  its reader writes pongs with no lock against the handler's writes: frames
  could interleave.  Here every write is ``sendall`` under one lock.
- it buffers received messages without bound; here at most ``max_queued``
  wait, and one more closes the socket (a flood), while TCP holds back the rest.
- an oversized message closes with 1009 and no hook; here a message over
  ``max_message_bytes`` is refused as soon as its first bytes pass the limit
  (never buffered whole), closed with 1008 (policy violation) and logged.

The reader runs on its own greenlet; ``receive()`` hands over one complete
text or binary message at a time.
"""
from __future__ import annotations

import base64
import binascii
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError, generate_accept_token

from protocol.frames import CLOSE_POLICY_VIOLATION

log = logging.getLogger(__name__)

RECV_BYTES = 65536
# After our close frame, the peer gets this long to answer with its own before the socket is dropped.
CLOSE_TIMEOUT = 2.0


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade this server accepts; ``status`` says which answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_upgrade(headers) -> str:
    """The client's ``Sec-WebSocket-Key`` if ``headers`` ask for a WebSocket (RFC 6455 4.2.1); HandshakeError."""
    if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in [
            v.strip().lower() for v in headers.get("Connection", "").split(",")]:
        raise HandshakeError("this endpoint needs a WebSocket upgrade (Upgrade: websocket)", 426)
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise HandshakeError("only WebSocket version 13 is spoken (Sec-WebSocket-Version: 13)", 426)
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError("Sec-WebSocket-Key must be 16 bytes in base64") from None
    return key


def raw_socket(environ: dict) -> socket.socket | None:
    """The client connection under this request: gunicorn's, or Werkzeug's development server's."""
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


@dataclass
class Closed:
    """How a socket ended: the close code (1006 when the connection just broke) and why, in a few words."""

    code: int
    reason: str


class WebSocket:
    """One accepted connection: ``receive()`` messages, ``send()`` text, ``ping()``, ``close()``."""

    def __init__(self, sock: socket.socket, key: str, *, max_message_bytes: int, max_queued: int,
                 name: str = "socket") -> None:
        self.sock = sock
        self.name = name
        self.max_message_bytes = max_message_bytes
        self._conn = Connection(ConnectionType.SERVER)
        self._lock = threading.Lock()
        # A deque and an Event rather than queue.Queue: a Condition per get() cost ~2 greenlet switches a frame.
        self._messages: deque[str | bytes] = deque()
        self._ready = threading.Event()
        self._ended = False
        self.max_queued = max_queued
        self._partial: list = []
        self._partial_bytes = 0
        self.closed: Closed | None = None
        self.last_pong = time.monotonic()
        self.received = 0
        # No extension is offered: permessage-deflate would cost CPU on every tiny token frame.
        self._write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + generate_accept_token(key.encode()) + b"\r\n\r\n")
        self._reader = threading.Thread(target=self._read, name=f"ws-read-{name}", daemon=True)
        self._reader.start()

    # --- the handler's side ----------------------------------------------------------------

    def receive(self) -> str | bytes | None:
        """The next complete message, or None once the connection has ended (see ``closed``)."""
        while True:
            if self.closed is not None and self.closed.code == CLOSE_POLICY_VIOLATION:
                return None                     # what a flooding or oversending peer queued is dropped
            if self._messages:
                return self._messages.popleft()
            if self._ended:
                return None
            self._ready.clear()
            if not (self._messages or self._ended):
                self._ready.wait()

    @property
    def backlog(self) -> int:
        """Messages received and not yet handed to the handler."""
        return len(self._messages)

    def send(self, text: str) -> bool:
        """Send one text message; False if the connection is gone (nothing to retry: the peer reconnects)."""
        return self._send_event(TextMessage(data=text))

    def ping(self) -> bool:
        return self._send_event(Ping())

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake (the reader ends once the peer answers; see ``end``)."""
        self._finish(code, reason)
        self._send_event(CloseConnection(code=code, reason=reason))

    def end(self, code: int, reason: str) -> None:
        """Close, give the peer ``CLOSE_TIMEOUT`` to answer, then drop the connection; returns once the reader ended."""
        self.close(code, reason)
        self._reader.join(CLOSE_TIMEOUT)
        self.abort(code, reason)
        self._reader.join(CLOSE_TIMEOUT)

    def abort(self, code: int, reason: str) -> None:
        """Drop the connection at once (a dead peer: no close handshake to wait for)."""
        self._finish(code, reason)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- internals -------------------------------------------------------------------------

    def _finish(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = Closed(code, reason)

    def _send_event(self, event) -> bool:
        with self._lock:
            if self._conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                return False
            try:
                data = self._conn.send(event)
            except LocalProtocolError:
                return False
            return self._write(data)

    def _write(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError as exc:
            self._finish(1006, f"write failed: {exc}")
            return False

    def _read(self) -> None:
        try:
            while self._conn.state is not ConnectionState.CLOSED:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except OSError as exc:
                    self._finish(1006, f"connection lost: {exc}")
                    break
                self._conn.receive_data(data or None)
                if not self._handle_events() or not data:
                    break
                if len(data) == RECV_BYTES:
                    # More is waiting: a peer sending without pause keeps recv() from ever blocking,
                    # so let the worker's other greenlets run.
                    time.sleep(0)
        finally:
            self._finish(1006, "connection lost")
            self._ended = True
            self._ready.set()

    def _handle_events(self) -> bool:
        """Act on what the last bytes brought; False once the connection must end."""
        for event in self._conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._collect(event):
                    return False
            elif isinstance(event, Ping):
                self._send_event(event.response())
            elif isinstance(event, Pong):
                self.last_pong = time.monotonic()
            elif isinstance(event, CloseConnection):
                self._finish(event.code, event.reason or "closed by the agent")
                if self._conn.state is ConnectionState.REMOTE_CLOSING:
                    self._send_event(event.response())
                return False
        return True

    def _collect(self, event: TextMessage | BytesMessage) -> bool:
        self._partial_bytes += len(event.data.encode() if isinstance(event.data, str) else event.data)
        if self._partial_bytes > self.max_message_bytes:
            log.warning("%s: a frame over %d bytes: closed (policy violation)", self.name, self.max_message_bytes)
            self.close(CLOSE_POLICY_VIOLATION, f"frame over {self.max_message_bytes} bytes")
            return False
        self._partial.append(event.data)
        if not event.message_finished:
            return True
        message = ("" if isinstance(event, TextMessage) else b"").join(self._partial)
        self._partial, self._partial_bytes = [], 0
        self.received += 1
        if len(self._messages) >= self.max_queued:
            log.warning("%s: over %d frames waiting to be handled (a flood): closed (policy violation)",
                        self.name, self.max_queued)
            self.close(CLOSE_POLICY_VIOLATION, f"over {self.max_queued} frames waiting")
            return False
        self._messages.append(message)
        self._ready.set()
        return True
