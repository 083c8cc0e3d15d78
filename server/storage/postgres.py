"""The scale-out engine: PostgreSQL through psycopg 3 and psycopg_pool, wake-ups over LISTEN/NOTIFY.

A write announces its notifier keys with ``pg_notify`` inside its own
transaction, so every worker on every host hears of it exactly when the
write becomes visible (PostgreSQL delivers a notification only at COMMIT).
Each process holds one listening connection (``Listener``) that feeds the
keys into its in-process ``Notifier``: streams and parked long polls wait
exactly as on SQLite, with no periodic query.  The writing process wakes its
own waiters at once after the commit and ignores its own notifications when
they come back, so a wake-up costs no round trip locally and is never
delivered twice.

Under gevent, psycopg (3.1.14 and later) waits cooperatively: a slow query
blocks only its own greenlet.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg import pq, sql

from ..notifier import Notifier
from .base import MIGRATIONS_ROOT, POOL_SIZE, Connection, Storage, StorageError
from .health import StorageHealth

log = logging.getLogger(__name__)

CHANNEL = "orchestrator"
# How long a request waits for a pooled connection before the database counts as unavailable.
POOL_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5
LISTENER_BACKOFF_CAP = 5.0
# TCP keepalives notice a listener's server that vanished without closing (no query needed to find out).
LISTENER_OPTIONS = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 10,
                    "keepalives_interval": 5, "keepalives_count": 3}
# The sweeper's advisory lock: one sweep at a time across every host (an arbitrary 64-bit constant).
SWEEP_LOCK = 0x6F7263686573  # "orches"
# Migrations' advisory lock: hosts and workers starting together on a new database migrate one at a time.
MIGRATION_LOCK = 0x6D6967726174  # "migrat"
_PLACEHOLDER = re.compile(r"\?")


def _translate(sql: str) -> str:
    """The portable SQL's ``?`` placeholders in psycopg's ``%s`` style (a literal ``%`` doubled)."""
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))


def _unavailable(exc: Exception, health: StorageHealth | None = None) -> StorageError:
    """A StorageError for ``exc``; the connection lost, the disk full and the like mark ``health`` failing."""
    # libpq's messages run over several lines (a hint on the second): one line, for logs and the CLI.
    reason = "PostgreSQL: " + " ".join(str(exc).split())
    # SQLSTATE class 40 (a deadlock, a serialization failure) is one transaction losing a race, not the
    # database failing: streams must not end with storage_unavailable for it.
    lost_a_race = (getattr(exc, "sqlstate", None) or "").startswith("40")
    if health is not None and isinstance(exc, psycopg.OperationalError) and not lost_a_race:
        health.failed(reason)
    return StorageError(reason)


class PostgresConnection(Connection):
    """A pooled psycopg connection in autocommit mode: ``transaction()`` issues BEGIN / COMMIT itself."""

    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, raw: psycopg.Connection, notifier: Notifier, origin: str,
                 health: StorageHealth | None = None) -> None:
        super().__init__(notifier, health)
        self.raw = raw
        self.origin = origin
        self._sql: dict[str, str] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        translated = self._sql.get(sql)
        if translated is None:
            translated = self._sql[sql] = _translate(sql)
        try:
            return self.raw.execute(translated, params)
        except psycopg.Error as exc:
            raise _unavailable(exc, self.health) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            with self.raw.cursor() as cursor:
                cursor.executemany(_translate(sql), rows)
        except psycopg.Error as exc:
            raise _unavailable(exc, self.health) from exc

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()

    def notify(self, key: str, *, wake: int | None = None) -> None:
        # Other processes hear it at COMMIT; this one is woken by the base class after the commit.
        if not self.in_transaction:
            self.execute("SELECT pg_notify(?, ?)", (CHANNEL, self._payload(key, wake)))
        super().notify(key, wake=wake)

    def _payload(self, key: str, wake: int | None) -> str:
        return f"{self.origin} {wake or 0} {key}"

    def _begin(self) -> None:
        self.execute("BEGIN")

    def _commit(self) -> None:
        if not self._announced:
            self.execute("COMMIT")
            return
        # The transaction's wake-ups go with its COMMIT, in one round trip: a multi-statement query (simple
        # protocol) takes no parameters, so the payloads (a key may hold a client's model name) are quoted
        # by psycopg.  One round trip less per write: 3-5% less wall time and PostgreSQL CPU per chunk POST.
        notifies = ", ".join(sql.SQL("pg_notify({}, {})").format(sql.Literal(CHANNEL),
                                                                   sql.Literal(self._payload(key, wake)))
                             .as_string(self.raw) for key, wake in self._announced)
        try:
            self.raw.execute(f"SELECT {notifies}; COMMIT")
        except psycopg.Error as exc:
            self._rollback()          # a failed SELECT leaves the transaction open (aborted): end it
            raise _unavailable(exc, self.health) from exc

    def _rollback(self) -> None:
        if self.in_transaction:
            try:
                self.raw.execute("ROLLBACK")
            except psycopg.Error:
                log.debug("rollback failed; the pool drops the connection")


class PostgresStorage(Storage):
    """A PostgreSQL database by URL; connections from a psycopg_pool, wake-ups from a ``Listener``."""

    name = "postgres"
    migrations_dir = MIGRATIONS_ROOT / "postgres"

    def __init__(self, url: str, notifier: Notifier | None = None, pool_size: int = POOL_SIZE) -> None:
        super().__init__(url, notifier, pool_size)
        # Tells this process's notifications apart from other processes' when they come back.
        self.origin = uuid.uuid4().hex[:12]
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self.listener: Listener | None = None

    # --- connections -------------------------------------------------------------
    def connect(self) -> PostgresConnection:
        try:
            raw = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as exc:
            raise _unavailable(exc, self.health) from exc
        return PostgresConnection(raw, self.notifier, self.origin, self.health)

    def check(self) -> None:
        # At start: the caller says what failed (one line); the health tracker is for a running server.
        try:
            psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT).close()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def take(self) -> PostgresConnection:
        try:
            raw = self.pool().getconn(timeout=POOL_TIMEOUT)
        except psycopg_pool.PoolTimeout as exc:
            raise StorageError(f"PostgreSQL: no connection within {POOL_TIMEOUT:g} s ({self._describe()})") from exc
        except psycopg.Error as exc:
            raise _unavailable(exc, self.health) from exc
        return PostgresConnection(raw, self.notifier, self.origin, self.health)

    def give_back(self, conn: Connection) -> None:
        assert isinstance(conn, PostgresConnection)
        conn._rollback()
        if self._pool is not None:
            self._pool.putconn(conn.raw)        # the pool discards a broken connection itself
        else:
            conn.close()

    @property
    def idle(self) -> list[Connection]:
        return []     # psycopg_pool keeps its own idle connections

    def pool(self) -> psycopg_pool.ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=False, timeout=POOL_TIMEOUT,
                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                    name=f"orchestrator-{self.origin}")
                self._pool.open(wait=False)
            return self._pool

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5)

    def split_statements(self, sql: str) -> list[str]:
        # psycopg runs a whole script without parameters in one call: no splitting needed.
        return [sql]

    def lock_migrations(self, conn: Connection) -> None:
        # Even CREATE TABLE IF NOT EXISTS fails when two sessions run it at once (a duplicate pg_type row).
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    def sweep_lock(self, conn: Connection) -> bool:
        """Take the sweeper's advisory lock if no other process holds it (release with ``sweep_unlock``)."""
        return bool(conn.execute("SELECT pg_try_advisory_lock(?)", (SWEEP_LOCK,)).fetchone()[0])

    def sweep_unlock(self, conn: Connection) -> None:
        conn.execute("SELECT pg_advisory_unlock(?)", (SWEEP_LOCK,))

    def start_listening(self, give_up_after: float) -> None:
        """Feed other processes' notifications into this process's notifier (one connection, one thread)."""
        if self.listener is None:
            self.listener = Listener(self, give_up_after)
            self.listener.start()

    def _describe(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"host {info.get('host', 'localhost')}, port {info.get('port', 5432)}"


class Listener:
    """LISTEN on one connection and fan each key into the notifier; reconnect, then wake every waiter.

    While the connection is lost no wake-up can arrive: after a reconnect
    every waiter re-reads once, so nothing sent meanwhile is missed.  If the
    database stays away longer than ``give_up_after`` seconds, every waiter
    is woken too: its read fails and its stream ends with an error instead
    of hanging on keepalives.
    """

    def __init__(self, storage: PostgresStorage, give_up_after: float) -> None:
        self.storage = storage
        self.give_up_after = give_up_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchestrator-listener", daemon=True)
        self._conn: psycopg.Connection | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.cancel_safe(timeout=1)
            except (psycopg.Error, AttributeError):
                pass

    def _run(self) -> None:
        attempt, lost_at, gave_up = 0, None, False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.storage.url, autocommit=True, **LISTENER_OPTIONS) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    if lost_at is not None:
                        log.info("listener back after %.1f s without PostgreSQL; every waiter re-reads once",
                                 time.monotonic() - lost_at)
                        self.storage.notifier.wake_all()
                    attempt, lost_at, gave_up = 0, None, False
                    self._listen(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                if self._stop.is_set():
                    return
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("listener lost PostgreSQL (%s); reconnecting", str(exc).strip())
                if not gave_up and time.monotonic() - lost_at > self.give_up_after:
                    gave_up = True
                    log.error("PostgreSQL away for over %g s: waking every stream so it ends with an error",
                              self.give_up_after)
                    self.storage.notifier.wake_all()
                self._stop.wait(min(LISTENER_BACKOFF_CAP, 0.1 * 2 ** min(attempt, 6)))
                attempt += 1
            finally:
                self._conn = None

    def _listen(self, conn: psycopg.Connection) -> None:
        notifier, origin = self.storage.notifier, self.storage.origin
        while not self._stop.is_set():
            # The timeout only lets stop() be noticed; a dropped connection raises at once.
            for note in conn.notifies(timeout=1.0):
                sender, wake, key = note.payload.split(" ", 2)
                if sender != origin:
                    notifier.notify(key, wake=int(wake) or None)
