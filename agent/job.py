"""One job: what a poll hands out, and its run on a thread of its own."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from agent.backend import BackendError, ChatStream
from agent.exceptions import MalformedJob, SignatureRejected
from protocol.models import CHAT, EMBED, KINDS

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0
# The Ollama fields a job may carry besides model, messages and options, passed to Ollama as they are.
REQUEST_FIELDS = ("tools", "format", "think", "keep_alive", "input", "truncate", "dimensions")
MIN_HEARTBEAT_INTERVAL = 0.5
UNEXPECTED_ERROR = "the agent failed unexpectedly; see its log"


@dataclass(frozen=True)
class Job:
    """A job as the server's poll describes it."""

    id: str
    model: str
    messages: list[dict]
    options: dict = field(default_factory=dict)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    kind: str = CHAT
    request: dict = field(default_factory=dict)   # tools, format, think, keep_alive; input for embeddings

    @classmethod
    def from_json(cls, data: Any) -> Job:
        """Check a poll's JSON; raises `MalformedJob` (with the id when there is one)."""
        if not isinstance(data, dict):
            raise MalformedJob("the job is not a JSON object")
        job_id = data.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise MalformedJob("the job has no id")
        model, messages = data.get("model"), data.get("messages")
        options, lease = data.get("options") or {}, data.get("lease_seconds", DEFAULT_LEASE_SECONDS)
        if not isinstance(model, str) or not model:
            raise MalformedJob("the job has no model", job_id)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise MalformedJob("the job's messages are not a list of objects", job_id)
        if not isinstance(options, dict):
            raise MalformedJob("the job's options are not an object", job_id)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
            raise MalformedJob("the job's lease_seconds is not a positive number", job_id)
        kind = data.get("kind", CHAT)
        if kind not in KINDS:
            raise MalformedJob(f"the job's kind {kind!r} is not one this agent runs", job_id)
        request = {name: data[name] for name in REQUEST_FIELDS if data.get(name) is not None}
        if kind == EMBED and not (isinstance(request.get("input"), list)
                                  and all(isinstance(text, str) for text in request["input"])):
            raise MalformedJob("the embedding job's input is not a list of strings", job_id)
        return cls(job_id, model, messages, options, float(lease), kind, request)


class Poster(Protocol):
    """Where a job's tokens go: `agent.batcher.TokenBatcher`, or the legacy profile's poster."""

    cancelled: bool
    failed: BaseException | None
    sent_requests: int

    def add(self, token: str | dict) -> None: ...

    def heartbeat(self) -> None: ...

    def finish(self, stats: dict | None = None, error: str | None = None,
               timeout: float | None = None) -> bool: ...

    def close(self, timeout: float | None = None) -> None: ...


