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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import g, has_app_context

from ..errors import ApiError
from ..notifier import Notifier

# Idle connections kept per storage.  Opening a SQLite one costs ~0.5 ms here
# (schema parse, pragmas): a fifth of an agent POST, so requests borrow.
POOL_SIZE = 16
MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent.parent / "migrations"


class StorageError(ApiError):
    """The database failed (locked, unreachable, full, corrupt): the server's trouble, not the client's.

    Rendered as a 503 ``storage_unavailable`` (agents retry it); ``str()`` is the engine's own reason, for
    logs and the CLI, never sent to clients.
    """

    status, code = 503, "storage_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__("the server's database is unavailable: retry shortly")
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class Connection:
    """One database connection: portable SQL, transactions, and wake-ups announced on commit."""

    # Appended to a SELECT whose rows the same transaction then updates, by engines with row locks: SQLite's
    # BEGIN IMMEDIATE already serializes every writer, PostgreSQL's READ COMMITTED would lose updates.
    for_update = ""          # the row is ours until COMMIT (a chunk POST, a cancel)
    skip_locked = ""         # rows another transaction holds are passed over (a claim, a sweep)

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
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
        self._commit()
        announced, self._announced = self._announced, []
        for key, wake in announced:
            self.notifier.notify(key, wake=wake)

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
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def connect(self) -> Connection:
        """A new connection of the caller's own (the sweeper's thread, the CLI); close it when done."""
        raise NotImplementedError

    def split_statements(self, sql: str) -> list[str]:
        """A migration file's statements, one per item."""
        raise NotImplementedError

    def check(self) -> None:
        """Open one connection now: StorageError (saying where and why) when the database cannot be reached."""
        self.connect().close()

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
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.connect()

    def give_back(self, conn: Connection) -> None:
        if conn.in_transaction:
            # Never hand a half-done transaction to the next borrower.
            conn._rollback()
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

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
