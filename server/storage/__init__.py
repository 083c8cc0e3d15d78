"""Where jobs, chunks and agents are kept, and how their writes wake the streams waiting on them.

``open_storage(url)`` picks the engine: SQLite, the embedded default, or
PostgreSQL for many workers and hosts.  A
view takes its connection with ``get_db()`` (borrowed from the pool on first
use, given back at teardown, as in Flask's tutorial); code outside a request
(streams, the sweeper) borrows with ``get_storage(app).connection()``.  The
SQL lives in the modules beside this one, each named for what it keeps:
``jobs`` (the queue and a job's life), ``chunks`` (answers), ``leases`` (what
the sweeper expires), ``agents`` and ``stats`` (operators' figures).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app, g

from ..notifier import Notifier
from .base import POOL_SIZE, Connection, Storage, StorageError
from .migrations import migrate
from .sqlite import SQLiteStorage

__all__ = ["Connection", "Storage", "StorageError", "close_db", "get_db", "get_storage", "init_app", "open_storage",
           "migrated"]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_storage(url: str, notifier: Notifier | None = None, pool_size: int = POOL_SIZE) -> Storage:
    """The engine for ``url``: PostgreSQL for a ``postgresql://`` URL, else the SQLite file at that path.

    Nothing is opened until first use.
    """
    if url.startswith(POSTGRES_SCHEMES):
        # Imported here: psycopg is needed only by deployments that use it.
        from .postgres import PostgresStorage

        return PostgresStorage(url, notifier, pool_size)
    return SQLiteStorage(url, notifier, pool_size)


@contextmanager
def migrated(url: str) -> Iterator[Connection]:
    """A connection to the database at ``url``, migrated first; everything closed on exit (CLI, tools, tests)."""
    store = open_storage(url)
    try:
        store.check()           # one line naming where and why, before any pool retries in the background
        migrate(store)
        with store.connection() as conn:
            yield conn
    finally:
        store.close()


def init_app(app: Flask, storage: Storage) -> None:
    app.extensions["storage"] = storage
    app.teardown_appcontext(close_db)


def get_storage(app: Flask | None = None) -> Storage:
    """The app's storage (``current_app``'s when no app is given)."""
    return (app or current_app).extensions["storage"]


def get_db() -> Connection:
    """The request's connection, borrowed from the pool on first use."""
    if "db" not in g:
        g.db = get_storage().take()
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    """Give the request's connection back (also called before a long poll parks)."""
    conn = g.pop("db", None)
    if conn is not None:
        get_storage().give_back(conn)
