"""The streaming engine behind every chat front door (native SSE, OpenAI, Ollama).

A front door validates the body, starts a request, and turns the events of
``follow`` into its own wire format::

    model, messages, options = validate_chat(payload)                    # BadRequest (400)
    request_id = start_request(get_db(), notifier, app.config, model, messages, options,
                               front_door="openai")                      # NotFound model_not_found (404)
    events = DisconnectGuard(app, request_id, follow(app, request_id),
                              client_socket=request.environ.get("gunicorn.socket"))
    return stream_response(events, encode, request_id=request_id)        # encode(Event) -> bytes

``follow(app, request_id, after_seq=-1, *, status_events=False)`` yields, in order:
``StatusEvent`` (only with ``status_events``, before the first chunk: ``queued``
with the 1-based queue position, then ``assigned``), one ``ChunkEvent(seq, text)``
per stored chunk after ``after_seq``, ``KeepaliveEvent`` after
``KEEPALIVE_SECONDS`` without another event, and exactly one final
``DoneEvent(stats)`` or ``ErrorEvent(code, message)``.  Error codes: the
request's own (``queue_timeout``, ``agent_lost``, ``attempts_exhausted``,
``agent_error``), ``cancelled``, ``server_shutting_down`` (resume later) and
``internal_error``.  It needs no request context: it borrows a pooled
connection for each read and holds no transaction while it waits.  With
``NOTIFIER=condition`` it waits on the notifier key ``req:<id>`` and reads
(one indexed query) only when woken; with ``NOTIFIER=poll`` it reads every
``POLL_INTERVAL`` like the legacy server.

``DisconnectGuard`` counts the open streams of each request in this
process; when the last one goes away before its final event, the request is
cancelled (``CANCEL_GRACE`` 0) or marked ``client_left_at`` for the sweeper.
Opening a stream on a request clears that mark (a resume).

``final_event(status, error_code, error_message, stats)`` maps a stored
request to the event that ends its stream (None while it runs), for views
that report a request without following it.
"""
from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlite_utils
from flask import Flask, Response

from . import agents, body, jobs, metrics
from . import db as database
from .errors import BadRequest, NotFound
from .notifier import Notifier

if TYPE_CHECKING:
    from gevent import Greenlet

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# KEEPALIVE_SECONDS <= 0 would spin: it means one keepalive an hour instead.
NO_KEEPALIVE = 3600.0


@dataclass(frozen=True)
class ChunkEvent:
    seq: int
    text: str
    stored_at: float = field(default=0.0, compare=False)   # when the agent's POST stored it (for metrics)


@dataclass(frozen=True)
class StatusEvent:
    state: str                  # queued | assigned
    position: int | None = None


@dataclass(frozen=True)
class DoneEvent:
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str


@dataclass(frozen=True)
class KeepaliveEvent:
    pass


Event = ChunkEvent | StatusEvent | DoneEvent | ErrorEvent | KeepaliveEvent
FINAL_EVENTS = (DoneEvent, ErrorEvent)


def validate_chat(payload: dict[str, Any]) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """``(model, messages, options)`` from a chat body, or BadRequest; unknown keys are ignored."""
    if payload.get("model") is None:
        raise BadRequest("'model' is required", code="invalid_field")
    model = body.text(payload["model"], "model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", code="invalid_field")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object with 'role' and 'content'", code="invalid_field")
        if message.get("role") not in ROLES:
            raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", code="invalid_field")
        content = body.text(message.get("content"), f"messages[{i}].content", allow_empty=True)
        checked.append({"role": message["role"], "content": content})
    options = payload.get("options")
    return model, checked, {} if options is None else body.mapping(options, "options")


def start_request(db: sqlite_utils.Database, notifier: Notifier, config: dict[str, Any], model: str,
                  messages: list[dict[str, str]], options: dict[str, Any], front_door: str = "native") -> str:
    """Queue a chat and wake a long poll for it; NotFound ``model_not_found`` if no online agent serves it."""
    now = time.time()
    if not agents.serves(agents.online(db, now, config["AGENT_ONLINE_SECONDS"]), model):
        raise NotFound(f"no online agent serves the model '{model}'", code="model_not_found")
    request_id = jobs.create_request(db, model, messages, options, now, front_door)
    jobs.announce(notifier, model)
    return request_id


# --- following a request ---------------------------------------------------

@dataclass(frozen=True)
class _Snapshot:
    status: str
    error_code: str | None
    error_message: str | None
    stats: dict[str, Any] | None
    chunks: list[tuple[int, str, float]]
    position: int | None


# One statement over both primary keys: a request row and its new chunks,
# consistent with each other (a final status never comes without its chunks).
_SNAPSHOT_SQL = """
SELECT r.status, r.error_code, r.error_message, r.stats, r.model, r.created_at, c.seq, c.text, c.created_at
FROM requests AS r LEFT JOIN chunks AS c ON c.request_id = r.id AND c.seq > ?
WHERE r.id = ? ORDER BY c.seq"""


