"""Whether the database takes writes: the state behind /healthz's answer, 503s and streams ending early."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A nearly full disk takes a one-row probe and refuses a batch of chunks: the database counts as
# writing again only once no write has failed for this long (and a probe then succeeds).
RECOVERY_QUIET = 3.0


class StorageHealth:
    """Whether the database takes writes; one log line per change of state, listeners told of each change.

    A write that fails for any reason but a lock (disk full, I/O error, read-only,
    unreachable) marks it failing; a probe write that succeeds (``Storage.probe_write``,
    by the sweeper every round while failing, and by ``/healthz``) marks it healthy
    again: a transaction that commits without changing a page proves nothing.
    Streams end with ``storage_unavailable`` while it fails; locks only make
    writers wait (``StorageBusy`` past the deadline), they do not end streams.
    """

    def __init__(self, name: str, quiet: float = RECOVERY_QUIET) -> None:
        self.name = name
        self.quiet = quiet
        self.failing: str | None = None       # why, while writes fail
        self.since = 0.0
        self.last_failure = 0.0
        self._busy_logged = False
        self._lock = threading.Lock()
        self.listeners: list[Callable[[bool], None]] = []   # called with ok=True/False at each change

    @property
    def ok(self) -> bool:
        return self.failing is None

    @property
    def unsure(self) -> bool:
        """Failing, or a lock was reported: a probe write would tell more (the sweeper makes one)."""
        return self.failing is not None or self._busy_logged

    def failed(self, reason: str) -> None:
        """A write (or the connection) failed for ``reason``."""
        with self._lock:
            self.last_failure = time.monotonic()
            if self.failing is not None:
                return
            self.failing, self.since = reason, self.last_failure
        log.error("%s storage unavailable: %s; requests get 503 storage_unavailable until it writes again",
                  self.name, reason)
        self._tell(False)

    def busy(self, reason: str) -> None:
        """A writer gave up waiting for the lock (logged once until the next successful probe)."""
        if not self._busy_logged:
            self._busy_logged = True
            log.warning("%s storage busy: %s; writers wait, then get 503 storage_unavailable", self.name, reason)

    def wrote(self) -> None:
        """A probe write committed: the database writes, unless another write failed within ``quiet`` seconds."""
        with self._lock:
            if self.failing is not None and time.monotonic() - self.last_failure < self.quiet:
                return
            was, self.failing, self._busy_logged = self.failing, None, False
            since = self.since
        if was is not None:
            log.warning("%s storage available again after %.1f s", self.name, time.monotonic() - since)
            self._tell(True)

    def _tell(self, ok: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(ok)
            except Exception:
                log.error("storage health listener failed; carrying on", exc_info=True)
