"""The agent's WebSocket to the server (`GET /api/v1/agents/connect`, docs/protocol.md): one connection, kept open.

A thread of its own connects (the upgrade request signed like every agent
request), reads the server's frames and reconnects with the capped, jittered
back-off when the connection drops. Jobs the server pushes wait in a queue
for the worker (`next_job`); acks, refusals and cancels go to the job's
`SocketPoster`; after a reconnect every job still running resends what the
server has not acknowledged. The client is `websockets`' threaded one: it
answers the server's pings and sends its own, so a dead server is found
within `PING_INTERVAL + PING_TIMEOUT` even when nothing else is sent.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from agent.backoff import SERVER_BACKOFF
from agent.exceptions import (
    AgentError,
    AgentRevoked,
    MalformedJob,
    SignatureRejected,
    TransportError,
    UpgradeRefused,
    rejection,
)
from agent.job import Job
from agent.socket_poster import SocketPoster
from protocol import frames
from protocol.signing import signed_headers
from protocol.wire import CONNECT_PATH

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 5.0            # connect and upgrade, like the HTTP client's connect timeout
PING_INTERVAL = 20.0          # the server pings too; ours find a dead server (and keep NAT mappings)
PING_TIMEOUT = 20.0
CLOSE_TIMEOUT = 2.0
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024   # until the server's welcome says otherwise
# Tokens unacknowledged this long without a connection are given up: the server's lease has taken the job back.
RETRY_DEADLINE = 60.0
# A connection open this long before it dropped resets the back-off: the next attempt comes within 0.1 s.
STABLE_SECONDS = 10.0
# Answers to the upgrade that mean "try again later" rather than "no WebSocket here".
TRANSIENT_STATUSES = {408, 429, 500, 502, 503, 504}
USER_AGENT = "ollama-orchestrator-agent/0.1"
_WAKE = object()


def socket_url(api_base: str) -> str:
    """The WebSocket URL for ``api_base``: http -> ws, https -> wss, any path prefix kept."""
    parts = urlsplit(api_base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + CONNECT_PATH, "", ""))


class SocketClient:
    """The connection to the server as agent `agent_id`; `start()` it, then take jobs with `next_job`."""

    backoff = SERVER_BACKOFF        # the poll loop's: the same capped, jittered back-off
    retry_deadline = RETRY_DEADLINE

    def __init__(self, api_base: str, agent_id: str, secret: str, *, name: str = "agent",
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT) -> None:
        self.api_base = api_base.rstrip("/")
        self.url = socket_url(self.api_base)
        self.agent_id = agent_id
        self._secret = secret
        self.name = name
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._posters: dict[str, SocketPoster] = {}
        self._conn: ClientConnection | None = None
        self._error: AgentError | None = None        # why the last attempt to connect failed
        self._attempted = threading.Event()          # the first attempt has ended, either way
        self._ever_connected = False
        self._disconnected_at: float | None = None
        self._wanted: tuple[tuple[str, ...], int] | None = None
        self._announced: tuple | None = None
        self._jobs_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"socket-{name}", daemon=True)

    # --- the worker's side ----------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def next_job(self, models: Sequence[str], slots: int, wait: float,
                 kinds: Sequence[str] | None = None) -> Job | None:
        """Tell the server what we serve and how many jobs we can take, then wait up to `wait` s for one.

        Raises `SignatureRejected` or `UpgradeRefused` when the server refuses the connection, and
        `TransportError` while it has never been reachable; later outages are retried here, quietly.
        """
        self.start()
        self._attempted.wait(wait)
        with self._lock:
            self._wanted = (tuple(models), slots, None if kinds is None else tuple(kinds))
            error = self._error if self._conn is None else None
        if isinstance(error, (SignatureRejected, UpgradeRefused)) or (error and not self._ever_connected):
            raise error
        self._announce()
        try:
            item = self._jobs.get(timeout=wait)
        except queue.Empty:
            return None
        if isinstance(item, MalformedJob):
            raise item
        return None if item is _WAKE else item

    def wake(self) -> None:
        """End a `next_job` wait early (a slot came free: the server must hear of it)."""
        self._jobs.put(_WAKE)

    def poster(self, job_id: str, on_cancel: Callable[[], None] | None) -> SocketPoster:
        poster = SocketPoster(job_id, self.send, lambda: self.max_frame_bytes, on_cancel=on_cancel,
                              on_close=self._forget)
        with self._lock:
            self._posters[job_id] = poster
        return poster

    def send(self, text: str) -> bool:
        """Write one frame; False when there is no connection (the frame is resent after the next one opens)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.send(text)
            return True
        except (ConnectionClosed, OSError):
            return False

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close(frames.CLOSE_NORMAL, "agent stopping")
        if self._thread.is_alive():
            self._thread.join(CLOSE_TIMEOUT + 1)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # --- the connection's thread ----------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                conn = self._open()
            except AgentRevoked as exc:
                self._revoked(exc)
                return
            except AgentError as exc:
                self._failed_attempt(exc, attempt)
                self._stop.wait(self.backoff.delay(attempt))
                attempt += 1
                continue
            opened = time.monotonic()
            with conn:                  # closes it however _serve ends
                self._serve(conn)
            # A connection that lasted counts as a success; one the server keeps closing at once backs off.
            attempt = 0 if time.monotonic() - opened > STABLE_SECONDS else attempt + 1
            self._stop.wait(self.backoff.delay(attempt))

    def _open(self) -> ClientConnection:
        path = urlsplit(self.url).path
        headers = signed_headers(self.agent_id, self._secret, "GET", path, b"", int(time.time()))
        try:
            return connect(self.url, additional_headers=headers, user_agent_header=USER_AGENT,
                           open_timeout=OPEN_TIMEOUT, ping_interval=self.ping_interval,
                           ping_timeout=self.ping_timeout, close_timeout=CLOSE_TIMEOUT, compression=None,
                           max_size=None)
        except InvalidStatus as exc:
            raise _refusal(exc.response.status_code, bytes(exc.response.body or b"")) from None
        except InvalidMessage as exc:
            # No HTTP answer at all (the connection reset or closed mid-handshake): the network's trouble.
            raise TransportError(f"connect to {self.url}: {exc}") from None
        except InvalidURI as exc:
            raise UpgradeRefused(f"{self.url} is not a WebSocket URL: {exc}") from None
        except InvalidHandshake as exc:
            # The answer was not a WebSocket's (a proxy's own page, a 101 without the right headers).
            raise UpgradeRefused(f"the upgrade failed: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"connect to {self.url}: {exc or type(exc).__name__}") from None

    def _revoked(self, exc: AgentRevoked) -> None:
        """An operator removed this agent: its credentials never work again, so stop reconnecting, end the
        running jobs with the reason, and have the next `next_job` raise it (the worker then exits)."""
        with self._lock:
            self._error = exc
            posters = list(self._posters.values())
        log.error("%s: WebSocket to %s: %s", self.name, self.url, exc)
        for poster in posters:
            poster.fail(exc)
        self._attempted.set()
        self._jobs.put(_WAKE)

    def _failed_attempt(self, exc: AgentError, attempt: int) -> None:
        with self._lock:
            changed = type(exc) is not type(self._error)
            self._error = exc
        self._attempted.set()
        if changed and self._ever_connected:
            log.warning("%s: WebSocket to %s: %s; retrying with back-off up to %g s",
                        self.name, self.url, exc, self.backoff.cap)
        self._expire_posters()

    def _serve(self, conn: ClientConnection) -> None:
        with self._lock:
            self._conn, self._error, self._jobs_seen, self._announced = conn, None, 0, None
            posters = list(self._posters.values())
            returning = self._disconnected_at is not None
            self._disconnected_at = None
        self._ever_connected = True
        self._attempted.set()
        log.info("%s: connected to %s over a WebSocket%s", self.name, self.url,
                 f"; resending {len(posters)} job(s) from their last acknowledged token" if returning and posters else "")
        self._announce()
        for poster in posters:
            poster.flush()                  # everything unacknowledged: `reset` made it due when the last one died
        try:
            for message in conn:
                self._handle(message)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._conn = None
                self._disconnected_at = time.monotonic()
                posters = list(self._posters.values())
            for poster in posters:
                poster.reset()
            if not self._stop.is_set():
                log.warning("%s: WebSocket closed (%s); reconnecting", self.name, _close_reason(conn))

    def _announce(self) -> None:
        with self._lock:
            conn, wanted = self._conn, self._wanted
            announcement = None if wanted is None else (*wanted, self._jobs_seen)
            if conn is None or announcement is None or announcement == self._announced:
                return
            self._announced = announcement
        models, slots, kinds, seen = announcement
        extra = {} if kinds is None else {"kinds": list(kinds)}
        self.send(frames.encode(frames.ANNOUNCE, models=list(models), slots=slots, jobs_seen=seen, **extra))

    def _handle(self, message: str | bytes) -> None:
        try:
            frame = frames.decode(message)
        except frames.FrameError as exc:
            log.warning("%s: ignoring a frame from the server: %s", self.name, exc)
            return
        kind = frame.pop("type")
        if kind == frames.JOB:
            with self._lock:
                self._jobs_seen += 1
            try:
                self._jobs.put(Job.from_json(frame))
            except MalformedJob as exc:
                self._jobs.put(exc)
        elif kind == frames.WELCOME:
            self.max_frame_bytes = _positive(frame.get("max_frame_bytes"), DEFAULT_MAX_FRAME_BYTES)
        elif kind in (frames.ACK, frames.CANCEL, frames.ERROR):
            self._to_poster(kind, frame)
        else:
            log.warning("%s: ignoring a %r frame from the server", self.name, kind[:40])

    def _to_poster(self, kind: str, frame: dict) -> None:
        with self._lock:
            poster = self._posters.get(frame.get("id")) if isinstance(frame.get("id"), str) else None
        if poster is None:
            if kind == frames.ERROR:
                log.warning("%s: the server refused a frame: %s: %s", self.name, frame.get("code"),
                            frame.get("message"))
            return
        next_seq = frame.get("next_seq")
        next_seq = next_seq if isinstance(next_seq, int) and not isinstance(next_seq, bool) else None
        if kind == frames.CANCEL:
            poster.cancel()
        elif kind == frames.ERROR:
            poster.refused(str(frame.get("code")), str(frame.get("message")), next_seq)
        elif next_seq is None:
            poster.fail(TransportError(f"an ack without next_seq: {json.dumps(frame)[:120]}"))
        else:
            poster.acknowledged(next_seq, frame.get("done") is True, frame.get("cancelled") is True)

    def _forget(self, poster: SocketPoster) -> None:
        with self._lock:
            if self._posters.get(poster.job_id) is poster:
                del self._posters[poster.job_id]

    def _expire_posters(self) -> None:
        """Jobs whose tokens could not be delivered for `retry_deadline` seconds are given up."""
        with self._lock:
            since = self._disconnected_at
            posters = list(self._posters.values())
        if since is None or time.monotonic() - since < self.retry_deadline:
            return
        for poster in posters:
            if poster.unacknowledged:
                poster.fail(TransportError(f"no connection to the server for {self.retry_deadline:g} s"))


def _refusal(status: int, body: bytes) -> AgentError:
    """What an answer other than 101 to the upgrade means."""
    error: object = None
    try:
        error = json.loads(body)["error"]
        detail = error.get("message") or error.get("code") if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError, AttributeError):
        detail = body[:120].decode(errors="replace").strip()
    message = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status == 401:
        fields = error if isinstance(error, dict) else {}
        return rejection(message, fields.get("code"), fields.get("server_time"))
    if status in TRANSIENT_STATUSES:
        return TransportError(f"server error {message}", status=status)
    return UpgradeRefused(message, status=status)


def _close_reason(conn: ClientConnection) -> str:
    code = conn.close_code
    return "connection lost" if code is None else f"{code}{': ' + conn.close_reason if conn.close_reason else ''}"


def _positive(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
