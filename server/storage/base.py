"""What every storage engine offers: pooled connections, short transactions, wake-ups on commit.

Domain modules (``jobs``, ``chunks``, ``leases``, ``agents``, ``stats``) hold
portable SQL with ``?`` placeholders and run it on a ``Connection``.  A write
that others wait for announces a notifier key with ``conn.notify(key)``
inside its transaction; the engine delivers the wake-up only once the
transaction has committed, so a woken waiter always reads the new rows.  An
engine is a subclass of ``Storage`` and ``Connection``: SQLite today
(``sqlite.py``); a second engine is a second module, not edits across the tree.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import g, has_app_context

from ..notifier import Notifier
from .health import StorageHealth

# Connections per storage.  Opening a SQLite one costs ~0.5 ms here (schema parse,
# pragmas): a fifth of an agent POST, so requests borrow.  The pool is bounded: a burst
# beyond it waits (cooperatively under gevent) instead of opening more.  Unbounded, a
# 500-chat burst opened 500 SQLite connections, and the file handles of those closed
# afterwards stayed open while the pool lived (SQLite's unix VFS defers closing a
# file's descriptor while another connection of the process holds a lock on it, and
# WAL readers always do): 492 descriptors after the burst.
POOL_SIZE = 16
# How long a write waits for a lock another connection or process holds (SQLite) before StorageBusy.
BUSY_DEADLINE = 5.0
# How long a borrower waits for a pooled connection before the database counts as unavailable (503).
POOL_TIMEOUT = 5.0
MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent.parent / "migrations"


class StorageError(Exception):
    """The database failed (locked, unreachable, full, corrupt): the server's trouble, not the client's.

    Rendered as a 503 ``storage_unavailable`` (agents retry it, server/errors.py); ``str()`` is the engine's
    own reason, for logs and the CLI, never sent to clients.
    """


class StorageBusy(StorageError):
    """Another connection or process held the write lock for longer than a request waits: retry soon."""


class Connection:
    """One database connection: portable SQL, transactions, and wake-ups announced on commit."""

    # Appended to a SELECT whose rows the same transaction then updates, by engines with row locks: SQLite's
    # BEGIN IMMEDIATE already serializes every writer, PostgreSQL's READ COMMITTED would lose updates.
    for_update = ""          # the row is ours until COMMIT (a chunk POST, a cancel)
    skip_locked = ""         # rows another transaction holds are passed over (a claim, a sweep)
    # How long a statement waits for a lock held elsewhere (engines that wait in this process: SQLite).
    busy_deadline = BUSY_DEADLINE

    def __init__(self, notifier: Notifier, health: StorageHealth | None = None) -> None:
        self.notifier = notifier
        self.health = health if health is not None else StorageHealth("database")
        self._announced: list[tuple[str, int | None]] = []

    # --- what an engine implements ------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns a DB-API cursor (fetchone, fetchall, rowcount, iteration)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One short write transaction; rolled back (and its wake-ups dropped) if the block raises."""
        self._begin()
        try:
            yield self
        except BaseException:
            self._announced.clear()
            self._rollback()
            raise
        try:
            self._commit()
        except BaseException:
            self._announced.clear()       # nothing was written: nobody is woken (nor by the next transaction)
            raise
        announced, self._announced = self._announced, []
        for key, wake in announced:
            self.notifier.notify(key, wake=wake)

    @contextmanager
    def patience(self, seconds: float) -> Iterator[Connection]:
        """Wait at most ``seconds`` for a lock inside this block (``/healthz`` answers fast)."""
        self.busy_deadline = seconds
        try:
            yield self
        finally:
            del self.busy_deadline          # back to the class default

    def notify(self, key: str, *, wake: int | None = None) -> None:
        """Wake the waiters of ``key`` once this connection's transaction commits (at once outside one)."""
        if self.in_transaction:
            self._announced.append((key, wake))
        else:
            self.notifier.notify(key, wake=wake)


class Storage:
    """A database engine: where jobs, chunks and agents live, and the notifier their writes wake."""

    name = "abstract"
    migrations_dir: Path = MIGRATIONS_ROOT

    def __init__(self, url: str, notifier: Notifier | None = None, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.notifier = notifier if notifier is not None else Notifier()
        self.pool_size = pool_size
        self.health = StorageHealth(self.name)
        self._idle: list[Connection] = []
        self._lent = 0
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)

    def connect(self) -> Connection:
        """A new connection of the caller's own (the sweeper's thread, the CLI); close it when done."""
        raise NotImplementedError

    def split_statements(self, sql: str) -> list[str]:
        """A migration file's statements, one per item."""
        raise NotImplementedError

    def check(self) -> None:
        """Open one connection now: StorageError (saying where and why) when the database cannot be reached."""
        self.connect().close()

    def probe_write(self, conn: Connection) -> None:
        """Write one row and commit: StorageBusy (locked) or StorageError (full, read-only...) if it cannot."""
        with conn.transaction():
            # A new value: SQLite writes no page for a value rewritten with itself.
            conn.execute("UPDATE health_probe SET probed_at = ? WHERE id = 1", (time.time(),))
        self.health.wrote()

    def start_listening(self, give_up_after: float) -> None:
        """Start hearing other processes' writes (engines shared between processes); nothing to do here."""

    def lock_migrations(self, conn: Connection) -> None:
        """Hold off other processes' migrations until this transaction ends (SQLite's BEGIN IMMEDIATE already
        takes the one write lock)."""

    def sweep_lock(self, conn: Connection) -> bool:
        """Whether this process may sweep now; engines shared between hosts let one sweeper in at a time."""
        return True

    def sweep_unlock(self, conn: Connection) -> None:
        """Let another process sweep."""

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled connection for a short piece of work outside a view (one read of a stream, a sweep)."""
        if has_app_context() and "db" in g:
            # A view already holds get_db()'s connection: borrowing a second one can deadlock a bounded
            # pool once every connection is held by a view waiting for its second.
            raise RuntimeError("this request already holds a connection: use get_db(), or close_db() first")
        conn = self.take()
        try:
            yield conn
        finally:
            self.give_back(conn)

    def take(self) -> Connection:
        """A pooled connection; waits up to ``POOL_TIMEOUT`` when all ``pool_size`` are lent (StorageError then)."""
        with self._lock:
            if not self._returned.wait_for(lambda: self._idle or self._lent < self.pool_size, POOL_TIMEOUT):
                raise StorageError(f"no free database connection within {POOL_TIMEOUT:g} s "
                                   f"(all {self.pool_size} in use)")
            self._lent += 1
            if self._idle:
                return self._idle.pop()
        try:
            return self.connect()
        except BaseException:
            with self._lock:
                self._lent -= 1
                self._returned.notify()
            raise

    def give_back(self, conn: Connection) -> None:
        try:
            if conn.in_transaction:
                # Never hand a half-done transaction to the next borrower.
                conn._rollback()
        except StorageError:
            conn.close()
            conn = None
        with self._lock:
            self._lent -= 1
            if conn is not None:
                self._idle.append(conn)
            self._returned.notify()

    @property
    def idle(self) -> list[Connection]:
        """The pooled connections nobody holds (tests check nothing is left in a transaction)."""
        with self._lock:
            return list(self._idle)

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
