"""Numbered plain-SQL migrations per engine (``migrations/<engine>/NNNN_name.sql``), each applied
with its record in one transaction; a database ahead of the code is refused."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .base import Connection, Storage

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# DOUBLE PRECISION, not REAL: in PostgreSQL REAL is 4 bytes; SQLite reads either as REAL.
_RECORD_TABLE = "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"


class MigrationError(RuntimeError):
    """The database and the code disagree about the schema."""


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


def available(directory: Path) -> list[Migration]:
    """The migrations shipped with the code, in order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"badly named migration file: {path.name} (want NNNN_name.sql)")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 1..N without gaps, found {numbers}")
    return found


def applied(storage: Storage) -> list[str]:
    """Names of the migrations recorded in the database."""
    with storage.connection() as conn:
        return _applied(conn)


def _applied(conn: Connection) -> list[str]:
    conn.execute(_RECORD_TABLE)
    return [row[0] for row in conn.execute("SELECT name FROM migrations ORDER BY name").fetchall()]


def pending(storage: Storage, directory: Path | None = None, *, conn: Connection | None = None) -> list[Migration]:
    """Migrations still to apply; refuses a database that is ahead of the code.

    ``conn``: a connection the caller already holds (a view's), so it does not borrow a second one.
    """
    if conn is not None:
        return _pending(storage, conn, directory)
    with storage.connection() as borrowed:
        return _pending(storage, borrowed, directory)


def _pending(storage: Storage, conn: Connection, directory: Path | None) -> list[Migration]:
    known = available(directory or storage.migrations_dir)
    done = _applied(conn)
    unknown = sorted(set(done) - {m.name for m in known})
    if unknown:
        raise MigrationError(
            f"the database has migration(s) this code does not know: {', '.join(unknown)}; "
            "it was written by a newer version: upgrade the code, or use another --db")
    return [m for m in known if m.name not in done]


def migrate(storage: Storage, directory: Path | None = None) -> list[str]:
    """Apply pending migrations in order; returns the names applied here (empty if current).

    Safe when several processes start on one new database at once (hosts, gunicorn workers): each
    migration is applied under the engine's lock, after checking again that no other process applied it.
    """
    names = []
    with storage.connection() as conn:
        with conn.transaction():
            storage.lock_migrations(conn)
            conn.execute(_RECORD_TABLE)
        for migration in _pending(storage, conn, directory):
            statements = storage.split_statements(migration.sql)
            with conn.transaction():
                storage.lock_migrations(conn)
                if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (migration.name,)).fetchone():
                    continue            # another process applied it while we waited
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                             (migration.name, time.time()))
            log.info("applied migration %s", migration.name)
            names.append(migration.name)
    return names
