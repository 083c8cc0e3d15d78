"""The embedded engine: one SQLite file through sqlite-utils, WAL, short transactions.

Under gevent every SQLite call blocks every greenlet in the process, so
callers keep statements few and small and never hold a transaction across a
wait, a ``yield`` or network I/O; a locked database is waited for here,
cooperatively, never inside SQLite (see ``BUSY_DEADLINE``).
"""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from ..notifier import Notifier
from .base import (
    BUSY_DEADLINE,
    MIGRATIONS_ROOT,
    POOL_SIZE,
    Connection,
    Storage,
    StorageBusy,
    StorageError,
)
from .health import StorageHealth

T = TypeVar("T")

# SQLite's own busy handler sleeps inside C, which gevent cannot see: one locked write froze every
# stream, poll and /healthz of the worker.  So SQLite waits not at all (busy_timeout 0) and a locked
# statement is retried here, sleeping cooperatively (time.sleep is gevent's once patched) from 1 ms
# doubling to 50 ms, for at most BUSY_DEADLINE seconds; then StorageBusy (503, the agent retries).
BUSY_FIRST_PAUSE = 0.001
BUSY_MAX_PAUSE = 0.05
PRIVATE_MODE = 0o600
PRAGMAS = ("PRAGMA busy_timeout = 0", "PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL",
           "PRAGMA foreign_keys = ON")
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_busy(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _BUSY_CODES


def _cooperatively(run: Callable[[], T], health: StorageHealth, deadline: float = BUSY_DEADLINE,
                   failed: sqlite3.Error | None = None) -> T:
    """``run()`` (already failed with ``failed``, if given), retried with cooperative sleeps while the
    database is locked; StorageError (StorageBusy past ``deadline``) for any failure."""
    give_up, pause = time.monotonic() + deadline, BUSY_FIRST_PAUSE
    while True:
        if failed is None:
            try:
                return run()
            except sqlite3.Error as exc:
                failed = exc
        if not _is_busy(failed):
            if not isinstance(failed, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
                health.failed(f"SQLite: {failed}")      # full, I/O error, read-only, cannot open...
            raise StorageError(f"SQLite: {failed}") from failed
        if time.monotonic() >= give_up:
            health.busy(f"the database is locked by another connection or process ({failed})")
            raise StorageBusy(f"SQLite: {failed} (waited {deadline:g} s for the lock)") from failed
        failed = None
        time.sleep(pause)
        pause = min(pause * 2, BUSY_MAX_PAUSE)


class SQLiteConnection(Connection):
    """A sqlite3 connection in autocommit mode: ``transaction()`` issues BEGIN IMMEDIATE / COMMIT itself."""

    def __init__(self, db: sqlite_utils.Database, notifier: Notifier, health: StorageHealth | None = None) -> None:
        super().__init__(notifier, health)
        self.db = db            # sqlite-utils, for introspection (tables, columns) in the CLI and tests
        self.raw = db.conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        # The first try costs nothing more than before: the token path pays only when it fails.
        try:
            return self.raw.execute(sql, params)
        except sqlite3.Error as exc:
            failed = exc
        return _cooperatively(lambda: self.raw.execute(sql, params), self.health, self.busy_deadline, failed)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self.raw.executemany(sql, rows)
            return
        except sqlite3.Error as exc:
            failed = exc
        _cooperatively(lambda: self.raw.executemany(sql, rows), self.health, self.busy_deadline, failed)

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def close(self) -> None:
        self.raw.close()

    def _begin(self) -> None:
        # IMMEDIATE: take the write lock now, so two writers never deadlock upgrading a read.
        self.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self.execute("COMMIT")

    def _rollback(self) -> None:
        if self.raw.in_transaction:
            self.execute("ROLLBACK")


class SQLiteStorage(Storage):
    """A SQLite file (or ``:memory:``), opened with the pragmas the server relies on."""

    name = "sqlite"
    migrations_dir = MIGRATIONS_ROOT / "sqlite"

    def __init__(self, path: str, notifier: Notifier | None = None, pool_size: int = POOL_SIZE) -> None:
        super().__init__(path, notifier, pool_size)
        self.path = path
        self._private = False

    def _make_private(self) -> None:
        """Create the file 0600 before SQLite does (it would make it 0644), and tighten existing ones.

        The database holds prompts, answers and agents' keys; SQLite gives the -wal and -shm
        files the main file's mode, so they follow.
        """
        path = Path(self.path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_MODE))
            for existing in (path, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
                if existing.exists() and existing.stat().st_mode & 0o077:
                    existing.chmod(PRIVATE_MODE)
        except OSError as exc:
            raise StorageError(f"cannot create the SQLite database {self.path}: {exc}") from exc
        self._private = True

    def connect(self) -> SQLiteConnection:
        if self.path != ":memory:" and not self._private:
            self._make_private()
        raw = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no implicit
            # transaction is ever left open by the sqlite3 module.
            raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            for pragma in PRAGMAS:
                _cooperatively(lambda pragma=pragma: raw.execute(pragma), self.health)
        except (sqlite3.Error, StorageError) as exc:
            if raw is not None:
                raw.close()
            if isinstance(exc, StorageError):
                raise
            self.health.failed(f"cannot open {self.path}: {exc}")
            raise StorageError(f"cannot open the SQLite database {self.path}: {exc}") from exc
        return SQLiteConnection(sqlite_utils.Database(raw), self.notifier, self.health)

    def split_statements(self, sql: str) -> list[str]:
        # executescript() would COMMIT the migration's transaction; split on complete statements instead.
        statements, buffer = [], ""
        for line in sql.splitlines(keepends=True):
            buffer += line
            if sqlite3.complete_statement(buffer):
                statements.append(buffer)
                buffer = ""
        if buffer.strip():
            statements.append(buffer)
        return [s for s in statements if s.strip()]
