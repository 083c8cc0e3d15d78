"""Client presence: noticing that the last reader of a job went away, and what that does to the job.

``DisconnectGuard`` counts the open streams of each job in this process;
when the last one goes away before its final event, the job is cancelled at
once (``CANCEL_GRACE`` 0, or a door whose clients cannot resume) or marked ``client_left_at`` so the sweeper cancels
it after ``CANCEL_GRACE`` unless a client resumes.  Opening a stream on a job clears that mark.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask

from . import metrics
from .storage import Connection, StorageError, get_storage, jobs
from .streaming import FINAL_EVENTS, ChunkEvent, Event

if TYPE_CHECKING:
    from gevent import Greenlet

log = logging.getLogger(__name__)


class OpenStreams:
    """Open streams per job in this process; empty entries are dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, job_id: str) -> int:
        with self._lock:
            self._counts[job_id] = count = self._counts.get(job_id, 0) + 1
            return count

    def discard(self, job_id: str) -> int:
        """Forget one stream; returns how many remain open."""
        with self._lock:
            count = self._counts.pop(job_id, 1) - 1
            if count > 0:
                self._counts[job_id] = count
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

    def __init__(self, app: Flask, job_id: str, events: Iterator[Event], *,
                 client_socket: socket.socket | None = None, grace: float | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.app, self.job_id, self._events = app, job_id, events
        self.grace = app.config["CANCEL_GRACE"] if grace is None else grace
        self._on_close = on_close
        self._final = self._closed = self._left = False
        if open_streams(app).add(job_id) == 1:
            self._write(lambda conn: jobs.set_client_left(conn, job_id, None), "clear client_left_at")
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
        if self._on_close is not None:
            self._on_close()
        if self._watcher is not None:
            self._watcher.kill(block=True, timeout=1)
        if not self._final:
            self._client_left()
        elif not self._left:
            open_streams(self.app).discard(self.job_id)
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def _client_left(self) -> None:
        if self._left or self._final:
            return
        self._left = True
        if open_streams(self.app).discard(self.job_id) > 0:
            return
        now, job_id, grace = time.time(), self.job_id, self.grace
        if grace <= 0:
            self._write(lambda conn: jobs.cancel_job(conn, job_id, now), "cancel")
            log.info("job %s: client left, cancelled", job_id)
        else:
            self._write(lambda conn: jobs.set_client_left(conn, job_id, now), "record client_left_at")
            log.info("job %s: client left, cancel in %g s unless resumed", job_id, grace)

    def _write(self, action: Callable[[Connection], Any], what: str) -> Any:
        try:
            with get_storage(self.app).connection() as conn:
                return action(conn)
        except StorageError as exc:
            # One line, no traceback: the storage's health logs the outage itself.
            log.warning("job %s: could not %s (%s); the sweeper will not see this stream's end", self.job_id,
                        what, exc)
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
