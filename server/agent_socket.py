"""The agent protocol over one WebSocket per agent (docs/protocol.md, "The WebSocket protocol").

    GET /api/v1/agents/connect   signed like every agent request, then upgraded

Each socket runs three greenlets: wsproto's reader (``server.websocket``), this
view's own, which handles the agent's frames in order (``announce``, ``chunks``),
and a dispatcher, which waits on the notifier the way a parked long poll does
(its models' queue keys while it has a free slot, the cancel keys of the jobs it
holds) and pushes ``job`` and ``cancel`` frames, pings, and finds dead peers.
Everything stored goes through the HTTP protocol's own functions: the claim and
delivery lease (``inference.take_job``), the checked batch (``inference.chunk_post``)
and its seq-idempotent storage (``inference.store_post``).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request

from protocol import frames
from protocol.models import KINDS
from protocol.wire import CONNECT_PATH

from . import body
from .auth import agent_required
from .errors import ApiError, BadRequest, Unauthorized
from .inference import MAX_SLOTS, checked_models, chunk_post, store_post
from .socket_dispatch import Dispatcher
from .storage import StorageError, agents, close_db, get_storage
from .websocket import HandshakeError, WebSocket, check_upgrade, raw_socket

log = logging.getLogger(__name__)

bp = Blueprint("agent_socket", __name__)

# Frames received and not yet handled; one more closes the socket as a flood.  The reference agent keeps at most
# 16 frames unacknowledged per job (agent/socket_poster.py), so this is 256 jobs' worth of a legitimate agent.
MAX_QUEUED_FRAMES = 4096
KNOWN_TYPES = frozenset(frames.AGENT_TYPES + frames.SERVER_TYPES + ("invalid",))
# Frames of one job acknowledged together (the agent keeps up to 16 unacknowledged: agent/socket_poster.py).
ACK_EVERY = 8


# Werkzeug routes a request that asks for an upgrade only to a rule marked websocket=True (any other gets a bare
# 400): the second rule lets a plain GET reach the view too, to be told it needs the upgrade (426).
@bp.get(CONNECT_PATH, websocket=True)
@bp.get(CONNECT_PATH)
@agent_required
def connect():
    """Upgrade a signed request to the agent's socket and serve it until either side closes."""
    try:
        key = check_upgrade(request.headers)
    except HandshakeError as exc:
        raise ApiError(str(exc), code="upgrade_required" if exc.status == 426 else "bad_upgrade",
                       status=exc.status) from None
    sock = raw_socket(request.environ)
    if sock is None:
        raise ApiError("this server cannot hand its socket over (not gunicorn): use the HTTP protocol",
                       code="websocket_unavailable", status=501)
    app, agent_id = current_app._get_current_object(), g.agent_id
    close_db()          # the socket lives for hours: it must not keep the signature check's connection
    ws = WebSocket(sock, key, max_message_bytes=app.config["MAX_BODY_BYTES"], max_queued=MAX_QUEUED_FRAMES,
                   name=f"agent {agent_id}")
    AgentSession(app, agent_id, ws).run()
    return _Upgraded()


class _Upgraded(Response):
    """What the view returns once the socket has ended: nothing more may be written to the connection."""

    def __call__(self, environ, start_response):
        if "gunicorn.socket" in environ:
            raise StopIteration()       # gunicorn's async worker closes the connection quietly on it
        return []


