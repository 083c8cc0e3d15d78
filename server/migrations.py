"""Numbered plain-SQL migrations, each applied with its record in one transaction."""
from __future__ import annotations

import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from .db import transaction

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The database and the code disagree about the schema."""


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
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


def applied(db: sqlite_utils.Database) -> list[str]:
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    return [row[0] for row in db.execute("SELECT name FROM migrations ORDER BY name").fetchall()]


def pending(db: sqlite_utils.Database, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Migrations still to apply; refuses a database that is ahead of the code."""
    known = available(directory)
    done = applied(db)
    unknown = sorted(set(done) - {m.name for m in known})
    if unknown:
        raise MigrationError(
            f"the database has migration(s) this code does not know: {', '.join(unknown)}; "
            "it was written by a newer version: upgrade the code, or use another --db")
    return [m for m in known if m.name not in done]


def migrate(db: sqlite_utils.Database, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations in order; returns the names applied (empty if current)."""
    names = []
    for migration in pending(db, directory):
        statements = [s for s in _split(migration.sql) if s.strip()]
        with transaction(db) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (migration.name, time.time()))
        log.info("applied migration %s", migration.name)
        names.append(migration.name)
    return names


def _split(sql: str) -> list[str]:
    # executescript() would COMMIT our transaction; split on complete statements instead.
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer)
            buffer = ""
    if buffer.strip():
        statements.append(buffer)
    return statements