def _read(db: sqlite_utils.Database, request_id: str, after_seq: int, with_position: bool) -> _Snapshot | None:
    rows = db.execute(_SNAPSHOT_SQL, (after_seq, request_id)).fetchall()
    if not rows:
        return None
    status, code, message, stats, model, created_at = rows[0][:6]
    chunks = [(seq, text, stored_at) for *_, seq, text, stored_at in rows if seq is not None]
    position = None
    if with_position and status == jobs.Status.QUEUED:
        position = jobs.queue_position(db, request_id, model, created_at)
    return _Snapshot(status, code, message, json.loads(stats) if stats else None, chunks, position)


class _Cursor:
    """What one stream has sent so far, and the events a new snapshot adds."""

    def __init__(self, after_seq: int, status_events: bool) -> None:
        self.last_seq = after_seq
        self.status_events = status_events
        self.shown: StatusEvent | None = None
        self.finished = False

    @property
    def reports_status(self) -> bool:
        """Status events are due: asked for, and no chunk sent yet."""
        return self.status_events and self.last_seq < 0

    def advance(self, snap: _Snapshot) -> list[Event]:
        events: list[Event] = self._status(snap) if self.reports_status else []
        for seq, text, stored_at in snap.chunks:
            events.append(ChunkEvent(seq, text, stored_at))
            self.last_seq = seq
        final = final_event(snap.status, snap.error_code, snap.error_message, snap.stats)
        if final is not None:
            events.append(final)
            self.finished = True
        return events

    def _status(self, snap: _Snapshot) -> list[Event]:
        if snap.status == jobs.Status.QUEUED:
            shown = StatusEvent("queued", snap.position)
        elif snap.chunks or snap.status in jobs.ACTIVE:
            shown = StatusEvent("assigned")
        else:
            return []
        if shown == self.shown:
            return []
        self.shown = shown
        return [shown]


def final_event(status: str, error_code: str | None, error_message: str | None,
                stats: dict[str, Any] | None) -> DoneEvent | ErrorEvent | None:
    """The event that ends a stream of a request in this state; None while it is not final."""
    if status == jobs.Status.DONE:
        return DoneEvent(stats)
    if status == jobs.Status.FAILED:
        return ErrorEvent(error_code or "failed", error_message or "the request failed")
    if status == jobs.Status.CANCELLED:
        return ErrorEvent("cancelled", "the request was cancelled")
    return None


def follow(app: Flask, request_id: str, after_seq: int = -1, *, status_events: bool = False) -> Iterator[Event]:
    """The request's events after chunk ``after_seq``, live, ending with one Done or Error event."""
    notifier: Notifier = app.extensions["notifier"]
    key = "req:" + request_id
    cursor = _Cursor(after_seq, status_events)
    quiet_since = time.monotonic()
    while True:
        # The version is read before the query: a notify landing in between
        # makes the wait return at once, so no wake-up is lost.
        version = notifier.version(key)
        closing = notifier.closed
        events = _next_events(app, request_id, cursor)
        yield from events
        if cursor.finished:
            return
        if closing:
            yield ErrorEvent("server_shutting_down", "the server is restarting: resume this stream with "
                             f"GET /api/v1/chat/stream/{request_id} and Last-Event-ID")
            return
        if events:
            quiet_since = time.monotonic()
        quiet_since = yield from _idle(app, key, version, quiet_since)


def _next_events(app: Flask, request_id: str, cursor: _Cursor) -> list[Event]:
    """One read: what happened since the cursor; an error event (and the end) if the read fails."""
    try:
        with _reader(app) as db:
            snap = _read(db, request_id, cursor.last_seq, cursor.reports_status)
    except sqlite3.Error:
        log.error("stream of request %s: database read failed; ending it with an error", request_id, exc_info=True)
        snap, error = None, ErrorEvent("internal_error", "the server could not read this request: resume it later")
    else:
        error = ErrorEvent("not_found", f"no request {request_id}")
    if snap is None:
        cursor.finished = True
        return [error]
    return cursor.advance(snap)


def _idle(app: Flask, key: str, version: int, quiet_since: float) -> Generator[KeepaliveEvent, None, float]:
    """Wait for ``key`` to change (or a poll interval), with keepalives; returns the new ``quiet_since``.

    With the notifier, silence costs no query at all; ``NOTIFIER=poll``
    returns after each ``POLL_INTERVAL`` so the caller queries, as the legacy server did.
    """
    notifier: Notifier = app.extensions["notifier"]
    poll_interval = app.config["POLL_INTERVAL"] if app.config["NOTIFIER"] == "poll" else None
    keepalive = app.config["KEEPALIVE_SECONDS"] if app.config["KEEPALIVE_SECONDS"] > 0 else NO_KEEPALIVE
    while not notifier.closed:
        remaining = quiet_since + keepalive - time.monotonic()
        if remaining <= 0:
            yield KeepaliveEvent()
            quiet_since = time.monotonic()
        elif poll_interval is not None:
            time.sleep(min(poll_interval, remaining))
            if remaining > poll_interval:
                break
        elif notifier.wait_for(key, version, remaining) != version:
            break
    return quiet_since


