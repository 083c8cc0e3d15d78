"""Migrations: applied once and in order, re-runs are no-ops, a newer database is refused."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from server import create_app
from server.storage import StorageError, open_storage
from server.storage.migrations import MigrationError, applied, available, migrate


@pytest.fixture
def store(tmp_path):
    storage = open_storage(str(tmp_path / "m.db"))
    yield storage
    storage.close()


def tables(store) -> set[str]:
    with store.connection() as conn:
        return set(conn.db.table_names())


def test_fresh_database_gets_every_migration_in_order(store):
    names = migrate(store)
    assert names == [m.name for m in available(store.migrations_dir)]
    assert applied(store) == names
    assert {"agents", "jobs", "chunks"} <= tables(store)


def test_second_run_is_a_no_op(store):
    migrate(store)
    assert migrate(store) == []


def test_migrations_apply_in_number_order(store, tmp_path):
    folder = tmp_path / "migs"
    folder.mkdir()
    (folder / "0002_add_column.sql").write_text("ALTER TABLE things ADD COLUMN colour TEXT;\n")
    (folder / "0001_things.sql").write_text("CREATE TABLE things (id INTEGER PRIMARY KEY);\n")
    assert migrate(store, folder) == ["0001_things.sql", "0002_add_column.sql"]
    with store.connection() as conn:
        assert "colour" in conn.db["things"].columns_dict


def test_failed_migration_leaves_neither_schema_nor_record(store, tmp_path):
    folder = tmp_path / "migs"
    folder.mkdir()
    (folder / "0001_ok.sql").write_text("CREATE TABLE a (id INTEGER);\n")
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (id INTEGER);\nTHIS IS NOT SQL;\n")
    with pytest.raises(StorageError):
        migrate(store, folder)
    assert applied(store) == ["0001_ok.sql"]
    assert "b" not in tables(store)


def test_a_database_from_before_the_job_rename_keeps_its_rows(store):
    first = available(store.migrations_dir)[0]
    with store.connection() as conn, conn.transaction():
        for statement in store.split_statements(first.sql):
            conn.execute(statement)
        conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        conn.execute("INSERT INTO migrations VALUES (?, 0)", (first.name,))
        conn.execute("INSERT INTO requests (id, model, messages, created_at) VALUES ('r1', 'm', '[]', 1)")
        conn.execute("INSERT INTO chunks (request_id, seq, text, created_at) VALUES ('r1', 0, 'hi', 1)")
    assert migrate(store) == [migration.name for migration in available(store.migrations_dir)[1:]]
    with store.connection() as conn:
        assert conn.execute("SELECT id, model FROM jobs").fetchall() == [("r1", "m")]
        assert conn.execute("SELECT job_id, text FROM chunks").fetchall() == [("r1", "hi")]
        assert "requests" not in conn.db.table_names()


def _record_future_migration(store) -> None:
    migrate(store)
    with store.connection() as conn:
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future.sql', 0)")


def test_database_with_unknown_newer_migration_is_refused(store):
    _record_future_migration(store)
    with pytest.raises(MigrationError, match="9999_from_the_future.sql"):
        migrate(store)
    with pytest.raises(MigrationError, match="does not know"):
        create_app({"DATABASE": store.url, "SWEEP_INTERVAL": 0})


def test_cli_migrate_refuses_newer_database_with_a_clear_line(store):
    _record_future_migration(store)
    result = subprocess.run([sys.executable, "-m", "server", "migrate", "--db", store.url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "9999_from_the_future.sql" in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_migrations_have_the_same_unique_numbers_on_both_engines(store):
    from server.storage.base import MIGRATIONS_ROOT

    numbers = {engine: [m.number for m in available(MIGRATIONS_ROOT / engine)] for engine in ("sqlite", "postgres")}
    assert numbers["sqlite"] == numbers["postgres"]
    assert numbers["sqlite"] == sorted(set(numbers["sqlite"])) and numbers["sqlite"][0] == 1


def test_two_migrations_with_one_number_are_refused(tmp_path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="unique"):
        available(tmp_path)


def test_shipped_migrations_are_numbered_without_gaps(store):
    numbers = [m.number for m in available(store.migrations_dir)]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_processes_migrating_one_new_database_at_once_apply_each_migration_once(engine, tmp_path, request):
    # Several hosts (or gunicorn workers) starting together on a fresh database each migrate it at start.
    url = request.getfixturevalue("pg_cluster").create_database() if engine == "postgres" else str(tmp_path / "m.db")
    stores = [open_storage(url) for _ in range(6)]
    start, errors, applied_by = threading.Barrier(len(stores)), [], []

    def run(store) -> None:
        start.wait()
        try:
            applied_by.append(migrate(store))
        except Exception as exc:      # noqa: BLE001 - the failure is what this test reports
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for store in stores:
        store.close()
    assert errors == []
    names = [m.name for m in available(stores[0].migrations_dir)]
    assert sorted(name for applied in applied_by for name in applied) == names   # each once, by someone
