"""The admin CLI, run as a subprocess the way an operator runs it."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from protocol.signing import derive_key
from server import create_app, keywrap
from server.config import ConfigError
from server.storage import agents, migrated


def orchestrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=60)


def test_agents_add_json_prints_id_and_secret_and_stores_only_the_key_that_verifies_it(tmp_path):
    db = str(tmp_path / "cli.db")
    result = orchestrator("agents", "add", "gpu-1", "--json", "--db", db)
    assert result.returncode == 0, result.stderr
    creds = json.loads(result.stdout)
    assert set(creds) == {"id", "secret"}
    assert creds["id"].startswith("agt_") and len(creds["secret"]) >= 32
    with migrated(db) as conn:
        assert conn.execute("SELECT name FROM agents WHERE id = ?", (creds["id"],)).fetchone() == ("gpu-1",)
        assert agents.signing_key(conn, creds["id"], "").key == derive_key(creds["secret"])
    assert not any(creds["secret"].encode() in path.read_bytes() for path in tmp_path.glob("cli.db*"))


def test_with_a_server_key_the_database_holds_neither_the_secret_nor_the_key(tmp_path):
    db, server_key = str(tmp_path / "cli.db"), "k" * 40
    result = subprocess.run([sys.executable, "-m", "server", "agents", "add", "gpu-1", "--json", "--db", db],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "ORCH_SECRET_KEY": server_key})
    creds = json.loads(result.stdout)
    key = derive_key(creds["secret"])
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("cli.db*"))
    assert creds["secret"].encode() not in stored
    assert base64.urlsafe_b64encode(key).rstrip(b"=") not in stored and key not in stored
    with migrated(db) as conn:
        assert agents.signing_key(conn, creds["id"], server_key).key == key
        with pytest.raises(keywrap.KeyWrapError, match="ORCH_SECRET_KEY"):
            agents.signing_key(conn, creds["id"], "another-key")
    with pytest.raises(ConfigError, match="ORCH_SECRET_KEY"):
        create_app({"DATABASE": db, "SWEEP_INTERVAL": 0, "SECRET_KEY": ""})


def test_agents_list_never_prints_secrets(tmp_path):
    db = str(tmp_path / "cli.db")
    creds = json.loads(orchestrator("agents", "add", "gpu-1", "--json", "--db", db).stdout)
    for extra in ([], ["--json"]):
        listing = orchestrator("agents", "list", "--db", db, *extra)
        assert listing.returncode == 0
        assert creds["id"] in listing.stdout
        assert creds["secret"] not in listing.stdout


def test_agents_remove_marks_the_agent_removed(tmp_path):
    db = str(tmp_path / "cli.db")
    creds = json.loads(orchestrator("agents", "add", "gpu-1", "--json", "--db", db).stdout)
    assert orchestrator("agents", "remove", creds["id"], "--db", db).returncode == 0
    assert json.loads(orchestrator("agents", "list", "--json", "--db", db).stdout)[0]["removed_at"]
    second = orchestrator("agents", "remove", creds["id"], "--db", db)
    assert second.returncode == 1 and "no active agent" in second.stderr


def test_migrate_reports_up_to_date_on_second_run(tmp_path):
    db = str(tmp_path / "cli.db")
    assert "applied: 0001_initial.sql, 0002_jobs.sql" in orchestrator("migrate", "--db", db).stdout
    assert "up to date" in orchestrator("migrate", "--db", db).stdout
