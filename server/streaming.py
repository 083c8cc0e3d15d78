"""The streaming engine behind every chat front door: follow a job, write its events.

``follow(app, job_id, after_seq=-1, *, status_events=False)`` yields, in order:
``StatusEvent`` (only with ``status_events``, before the first chunk: ``queued``
with the 1-based queue position, then ``assigned``), one ``ChunkEvent(seq, text)``
per stored chunk after ``after_seq``, ``KeepaliveEvent`` after
``KEEPALIVE_SECONDS`` without another event, and exactly one final
``DoneEvent(stats)`` or ``ErrorEvent(code, message)``.  Error codes: the
job's own (``queue_timeout``, ``agent_lost``, ``attempts_exhausted``,
``agent_error``), ``cancelled``, and ``server_shutting_down`` or
``storage_unavailable`` (resume later).  It needs no request context: it borrows a pooled
connection for each read and holds no transaction while it waits.  With
``NOTIFIER=condition`` it waits on the job's notifier key and reads (one
indexed query) only when woken; with ``NOTIFIER=poll`` it reads every
``POLL_INTERVAL`` like the legacy server.

``stream_response(events, encode, request_id=...)`` writes any door's encoding
of those events; ``final_event`` maps a stored job to the event that ends its
stream, for views that report a job without following it.  Intake (checking a
chat and queueing it) is ``frontdoor``'s; a client going away is ``disconnect``'s.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response

from .notifier import job_key
from .storage import StorageError, get_storage, jobs

log = logging.getLogger(__name__)

# KEEPALIVE_SECONDS <= 0 would spin: it means one keepalive an hour instead.
NO_KEEPALIVE = 3600.0


@dataclass(frozen=True)
class ChunkEvent:
    seq: int
    text: str
    stored_at: float = field(default=0.0, compare=False)   # when the agent's POST stored it (for metrics)
    parts: dict[str, Any] | None = None                     # thinking, tool_calls, embedding (protocol.deltas)


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


class _Cursor:
    """What one stream has sent so far, and the events a new read adds."""

    def __init__(self, after_seq: int, status_events: bool) -> None:
        self.last_seq = after_seq
        self.status_events = status_events
        self.shown: StatusEvent | None = None
        self.finished = False

    @property
    def reports_status(self) -> bool:
        """Status events are due: asked for, and no chunk sent yet."""
        return self.status_events and self.last_seq < 0

    def advance(self, progress: jobs.Progress) -> list[Event]:
        events: list[Event] = self._status(progress) if self.reports_status else []
        for seq, text, stored_at, parts in progress.chunks:
            events.append(ChunkEvent(seq, text, stored_at, json.loads(parts) if parts else None))
            self.last_seq = seq
        final = final_event(progress.status, progress.error_code, progress.error_message, progress.stats)
        if final is not None:
            events.append(final)
            self.finished = True
        return events

    def _status(self, progress: jobs.Progress) -> list[Event]:
        if progress.status == jobs.Status.QUEUED:
            shown = StatusEvent("queued", progress.position)
        elif progress.chunks or progress.status in jobs.ACTIVE:
            shown = StatusEvent("assigned")
        else:
            return []
        if shown == self.shown:
            return []
        self.shown = shown
        return [shown]


def final_event(status: str, error_code: str | None, error_message: str | None,
                stats: dict[str, Any] | None) -> DoneEvent | ErrorEvent | None:
    """The event that ends a stream of a job in this state; None while it is not final."""
    if status == jobs.Status.DONE:
        return DoneEvent(stats)
    if status == jobs.Status.FAILED:
        return ErrorEvent(error_code or "failed", error_message or "the request failed")
    if status == jobs.Status.CANCELLED:
        return ErrorEvent("cancelled", "the request was cancelled")
    return None


def follow(app: Flask, job_id: str, after_seq: int = -1, *, status_events: bool = False) -> Iterator[Event]:
    """The job's events after chunk ``after_seq``, live, ending with one Done or Error event."""
    notifier = get_storage(app).notifier
    key = job_key(job_id)
    cursor = _Cursor(after_seq, status_events)
    quiet_since = time.monotonic()
    while True:
        # The version is read before the query: a notify landing in between
        # makes the wait return at once, so no wake-up is lost.
        version = notifier.version(key)
        closing = notifier.closed
        events = _next_events(app, job_id, cursor)
        yield from events
        if cursor.finished:
            return
        if closing:
            yield ErrorEvent("server_shutting_down", "the server is restarting: resume this stream with "
                             f"GET /api/v1/chat/stream/{job_id} and Last-Event-ID")
            return
        if events:
            quiet_since = time.monotonic()
        quiet_since = yield from _idle(app, key, version, quiet_since)


def _next_events(app: Flask, job_id: str, cursor: _Cursor) -> list[Event]:
    """One read: what happened since the cursor; an error event (and the end) if the read fails."""
    try:
        with get_storage(app).connection() as conn:
            progress = jobs.progress(conn, job_id, cursor.last_seq, cursor.reports_status)
    except StorageError as exc:
        log.info("stream of job %s: database read failed (%s); ending it with an error", job_id, exc)
        progress, error = None, _unavailable(job_id)
    else:
        error = ErrorEvent("not_found", f"no request {job_id}")
    if progress is None:
        cursor.finished = True
        return [error]
    events = cursor.advance(progress)
    health = get_storage(app).health
    if not cursor.finished and not health.ok:
        # The database cannot write: no agent can store the rest now, and blaming it later
        # (agent_lost) would be wrong.  The client resumes once /healthz is back to 200.
        cursor.finished = True
        events.append(_unavailable(job_id))
    return events


def _unavailable(job_id: str) -> ErrorEvent:
    return ErrorEvent("storage_unavailable", "the server's database is unavailable: resume this stream later with "
                      f"GET /api/v1/chat/stream/{job_id} and Last-Event-ID")


def _idle(app: Flask, key: str, version: int, quiet_since: float) -> Generator[KeepaliveEvent, None, float]:
    """Wait for ``key`` to change (or a poll interval), with keepalives; returns the new ``quiet_since``.

    With the notifier, silence costs no query at all; ``NOTIFIER=poll``
    returns after each ``POLL_INTERVAL`` so the caller queries, as the legacy server did.
    """
    notifier = get_storage(app).notifier
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
