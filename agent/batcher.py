"""Post one job's tokens to the server in ordered, retried batches.

`TokenBatcher.add` only appends to a buffer under a lock; a sender thread
owns the network, so a slow POST never stalls the thread reading Ollama.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.backoff import Backoff
from agent.config import DEFAULTS
from agent.exceptions import JobGone, ProtocolError, SeqConflict, SignatureRejected, TransportError
from protocol.wire import MAX_CHUNKS_PER_POST

log = logging.getLogger(__name__)

DEFAULT_RETRY_DEADLINE = 60.0
# A lost POST is retried after 50 ms, 100 ms, ... up to 2 s, until the retry deadline.
DEFAULT_BACKOFF = Backoff(base=0.05, cap=2.0)


@dataclass(frozen=True)
class ChunkBatch:
    """One POST to `/api/v1/inference/stream`: `chunks` start at index `seq` of the answer."""

    job_id: str
    seq: int
    chunks: tuple[str | dict, ...]    # wire items (protocol.deltas): text, or an object for the rest
    done: bool = False
    stats: dict | None = None
    error: str | None = None

    @property
    def end_seq(self) -> int:
        return self.seq + len(self.chunks)

    def to_json(self) -> dict:
        """The request body; `stats` and `error` only when set."""
        body: dict = {"id": self.job_id, "chunks": list(self.chunks), "seq": self.seq, "done": self.done}
        if self.stats is not None:
            body["stats"] = self.stats
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass
class SendReply:
    """The server's answer to a POST; `next_seq` is the first index it does not hold."""

    cancelled: bool
    next_seq: int