def _reader(app: Flask):
    """A pooled connection for one short read or write outside any request context."""
    return database.borrow(app)


# --- clients going away ----------------------------------------------------

class OpenStreams:
    """Open streams per request in this process; empty entries are dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, request_id: str) -> int:
        with self._lock:
            self._counts[request_id] = count = self._counts.get(request_id, 0) + 1
            return count

    def discard(self, request_id: str) -> int:
        """Forget one stream; returns how many remain open."""
        with self._lock:
            count = self._counts.pop(request_id, 1) - 1
            if count > 0:
                self._counts[request_id] = count
            return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)


def open_streams(app: Flask) -> OpenStreams:
    streams = app.extensions.get("open_streams")
    if streams is None:
        streams = app.extensions.setdefault("open_streams", OpenStreams())
    return streams


class DisconnectGuard:
    """Pass ``events`` through; if the stream closes before its final event, the client left.

    Registers the stream at once (a client that vanishes before the first
    byte still counts) and is closed through ``stream_response``.  Under
    gevent, ``client_socket`` (``environ["gunicorn.socket"]``) is watched so
    a hang-up is noticed while the stream is idle, not only at the next write.
    """

    def __init__(self, app: Flask, request_id: str, events: Iterator[Event], *,
                 client_socket: socket.socket | None = None) -> None:
        self.app, self.request_id, self._events = app, request_id, events
        self._final = self._closed = self._left = False
        if open_streams(app).add(request_id) == 1:
            self._write(lambda db: jobs.set_client_left(db, request_id, None), "clear client_left_at")
        self._watcher = _watch_hangup(client_socket, self._client_left) if client_socket is not None else None

    def __iter__(self) -> DisconnectGuard:
        return self

    def __next__(self) -> Event:
        event = next(self._events)
        self._final = isinstance(event, FINAL_EVENTS)
        if isinstance(event, ChunkEvent) and event.stored_at:
            metrics.observe_delivery(self.app, event.stored_at)
        return event

    def close(self) -> None:
        """End the stream; idempotent.  Counts as the client leaving unless the final event went out."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.kill(block=True, timeout=1)
        if not self._final:
            self._client_left()
        elif not self._left:
            open_streams(self.app).discard(self.request_id)
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def _client_left(self) -> None:
        if self._left or self._final:
            return
        self._left = True
        if open_streams(self.app).discard(self.request_id) > 0:
            return
        now, request_id = time.time(), self.request_id
        if self.app.config["CANCEL_GRACE"] <= 0:
            if self._write(lambda db: jobs.request_cancel(db, request_id, now), "cancel"):
                self.app.extensions["notifier"].notify("req:" + request_id)
            log.info("request %s: client left, cancelled", request_id)
        else:
            self._write(lambda db: jobs.set_client_left(db, request_id, now), "record client_left_at")
            log.info("request %s: client left, cancel in %g s unless resumed", request_id,
                     self.app.config["CANCEL_GRACE"])

    def _write(self, action: Callable[[sqlite_utils.Database], Any], what: str) -> Any:
        try:
            with _reader(self.app) as db:
                return action(db)
        except sqlite3.Error:
            log.error("request %s: could not %s; the sweeper will not see this stream's end", self.request_id,
                      what, exc_info=True)
            return None


def _watch_hangup(client_socket: socket.socket, on_hangup: Callable[[], None]) -> Greenlet | None:
    """A greenlet that calls ``on_hangup`` when the client closes its socket (gevent only), or None."""
    try:
        import gevent
        from gevent import monkey
    except ImportError:
        return None
    if not monkey.is_module_patched("socket"):
        return None

    def watch() -> None:
        # The request body has been read, and an HTTP/1.1 client sends
        # nothing more until the response ends: readable now means EOF,
        # or a pipelined request (peeked, left in place, watching stops).
        try:
            hung_up = not client_socket.recv(1, socket.MSG_PEEK)
        except OSError:
            hung_up = True
        if hung_up:
            on_hangup()

    return gevent.spawn(watch)


def stream_response(events: Iterator[Event], encode: Callable[[Event], bytes], *, request_id: str,
                    mimetype: str = "text/event-stream") -> Response:
    """A streaming response: one write per event, headers sent at once, ``events.close()`` at the end."""
    def wire() -> Iterator[bytes]:
        # An empty first item makes gunicorn send the headers now, not with
        # the first token (which may be a queue wait away); no body bytes.
        yield b""
        for event in events:
            yield encode(event)

    response = Response(wire(), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["X-Request-Id"] = request_id
    close = getattr(events, "close", None)
    if close is not None:
        response.call_on_close(close)
    return response
