"""The admin CLI, run as a subprocess the way an operator runs it."""
from __future__ import annotations

import json
import subprocess
import sys

from server.storage import migrated
from server.storage.base import MIGRATIONS_ROOT
from server.storage.migrations import available


def orchestrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=60)


def test_agents_add_json_prints_id_and_secret(tmp_path):
    db = str(tmp_path / "cli.db")
    result = orchestrator("agents", "add", "gpu-1", "--json", "--db", db)
    assert result.returncode == 0, result.stderr
    creds = json.loads(result.stdout)
    assert set(creds) == {"id", "secret"}
    assert creds["id"].startswith("agt_") and len(creds["secret"]) >= 32
    with migrated(db) as conn:
        row = conn.execute("SELECT name, secret FROM agents WHERE id = ?", (creds["id"],)).fetchone()
    assert row == ("gpu-1", creds["secret"])


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
    names = ", ".join(m.name for m in available(MIGRATIONS_ROOT / "sqlite"))
    assert orchestrator("migrate", "--db", db).stdout.strip() == f"applied: {names}"
    assert "up to date" in orchestrator("migrate", "--db", db).stdout
