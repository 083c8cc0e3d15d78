"""The `--legacy` profile: the old agent's behaviour, kept as the benchmark's "before".

It polls every 1.5 s, POSTs each token on its own in the thread that read it
(so a slow POST stalls reading Ollama) with the single `chunk` field and no
seq, opens a new connection per request, and neither batches nor retries: a
POST that fails loses its token, as it did then. Everything else (config,
heartbeats, cancellation, shutdown) is the current agent's.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from agent.client import ServerClient
from agent.config import AgentConfig
from agent.exceptions import AgentError, JobGone, SignatureRejected

log = logging.getLogger(__name__)

LEGACY_POLL_INTERVAL = 1.5


def legacy_config(config: AgentConfig) -> AgentConfig:
    """`config` with the old agent's fixed timing and protocol: a 1.5 s short poll over HTTP."""
    return dataclasses.replace(config, poll_interval=LEGACY_POLL_INTERVAL, long_poll=0.0, transport="http")


class LegacyPoster:
    """Posts one job's tokens the old way; the same interface as `TokenBatcher`."""

    def __init__(self, job_id: str, client: ServerClient, on_cancel: Callable[[], None] | None = None) -> None:
        self.job_id = job_id
        self._client = client
        self._on_cancel = on_cancel
        self._lock = threading.Lock()  # the heartbeat thread and the reading thread both post
        self.cancelled = False
        self.failed: BaseException | None = None
        self.sent_requests = 0

    def add(self, token: str | dict) -> None:
        # The old form carries text only: thinking and tool calls have no place in it.
        text = token if isinstance(token, str) else token.get("text", "")
        if text:
            self._post(text, False)

    def heartbeat(self) -> None:
        self._post("", False)

    def finish(self, stats: dict | None = None, error: str | None = None, timeout: float | None = None) -> bool:
        """POST done (the old form carries no stats); True when the server took it."""
        return self._post("", True, error)

    def close(self, timeout: float | None = None) -> None:
        """Nothing is buffered, so nothing to stop."""

    def _post(self, chunk: str, done: bool, error: str | None = None) -> bool:
        if self.cancelled:
            return False
        with self._lock:
            self.sent_requests += 1
            try:
                cancelled = self._client.send_legacy(self.job_id, chunk, done, error)
            except JobGone:
                cancelled = True
            except SignatureRejected as exc:
                log.error("job %s: the server refused our signature: %s", self.job_id, exc)
                self.failed = exc
                return False
            except AgentError as exc:
                log.warning("job %s: POST failed, its chunk is lost (legacy: no retry): %s", self.job_id, exc)
                return False
        if cancelled and not self.cancelled:
            self.cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()
        return not cancelled
