"""SQLite through sqlite-utils: one file, WAL, short transactions.

Under gevent every SQLite call blocks every greenlet in the process, so
callers keep statements few and small and never hold a transaction across
a wait, a ``yield`` or network I/O.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from flask import Flask, current_app, g

BUSY_TIMEOUT_MS = 5000


def connect(path: str) -> sqlite_utils.Database:
    """Open the database file with the pragmas the server relies on."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no implicit
    # transaction is ever left open by the sqlite3 module.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return sqlite_utils.Database(conn)


@contextmanager
def transaction(db: sqlite_utils.Database, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """One short write transaction; rolled back if the block raises."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# Idle connections kept per app. Opening one costs ~0.5 ms here (schema
# parse, pragmas): a fifth of an agent POST, so requests borrow from a pool.
POOL_SIZE = 16


@contextmanager
def borrow(app: Flask) -> Iterator[sqlite_utils.Database]:
    """A pooled connection for a short piece of work outside a request (streams, sweeps)."""
    db = _take(app)
    try:
        yield db
    finally:
        _give_back(app, db)


def get_db() -> sqlite_utils.Database:
    """The request's connection, borrowed from the pool on first use."""
    if "db" not in g:
        g.db = _take(current_app)
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    """Give the request's connection back (also called before a long poll parks)."""
    db = g.pop("db", None)
    if db is not None:
        _give_back(current_app, db)


def _take(app: Flask) -> sqlite_utils.Database:
    try:
        return app.extensions.setdefault("db.pool", []).pop()
    except IndexError:
        return connect(app.config["DATABASE"])


def _give_back(app: Flask, db: sqlite_utils.Database) -> None:
    if db.conn.in_transaction:
        # Never hand a half-done transaction to the next borrower.
        db.conn.execute("ROLLBACK")
    pool = app.extensions.setdefault("db.pool", [])
    if len(pool) < POOL_SIZE:
        pool.append(db)
    else:
        db.conn.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_db)