class JobStream:
    """What a job's poster keeps over either transport: its tokens from the last acknowledged one on, its end.

    `TokenBatcher` (HTTP) and `agent.socket_poster.SocketPoster` (WebSocket) send them; `_drop_in_flight`
    forgets what a subclass has on the wire once the stream stops. The lock is re-entrant.
    """

    def __init__(self, job_id: str, on_cancel: Callable[[], None] | None) -> None:
        self.job_id = job_id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        # Every token from index `_acked` on: those on the wire first, then newer ones (a dict: a structured delta).
        self._pending: list[str | dict] = []
        self._acked = 0
        self._heartbeat_due = False
        self._finish: tuple[dict | None, str | None] | None = None
        self._done_delivered = False
        self._closed = False
        self._cancelled = False
        self._failed: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def _stopped(self) -> bool:
        return self._closed or self._cancelled or self._failed is not None

    def _accepts_token(self) -> bool:
        """Whether ``add`` may take a token (called under the lock): not once the stream stopped; after
        ``finish`` it is a bug in the caller."""
        if self._stopped():
            return False
        if self._finish is not None:
            raise RuntimeError(f"job {self.job_id}: add() after finish()")
        return True

    def _drop_in_flight(self) -> None:
        """Forget what is on the wire (called under the lock)."""

    def _ask_to_finish(self, stats: dict | None, error: str | None) -> None:
        """Record the end (the first call's stats and error count) for the sender to send."""
        with self._cond:
            if self._finish is None:
                self._finish = (stats, error)
                self._cond.notify_all()

    def _wait_finished(self, timeout: float | None) -> bool:
        """Wait until the server holds the end, or the stream stopped; True in the first case."""
        with self._cond:
            self._cond.wait_for(lambda: self._done_delivered or self._stopped(), timeout)
            return self._done_delivered

    def _mark_closed(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()

    def _cancel(self) -> None:
        """The server says the job is over for us (cancelled, or no longer ours): stop the backend, send nothing."""
        with self._cond:
            if self._cancelled:
                return
            self._cancelled = True
            self._pending.clear()
            self._drop_in_flight()
            self._cond.notify_all()
        if self._on_cancel is not None:
            try:
                self._on_cancel()
            except Exception:
                log.exception("job %s: on_cancel raised; the stream is stopped anyway", self.job_id)

    def _give_up(self, exc: BaseException) -> None:
        with self._cond:
            if not self._stopped():
                self._failed = exc
            self._pending.clear()
            self._drop_in_flight()
            self._cond.notify_all()


class TokenBatcher(JobStream):
    """One ordered token stream of one job, posted in batches.

    At most one POST is in flight; tokens that arrive meanwhile join the next one,
    so batches grow by themselves when the network is slow. `add` after `finish`
    raises `RuntimeError`; after a cancel, a failure or `close` it is a no-op.
    """

    def __init__(self, job_id: str, send: Callable[[ChunkBatch], SendReply], *,
                 max_tokens: int = DEFAULTS["BATCH_MAX_TOKENS"], max_delay: float = DEFAULTS["BATCH_MAX_DELAY"],
                 adaptive: bool = DEFAULTS["BATCH_MODE"] == "adaptive",
                 retry_deadline: float = DEFAULT_RETRY_DEADLINE, backoff: Backoff = DEFAULT_BACKOFF,
                 on_cancel: Callable[[], None] | None = None, max_items: int | None = None) -> None:
        if max_tokens < 1 or max_delay < 0:
            raise ValueError("max_tokens must be >= 1 and max_delay >= 0")
        super().__init__(job_id, on_cancel)
        self._send = send
        self._max_tokens = max_tokens
        self._max_delay = max_delay
        # adaptive: post as soon as nothing is in flight, so the first token goes out
        # at once and a batch holds what was generated during one round trip. Latency
        # is the lowest possible, but on a fast network that can mean one POST per
        # token; the fixed max_delay instead caps a job at ~1/max_delay POSTs a second
        # at the price of up to max_delay extra latency per token.
        self._adaptive = adaptive
        self._retry_deadline = retry_deadline
        self._backoff = backoff
        # A cap on items per POST whatever the mode: embedding vectors are large, and a body must stay
        # under the server's ORCH_MAX_BODY_BYTES. None (chats) keeps the cut a plain copy.
        self._max_items = max_items
        self._in_flight: ChunkBatch | None = None   # the POST in flight, whose tokens lead `_pending`
        self._oldest_at = 0.0  # arrival of the oldest token not yet in a POST
        self._resend_due = False
        self._sent_requests = 0
        self._thread = threading.Thread(target=self._run, name=f"batcher-{job_id}", daemon=True)
        self._thread.start()

    @property
    def sent_requests(self) -> int:
        """POSTs attempted, retries and heartbeats included."""
        return self._sent_requests

    @property
    def delivered_tokens(self) -> int:
        """Tokens the server has acknowledged."""
        return self._acked

    def add(self, token: str | dict) -> None:
        """Buffer one token for the sender thread; never waits for the network."""
        with self._cond:
            if not self._accepts_token():
                return
            buffered = len(self._pending) - (len(self._in_flight.chunks) if self._in_flight is not None else 0)
            self._pending.append(token)
            if buffered == 0:
                self._oldest_at = time.monotonic()
            # Wake the sender only when its decision can change: a timer to start or a full batch.
            if buffered == 0 or buffered + 1 == self._max_tokens:
                self._cond.notify_all()

    def heartbeat(self) -> None:
        """Renew the job's lease with an empty POST, unless tokens are buffered or in flight."""
        with self._cond:
            busy = bool(self._pending) or self._in_flight is not None
            if busy or self._stopped() or self._finish is not None:
                return
            self._heartbeat_due = True
            self._cond.notify_all()

    def finish(self, stats: dict | None = None, error: str | None = None,
               timeout: float | None = None) -> bool:
        """Post what is left with done=True and wait for it; True once the server has it.

        A second call only waits again; its `stats` and `error` are ignored.
        """
        self._ask_to_finish(stats, error)
        return self._wait_finished(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop the sender without flushing; waits up to `timeout` for a POST in flight."""
        self._mark_closed()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _drop_in_flight(self) -> None:
        self._in_flight = None

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._deliver(batch)
        except BaseException as exc:
            self._give_up(exc)  # finish() must not wait on a dead thread
            raise

    def _next_batch(self) -> ChunkBatch | None:
        with self._cond:
            while not (self._stopped() or self._done_delivered):
                now = time.monotonic()
                if self._batch_due(now):
                    return self._cut()
                self._cond.wait(self._oldest_at + self._max_delay - now if self._pending else None)
            return None

    def _batch_due(self, now: float) -> bool:
        if self._finish is not None:
            return True
        if self._pending:
            # The first token of a job goes out at once in every mode: time to
            # first token is what users feel most, and it costs one POST per job
            # (make bench: the fixed 50 ms hold added ~50 ms to first-token p50).
            return (self._adaptive or self._resend_due or self._acked == 0
                    or len(self._pending) >= self._max_tokens or now - self._oldest_at >= self._max_delay)
        return self._heartbeat_due

    def _cut(self) -> ChunkBatch:
        stats, error = self._finish or (None, None)
        # At most MAX_CHUNKS_PER_POST (the server's 413 beyond), fewer where the job wants smaller POSTs: the
        # rest goes in the next POST, and the end of the answer only with the last tokens.
        limit = MAX_CHUNKS_PER_POST if self._max_items is None else min(self._max_items, MAX_CHUNKS_PER_POST)
        items = self._pending[:limit]
        last = self._finish is not None and len(items) == len(self._pending)
        self._in_flight = ChunkBatch(self.job_id, self._acked, tuple(items), last,
                                     stats if last else None, error if last else None)
        self._heartbeat_due = self._resend_due = False
        return self._in_flight

    def _deliver(self, batch: ChunkBatch) -> None:
        """POST `batch` until the server answers; transport errors retry it unchanged."""
        first_failure: float | None = None
        attempt = 0
        while not self._stopped():
            try:
                reply = self._post(batch)
            except TransportError as exc:
                if first_failure is None:
                    first_failure = time.monotonic()
                if not self._pause_before_retry(batch, exc, attempt, first_failure):
                    return
                attempt += 1
                continue
            except SeqConflict as exc:
                self._acknowledge(batch, exc.expected_seq, accepted=False)
            except JobGone:
                self._cancel()
            except SignatureRejected as exc:
                # Revoked, or the clock jumped: the job cannot go on, and it is not a cancellation.
                log.error("job %s: the server refused our signature: %s", self.job_id, exc)
                self._give_up(exc)
            except Exception as exc:
                log.exception("job %s: send raised unexpectedly; giving up the stream", self.job_id)
                self._give_up(exc)
            else:
                self._acknowledge(batch, reply.next_seq, accepted=True)
                if reply.cancelled:
                    self._cancel()
            return

    def _pause_before_retry(self, batch: ChunkBatch, exc: TransportError, attempt: int,
                            first_failure: float) -> bool:
        """Back off before resending `batch`; past the deadline, fail the stream and return False."""
        left = first_failure + self._retry_deadline - time.monotonic()
        if left <= 0:
            # The server's lease will hand the job to another agent; nothing more to do here.
            log.error("job %s: seq %d undelivered for %.1f s, giving up: %s",
                      self.job_id, batch.seq, self._retry_deadline, exc)
            self._give_up(exc)
            return False
        delay = min(self._backoff.delay(attempt), left)
        log.warning("job %s: POST seq %d failed (%s), retry %d in %.3f s",
                    self.job_id, batch.seq, exc, attempt + 1, delay)
        with self._cond:
            self._cond.wait_for(self._stopped, delay)  # close() cuts the pause short
        return True

    def _post(self, batch: ChunkBatch) -> SendReply:
        with self._cond:
            self._sent_requests += 1
        return self._send(batch)  # outside the lock: add() must never wait for the network

    def _acknowledge(self, batch: ChunkBatch, next_seq: int, *, accepted: bool) -> None:
        """The server holds everything before `next_seq`: forget those tokens."""
        if not batch.seq <= next_seq <= batch.end_seq:
            # Below seq: the server lost tokens it had acknowledged and we dropped.
            # Beyond end_seq: it claims tokens we never sent. Either way we cannot repair it.
            self._give_up(ProtocolError(
                f"server at seq {next_seq}, batch covered {batch.seq}..{batch.end_seq}"))
            return
        with self._cond:
            del self._pending[: next_seq - self._acked]
            self._acked = next_seq
            self._in_flight = None
            # A 409 means done=True was refused even if every chunk is stored: send it again.
            self._done_delivered = accepted and batch.done and next_seq == batch.end_seq
            self._resend_due = next_seq < batch.end_seq or (batch.done and not self._done_delivered)
            self._cond.notify_all()
