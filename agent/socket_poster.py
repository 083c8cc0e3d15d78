"""One job's tokens over the agent's WebSocket: sent as they come, resent after a reconnect until acknowledged.

The `Poster` of a job run by the WebSocket transport (`agent.socket_client`).
Unlike the HTTP batcher, nothing waits for a reply before the next frame: the
thread that hands a token to `add` writes its frame itself (no hand-over to a
sender thread: the token leaves at once, and one thread switch fewer per token
is CPU the 1 ms-per-token budget keeps). Tokens that arrive while a frame of this
job is being written, or while `WINDOW` frames await their ack, join the next
frame: "coalescing only what arrives while the socket is busy". A write to a
stalled socket blocks only until the kernel's send buffer has room (thousands of
tokens) or the connection is declared dead by its pings.

The server acknowledges with cumulative `next_seq`; every token from the last
acknowledged one on is kept, and after a reconnect `rewind` sends them again
from there: storage is seq-idempotent, so what the server already had is
acknowledged, not stored twice.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable

from agent.batcher import ChunkBatch, JobStream
from agent.exceptions import AgentError, ProtocolError
from protocol.frames import chunks_frame
from protocol.wire import MAX_CHUNKS_PER_POST

log = logging.getLogger(__name__)

# Frames of one job sent and not yet acknowledged; more tokens wait and go in one frame once an ack comes.
# The server closes a socket with over 4096 frames waiting (a flood): 16 per job stays far below that.
WINDOW = 16
# The error codes that mean this agent no longer holds the job (HTTP 403, 404 and 410): stop, do not resend.
GONE_CODES = frozenset({"not_your_job", "job_not_found", "lease_expired", "job_done", "job_failed", "job_cancelled",
                        "job_queued"})
# A JSON string is at most 6 characters per character of text (\u0000 escapes): frames stay under the limit.
ESCAPED_CHARS_PER_CHAR = 6


class SocketPoster(JobStream):
    """The tokens of one job, delivered over a `SocketClient`; the same interface as `TokenBatcher`."""

    sent_unit = "frames"        # what `sent_requests` counts, in the job's log line

    def __init__(self, job_id: str, send: Callable[[str], bool], max_frame_bytes: Callable[[], int], *,
                 on_cancel: Callable[[], None] | None = None, on_close: Callable[[SocketPoster], None] | None = None,
                 ) -> None:
        super().__init__(job_id, on_cancel)
        self._send = send
        self._max_frame_bytes = max_frame_bytes
        self._on_close = on_close
        self._sent = 0                  # tokens before this index were written on the current connection
        self._in_flight: deque[int] = deque()   # the end seq of each frame awaiting its ack
        self._final_sent = False
        self._sending = False
        self._frames = 0

    @property
    def sent_requests(self) -> int:
        """Frames written, resends and heartbeats included."""
        return self._frames

    @property
    def unacknowledged(self) -> bool:
        with self._cond:
            return bool(self._pending) or (self._finish is not None and not self._done_delivered)

    # --- the job's side ---------------------------------------------------------------------

    def add(self, token: str | dict) -> None:
        """Send `token` now, or with the next frame if one of this job's is being written or the window is full."""
        with self._cond:
            if not self._accepts_token():
                return
            self._pending.append(token)
        self.flush()

    def heartbeat(self) -> None:
        """Renew the lease with an empty frame, unless tokens wait to be sent (their frame renews it)."""
        with self._cond:
            if self._sent < self._acked + len(self._pending) or self._stopped() or self._finish is not None:
                return
            self._heartbeat_due = True
        self.flush()

    def finish(self, stats: dict | None = None, error: str | None = None, timeout: float | None = None) -> bool:
        """Send what is left with done=true and wait for its ack; True once the server has it."""
        self._ask_to_finish(stats, error)
        self.flush()
        return self._wait_finished(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Forget the job: nothing more is sent for it."""
        self._mark_closed()
        if self._on_close is not None:
            self._on_close(self)

    # --- the connection's side --------------------------------------------------------------

    def flush(self) -> None:
        """Write every frame that is due, unless another thread is writing this job's (it writes them all)."""
        with self._cond:
            if self._sending:
                return
            self._sending = True
        written = True
        try:
            while True:
                with self._cond:
                    # Decided under the lock that clears the flag: a token added meanwhile is never left behind.
                    cut = self._cut() if written else None
                    if cut is None:
                        self._sending = False
                        return
                frame, batch = cut
                written = self._send(frame)
                if not written:
                    # No connection: the frame never left, so the next one (after a reconnect) starts here.
                    with self._cond:
                        self._unsend(batch)
        except BaseException:
            with self._cond:
                self._sending = False
            raise

    def reset(self) -> None:
        """The connection is lost: frames written into it may never have arrived, so all that is not
        acknowledged is due again, from the last ack (sent by `flush` on the next connection)."""
        with self._cond:
            self._sent = self._acked
            self._in_flight.clear()
            self._final_sent = False

    def rewind(self) -> None:
        """`reset`, then send again what is due."""
        self.reset()
        self.flush()

    def acknowledged(self, next_seq: int, done: bool, cancelled: bool) -> None:
        """An ``ack`` frame: the server holds every chunk before `next_seq`."""
        with self._cond:
            if not self._acked <= next_seq <= self._acked + len(self._pending):
                self._fail(ProtocolError(f"server at seq {next_seq}, but {self._acked} were acknowledged and "
                                         f"{self._acked + len(self._pending)} sent"))
                return
            self._forget_before(next_seq)
            while self._in_flight and self._in_flight[0] <= next_seq:
                self._in_flight.popleft()
            if done and self._finish is not None:
                self._done_delivered = True
            self._cond.notify_all()
        if cancelled:
            self._cancel()
        else:
            self.flush()

    def refused(self, code: str, message: str, next_seq: int | None) -> None:
        """An ``error`` frame about this job."""
        if code == "seq_gap" and next_seq is not None:
            with self._cond:
                if next_seq < self._acked:
                    self._fail(ProtocolError(f"server at seq {next_seq}, below the {self._acked} it acknowledged"))
                    return
                self._forget_before(min(next_seq, self._acked + len(self._pending)))
                self._sent, self._final_sent = self._acked, False
                self._in_flight.clear()
            self.flush()
        elif code in GONE_CODES:
            log.warning("job %s: the server says %s (%s): stopping it", self.job_id, code, message)
            self._cancel()
        else:
            self._fail(ProtocolError(f"server refused a frame: {code}: {message}"))

    def cancel(self) -> None:
        """A ``cancel`` frame: the user has gone, stop generating."""
        self._cancel()

    def fail(self, exc: AgentError) -> None:
        """Give up (the server unreachable past the retry deadline); the server's lease takes the job back."""
        self._fail(exc)

    # --- internals (under the lock) ---------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if not self._stopped():
            log.error("job %s: giving up its stream: %s", self.job_id, exc)
        self._give_up(exc)

    def _drop_in_flight(self) -> None:
        self._in_flight.clear()

    def _forget_before(self, next_seq: int) -> None:
        del self._pending[: next_seq - self._acked]
        self._acked = next_seq
        self._sent = max(self._sent, next_seq)

    def _unsend(self, batch: ChunkBatch) -> None:
        self._sent = min(self._sent, batch.seq)
        if self._in_flight and self._in_flight[-1] == batch.end_seq:
            self._in_flight.pop()
        if batch.done:
            self._final_sent = False
        if not batch.chunks and not batch.done:
            self._heartbeat_due = True

    def _cut(self) -> tuple[str, ChunkBatch] | None:
        """The next frame to write, or None: everything is sent, the window is full, or the job is over."""
        if self._stopped() or self._done_delivered or len(self._in_flight) >= WINDOW:
            return None
        unsent = self._pending[self._sent - self._acked:]
        budget, count = self._max_frame_bytes() // 2, 0
        for token in unsent[:MAX_CHUNKS_PER_POST]:
            # A text token at its worst escaped; a structured delta (thinking, tool calls, a vector) as encoded.
            size = len(token) * ESCAPED_CHARS_PER_CHAR if type(token) is str else len(json.dumps(token))
            budget -= size + 3
            if budget < 0 and count:
                break
            count += 1
        final = self._finish is not None and not self._final_sent and count == len(unsent)
        if not (count or final or self._heartbeat_due):
            return None
        stats, error = self._finish if final else (None, None)
        batch = ChunkBatch(self.job_id, self._sent, tuple(unsent[:count]), final, stats, error)
        self._sent = batch.end_seq
        self._in_flight.append(batch.end_seq)
        self._heartbeat_due = False
        self._final_sent = self._final_sent or final
        self._frames += 1
        return chunks_frame(batch.to_json()), batch
