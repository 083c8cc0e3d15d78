"""A background loop that expires leases, times out the queue and cancels abandoned jobs.

It is the only periodic database work, and it runs once a second, not once
per waiting stream: the hot path (chunk POSTs, streams) never scans.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .storage import Connection, StorageError, get_storage, leases

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)


class Sweeper:
    """Runs ``sweep`` every ``SWEEP_INTERVAL`` seconds until ``stop``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        # Set at start and when storage writes again: the next round renews every lease first.
        self.renew_due = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listeners: list = []   # callables(list[leases.Expired]), e.g. metrics

    def hold_leases(self) -> None:
        """Have the next round give every running job one full lease before it expires any.

        While this server was down (or could not write), its agents' POSTs were refused
        and their leases ran out with nobody at fault: an agent retrying with back-off
        must reach the server before the sweeper blames it (``agent_lost``).
        """
        self.renew_due = True

    def storage_changed(self, ok: bool) -> None:
        """Storage health listener: when writes work again, every running job gets a full lease."""
        if ok:
            self.hold_leases()

    def start(self) -> None:
        self.hold_leases()
        self._thread = threading.Thread(target=self._run, name="orchestrator-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        store = get_storage(self.app)
        while not self._stop.wait(self.app.config["SWEEP_INTERVAL"]):
            try:
                # A pooled connection per round, not one for good: after the database restarts, a
                # connection of our own would fail every round and keep its health from recovering.
                with store.connection() as conn:
                    self.sweep(conn)
            except StorageError as exc:
                # The storage's health logs the outage once; a line a second here would bury it.
                log.debug("sweep failed (%s); retrying next interval", exc)
            except Exception:
                # A bug must not kill the sweeper either; log it and try again next round.
                log.error("sweep failed; retrying next interval", exc_info=True)

    def sweep(self, conn: Connection, now: float | None = None) -> list[leases.Expired]:
        """One round; returns what changed (its waiters are woken by the writes themselves)."""
        now = time.time() if now is None else now
        cfg, store = self.app.config, get_storage(self.app)
        if store.health.unsure:
            # While writes fail, agents' POSTs fail too: no lease is renewed, and nobody is to blame.
            # A write of our own finds out whether the database is back (the listener then renews leases).
            store.probe_write(conn)
        if not store.sweep_lock(conn):
            return []             # another host's sweeper is at it
        try:
            if self.renew_due:
                renewed = leases.renew_all(conn, now, cfg["LEASE_SECONDS"], cfg["DELIVERY_LEASE_SECONDS"])
                self.renew_due = False
                if renewed:
                    log.warning("gave %d running job(s) a full lease: their agents could not reach the database",
                                renewed)
            changed = leases.expire_leases(conn, now, cfg["MAX_ATTEMPTS"])
            changed += leases.expire_queue(conn, now, cfg["QUEUE_TIMEOUT"])
            changed += leases.cancel_abandoned(conn, now, cfg["CANCEL_GRACE"])
        finally:
            store.sweep_unlock(conn)
        for item in changed:
            log.info("job %s %s", item.id, item.outcome)
        conn.notifier.prune()
        for listener in self.listeners:
            listener(changed)
        return changed