class AgentSession:
    """One connected agent: the frames it sends, handled in order, and the dispatcher pushing work to it."""

    def __init__(self, app: Flask, agent_id: str, ws: WebSocket) -> None:
        self.app = app
        self.agent_id = agent_id
        self.ws = ws
        self.storage = get_storage(app)
        self.metrics = app.extensions.get("metrics")
        self.models: list[str] | None = None        # None until the first announce: nothing is pushed before
        self.slots = 0                              # free slots as last announced
        self.jobs_seen = 0                          # job frames the agent had received when it announced
        self.kinds: list[str] | None = None         # job kinds it runs (None: plain chats only)
        self.jobs_sent = 0
        self.held: dict[str, int] = {}              # jobs pushed here and not known to be over -> cancel key version
        self.unacked: dict[str, int] = {}           # chunks frames stored but not acknowledged yet, by job
        self.wake_key = f"socket:{uuid.uuid4().hex}"
        self._counters: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()
        self.dispatcher = Dispatcher(self)

    @property
    def free_slots(self) -> int:
        """Slots the server may still fill: what was announced, less the jobs sent since (not seen then)."""
        return max(0, self.slots - max(0, self.jobs_sent - self.jobs_seen))

    def run(self) -> None:
        log.info("agent %s connected over a WebSocket", self.agent_id)
        if self.metrics is not None:
            self.metrics.agent_sockets.inc()
        cfg = self.app.config
        self.send(frames.WELCOME, protocol=frames.VERSION, agent=self.agent_id, lease_seconds=cfg["LEASE_SECONDS"],
                  ping_interval=cfg["WS_PING_INTERVAL"], max_frame_bytes=cfg["MAX_BODY_BYTES"],
                  max_queued_frames=MAX_QUEUED_FRAMES)
        self.dispatcher.start()
        try:
            while (message := self.ws.receive()) is not None:
                self.handle(message)
                if self.ws.backlog:
                    # SQLite never yields: a burst of frames would hold the worker until the last was stored.
                    time.sleep(0)
        finally:
            self.dispatcher.stop()
            closed = self.ws.closed
            self.ws.end(frames.CLOSE_NORMAL, "bye")
            if self.metrics is not None:
                self.metrics.agent_sockets.dec()
            log.info("agent %s disconnected (%s%s); %d frames in, %d jobs pushed", self.agent_id,
                     closed.code if closed else frames.CLOSE_NORMAL, f": {closed.reason}" if closed else "",
                     self.ws.received, self.jobs_sent)

    def send(self, frame_type: str, **fields: Any) -> bool:
        """Send one frame (False once the socket is gone)."""
        self._count("out", frame_type)
        return self.ws.send(frames.encode(frame_type, **fields))

    def wake_dispatcher(self) -> None:
        self.storage.notifier.notify(self.wake_key)

    # --- frames from the agent ---------------------------------------------------------------------

    def handle(self, message: str | bytes) -> None:
        """One frame; a refused one is answered with an ``error`` frame and changes nothing."""
        job_id = None
        try:
            frame = frames.decode(message)
            self._count("in", frame["type"])
            if frame["type"] == frames.CHUNKS:
                job_id = frame.get("id") if isinstance(frame.get("id"), str) else None
                self._chunks(frame)
            elif frame["type"] == frames.ANNOUNCE:
                self._announce(frame)
            else:
                raise BadRequest(f"unknown frame type {frame['type'][:40]!r}: expected one of "
                                 f"{', '.join(frames.AGENT_TYPES)}", code="unknown_type")
        except frames.FrameError as exc:
            self._count("in", "invalid")
            self.send(frames.ERROR, code="invalid_frame", message=str(exc))
        except StorageError as exc:
            # No traceback: the storage's health logs the outage once, not once per frame.
            log.info("agent %s: the database failed (%s); closing its socket so it resends on a new one",
                     self.agent_id, exc)
            self.ws.close(frames.CLOSE_INTERNAL_ERROR, "the server's database is unavailable: reconnect shortly")
        except Unauthorized:
            log.info("agent %s was removed; closing its socket", self.agent_id)
            self.ws.close(frames.CLOSE_POLICY_VIOLATION, "this agent was removed")
        except ApiError as exc:
            if exc.status in (403, 410) and self._removed():
                # Its jobs were failed (agent_revoked) as it was removed: say why, not "job gone", and let go.
                log.info("agent %s was removed; closing its socket", self.agent_id)
                self.ws.close(frames.CLOSE_POLICY_VIOLATION, "this agent was removed")
                return
            self._refused(job_id, exc)

    def _removed(self) -> bool:
        try:
            with self.storage.connection() as conn:
                return agents.is_removed(conn, self.agent_id)
        except StorageError:
            return False

    def _announce(self, frame: dict[str, Any]) -> None:
        models = frame.get("models")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise BadRequest("'models' must be a list of model names", code="invalid_field")
        models = checked_models(models, "invalid_field")
        slots = body.integer(frame.get("slots"), "slots", maximum=MAX_SLOTS)
        seen = body.integer(frame.get("jobs_seen", 0), "jobs_seen")
        kinds = frame.get("kinds")        # None: an older agent, plain chats only (as a poll without kinds)
        if kinds is not None and (not isinstance(kinds, list) or not set(kinds) <= set(KINDS)):
            raise BadRequest(f"'kinds' must be a list of names from {', '.join(KINDS)}", code="invalid_field")
        if seen > self.jobs_sent:
            raise BadRequest(f"'jobs_seen' is {seen}, but {self.jobs_sent} jobs were sent on this socket",
                             code="invalid_field")
        with self.storage.connection() as conn:     # online at once for its models, as after a poll
            agents.touch(conn, self.agent_id, time.time(), models or None, slots, kinds)
        with self.lock:
            self.models, self.slots, self.jobs_seen, self.kinds = models, slots, seen, kinds
        self.wake_dispatcher()

    def _chunks(self, frame: dict[str, Any]) -> None:
        if "chunk" in frame:
            raise BadRequest("a socket takes only the batched form: 'chunks' and 'seq'", code="invalid_field")
        post = chunk_post(frame, self.app.config["MAX_CHUNKS_PER_POST"])
        if post.seq is None:
            raise BadRequest("'seq' is required with 'chunks'", code="missing_field")
        with self.storage.connection() as conn:
            result = store_post(conn, self.agent_id, post, time.time(), self.app.config["LEASE_SECONDS"])
            if result.stored and self.metrics is not None:
                self.metrics.observe_first_token(conn, post.id)
        done = post.done and not result.cancelled and result.next_seq == post.seq + len(post.chunks)
        if done or result.cancelled:
            self._release(post.id)
        with self.lock:
            unacked = self.unacked.pop(post.id, 0) + 1
            # Acks are cumulative: one per ACK_EVERY frames of a stream is enough, and saves the agent a wake-up
            # per token. A heartbeat (no chunks), the end or a cancel is answered at once.
            if post.chunks and unacked < ACK_EVERY and not (post.done or result.cancelled or result.finished):
                self.unacked[post.id] = unacked
                return          # the woken stream runs as this greenlet waits for the next frame
        if result.changed:
            time.sleep(0)       # let the woken stream write the token before the ack is built (see inference.stream)
        self.send(frames.ACK, id=post.id, next_seq=result.next_seq, done=done, cancelled=result.cancelled)

    def _refused(self, job_id: str | None, exc: ApiError) -> None:
        fields = {k: v for k, v in exc.extra.items() if k != "expected_seq"}
        if "expected_seq" in exc.extra:
            fields["next_seq"] = exc.extra["expected_seq"]      # a gap: resend from here
        elif job_id is not None and exc.status in (403, 404, 410):
            self._release(job_id)
        self.send(frames.ERROR, **({"id": job_id} if job_id is not None else {}), code=exc.code,
                  message=exc.message, **fields)

    def _release(self, job_id: str) -> None:
        with self.lock:
            self.held.pop(job_id, None)
            self.unacked.pop(job_id, None)

    def _count(self, direction: str, frame_type: str) -> None:
        if frame_type not in KNOWN_TYPES:
            frame_type = "other"        # an agent's made-up types must not grow the metric (or this cache)
        counter = self._counters.get((direction, frame_type))
        if counter is None:
            if self.metrics is None:
                return
            # labels() takes a lock and hashes its values: done once per kind of frame, not per token.
            counter = self._counters[(direction, frame_type)] = self.metrics.socket_frames.labels(direction,
                                                                                                 frame_type)
        counter.inc()