class JobOutcome(StrEnum):
    """How a run ended."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the server stopped answering; its lease gives the job back


class JobRun:
    """Streams one job's answer from the backend into a poster, on its own thread.

    The first POST (an empty heartbeat) acknowledges delivery. It goes out right
    after the request to the backend is written: sent first, it and the poster's
    thread competed with that request for the GIL (make bench, loopback: pickup
    p50 ~15 -> ~10 ms with the client's proxy change). A backend slow to accept
    the connection delays it as long, at most its connect timeout (5 s, like the
    server's delivery lease): Ollama normally runs on the same host. Heartbeats
    follow whenever no token came for a third of the lease, which keeps the job
    through minutes of model loading. When the server cancels or takes the
    job back, the poster's `on_cancel` closes the backend stream, which stops Ollama.
    """

    def __init__(self, job: Job, stream: ChatStream, make_poster: Callable[[str, Callable[[], None]], Poster],
                 on_finished: Callable[[JobRun, str], None], *, name: str = "agent") -> None:
        self.job = job
        self.name = name
        self._stream = stream
        self._make_poster = make_poster
        self._poster: Poster | None = None  # made in run(), once the backend has the request
        self._on_finished = on_finished
        self._abort_reason: str | None = None
        self._stopped = threading.Event()
        self._last_token_at = time.monotonic()
        self._first_token_at: float | None = None
        self.failure: BaseException | None = None   # why the server refused the job's POSTs, if it did
        self.heartbeat_interval = max(MIN_HEARTBEAT_INTERVAL, job.lease_seconds / 3)
        self.thread = threading.Thread(target=self.run, name=f"job-{job.id[:12]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def abort(self, reason: str) -> None:
        """Stop generating now and end the job with `reason` as its error (used at shutdown)."""
        self._abort_reason = reason
        self._stream.close()

    def run(self) -> None:
        started = time.monotonic()
        outcome = JobOutcome.FAILED
        heartbeats = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job.id[:12]}", daemon=True)
        send_error = self._send_request()
        self._poster = self._make_poster(self.job.id, self._stream.close)
        try:
            self._poster.heartbeat()
            heartbeats.start()
            outcome = self._stream_answer(send_error)
        except Exception:
            log.exception("%s: job %s crashed; reporting it as failed", self.name, self.job.id)
            self._poster.finish(error=UNEXPECTED_ERROR)
        finally:
            self._stopped.set()
            self._stream.close()
            self._poster.close(timeout=1.0)
            self._log_summary(outcome, started)
            self._on_finished(self, outcome)

    def _log_summary(self, outcome: str, started: float) -> None:
        """One line per job: model, tokens, generation rate and time to the first token."""
        now, tokens = time.monotonic(), getattr(self._stream, "tokens", 0)
        first = self._first_token_at
        rate = f"{tokens / (now - first):.1f}" if first is not None and now > first else "-"
        log.info("%s: job %s %s after %.2f s (%d tokens, %d %s): model %s, %s tokens/s, first token after %s",
                 self.name, self.job.id, outcome, now - started, tokens, self._poster.sent_requests,
                 getattr(self._poster, "sent_unit", "POSTs"), self.job.model, rate,
                 f"{first - started:.3f} s" if first is not None else "-")

    def _send_request(self) -> str | None:
        """Have the backend start now when its stream can (`send()`); returns the error that stopped it."""
        send = getattr(self._stream, "send", None)
        if send is None:
            return None  # the request goes out when iterating
        try:
            send()
        except BackendError as exc:
            log.warning("%s: job %s failed in the backend: %s", self.name, self.job.id, exc)
            return str(exc)
        except Exception:
            log.exception("%s: job %s crashed sending its request; reporting it as failed", self.name, self.job.id)
            return UNEXPECTED_ERROR
        return None

    def _stream_answer(self, error: str | None = None) -> str:
        try:
            for token in () if error else self._stream:
                self._last_token_at = time.monotonic()
                if self._first_token_at is None:
                    self._first_token_at = self._last_token_at
                self._poster.add(token)
                if self._poster.failed is not None:
                    break
        except BackendError as exc:
            error = str(exc)
            log.warning("%s: job %s failed in the backend: %s", self.name, self.job.id, error)
        if self._poster.cancelled:
            return JobOutcome.CANCELLED
        if isinstance(self._poster.failed, SignatureRejected):
            # Revoked or a clock that jumped: the job failed here, and saying "lost" or "cancelled" would lie.
            self.failure = self._poster.failed
            log.error("%s: job %s failed: %s", self.name, self.job.id, self.failure)
            return JobOutcome.FAILED
        if self._poster.failed is not None:
            return JobOutcome.LOST
        error = error or self._abort_reason
        if error is None and self._stream.stats is None:
            error = "the answer ended early"  # closed without a reason: never expected, but never silent
        if self._poster.finish(stats=self._stream.stats, error=error):
            return JobOutcome.FAILED if error else JobOutcome.DONE
        return JobOutcome.CANCELLED if self._poster.cancelled else JobOutcome.LOST

    def _heartbeat(self) -> None:
        interval = self.heartbeat_interval
        while not self._stopped.wait(interval):
            if time.monotonic() - self._last_token_at >= interval:
                self._poster.heartbeat()
