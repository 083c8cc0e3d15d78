"""The embedded engine: one SQLite file through sqlite-utils, WAL, short transactions.

Under gevent every SQLite call blocks every greenlet in the process, so
callers keep statements few and small and never hold a transaction across a
wait, a ``yield`` or network I/O.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from ..notifier import Notifier
from .base import MIGRATIONS_ROOT, POOL_SIZE, Connection, Storage, StorageError

BUSY_TIMEOUT_MS = 5000
PRIVATE_MODE = 0o600
PRAGMAS = (f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}", "PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL",
           "PRAGMA foreign_keys = ON")


class SQLiteConnection(Connection):
    """A sqlite3 connection in autocommit mode: ``transaction()`` issues BEGIN IMMEDIATE / COMMIT itself."""

    def __init__(self, db: sqlite_utils.Database, notifier: Notifier) -> None:
        super().__init__(notifier)
        self.db = db            # sqlite-utils, for introspection (tables, columns) in the CLI and tests
        self.raw = db.conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.raw.execute(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite: {exc}") from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self.raw.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite: {exc}") from exc

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
            raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                  timeout=BUSY_TIMEOUT_MS / 1000)
            for pragma in PRAGMAS:
                raw.execute(pragma)
        except sqlite3.Error as exc:
            if raw is not None:
                raw.close()
            raise StorageError(f"cannot open the SQLite database {self.path}: {exc}") from exc
        return SQLiteConnection(sqlite_utils.Database(raw), self.notifier)

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
