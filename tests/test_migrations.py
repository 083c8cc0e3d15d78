"""Migrations: applied once and in order, re-runs are no-ops, a newer database is refused."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from server import create_app
from server.db import connect
from server.migrations import MIGRATIONS_DIR, MigrationError, applied, available, migrate


def test_fresh_database_gets_every_migration_in_order(tmp_path):
    db = connect(str(tmp_path / "m.db"))
    names = migrate(db)
    assert names == [m.name for m in available()]
    assert applied(db) == names
    assert {"agents", "requests", "chunks"} <= set(db.table_names())


def test_second_run_is_a_no_op(tmp_path):
    db = connect(str(tmp_path / "m.db"))
    migrate(db)
    assert migrate(db) == []


def test_migrations_apply_in_number_order(tmp_path):
    folder = tmp_path / "migs"
    folder.mkdir()
    (folder / "0002_add_column.sql").write_text("ALTER TABLE things ADD COLUMN colour TEXT;\n")
    (folder / "0001_things.sql").write_text("CREATE TABLE things (id INTEGER PRIMARY KEY);\n")
    db = connect(str(tmp_path / "m.db"))
    assert migrate(db, folder) == ["0001_things.sql", "0002_add_column.sql"]
    assert "colour" in db["things"].columns_dict


def test_failed_migration_leaves_neither_schema_nor_record(tmp_path):
    folder = tmp_path / "migs"
    folder.mkdir()
    (folder / "0001_ok.sql").write_text("CREATE TABLE a (id INTEGER);\n")
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (id INTEGER);\nTHIS IS NOT SQL;\n")
    db = connect(str(tmp_path / "m.db"))
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, folder)
    assert applied(db) == ["0001_ok.sql"]
    assert "b" not in db.table_names()


def test_database_with_unknown_newer_migration_is_refused(tmp_path):
    path = str(tmp_path / "m.db")
    db = connect(path)
    migrate(db)
    db.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future.sql', 0)")
    with pytest.raises(MigrationError, match="9999_from_the_future.sql"):
        migrate(db)
    with pytest.raises(MigrationError, match="does not know"):
        create_app({"DATABASE": path, "SWEEP_INTERVAL": 0})


def test_cli_migrate_refuses_newer_database_with_a_clear_line(tmp_path):
    path = str(tmp_path / "m.db")
    db = connect(path)
    migrate(db)
    db.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future.sql', 0)")
    result = subprocess.run([sys.executable, "-m", "server", "migrate", "--db", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "9999_from_the_future.sql" in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_migrations_are_numbered_without_gaps():
    numbers = [m.number for m in available(MIGRATIONS_DIR)]
    assert numbers == list(range(1, len(numbers) + 1))
