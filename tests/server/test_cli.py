"""The admin CLI, run as a subprocess the way an operator runs it."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from devtools.processes import ROOT, free_port
from protocol.signing import derive_key
from server import cli, create_app, keywrap
from server.config import ConfigError
from server.storage import agents, migrated
from server.storage.base import MIGRATIONS_ROOT
from server.storage.migrations import available


def orchestrator(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)


def without_database_setting() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ORCH_DATABASE"} | {"PYTHONPATH": str(ROOT)}


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
    listed = json.loads(orchestrator("agents", "list", "--json", "--db", db).stdout)[0]
    assert listed["removed_at"] and listed["state"] == "removed"
    second = orchestrator("agents", "remove", creds["id"], "--db", db)
    assert second.returncode == 1 and "no active agent" in second.stderr


def test_agents_list_shows_each_agents_state(tmp_path):
    db = str(tmp_path / "cli.db")
    kept, gone = (json.loads(orchestrator("agents", "add", name, "--json", "--db", db).stdout)["id"]
                  for name in ("never-seen", "revoked"))
    orchestrator("agents", "remove", gone, "--db", db)
    table = orchestrator("agents", "list", "--db", db).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "STATE"]
    rows = {line.split()[0]: line.split()[2] for line in table[1:]}
    assert rows == {kept: "offline", gone: "removed"}


def test_migrate_reports_up_to_date_on_second_run(tmp_path):
    db = str(tmp_path / "cli.db")
    names = ", ".join(m.name for m in available(MIGRATIONS_ROOT / "sqlite"))
    assert orchestrator("migrate", "--db", db).stdout.strip() == f"applied: {names}"
    assert "up to date" in orchestrator("migrate", "--db", db).stdout


# --- a database that does not exist ------------------------------------------

@pytest.mark.parametrize("command", [["agents", "list"], ["agents", "list", "--json"], ["agents", "remove", "agt_1"]])
def test_commands_on_existing_agents_refuse_a_missing_default_database_and_create_nothing(tmp_path, command):
    result = orchestrator(*command, cwd=tmp_path, env=without_database_setting())
    assert result.returncode == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(tmp_path / "var" / "orchestrator.db") in line            # where it looked, in full
    assert "orchestrator migrate --db var/orchestrator.db" in line      # how to create it
    assert list(tmp_path.iterdir()) == []                               # no var/, no empty database


def test_a_missing_database_named_by_db_or_orch_database_is_refused_by_name(tmp_path):
    missing = tmp_path / "typo" / "orchestrator.db"
    by_flag = orchestrator("agents", "list", "--db", str(missing))
    by_env = orchestrator("agents", "list", env=without_database_setting() | {"ORCH_DATABASE": str(missing)})
    assert (by_flag.returncode, by_env.returncode) == (2, 2)
    assert f"no database at {missing} (from --db)" in by_flag.stderr
    assert f"no database at {missing} (from ORCH_DATABASE)" in by_env.stderr
    assert not missing.parent.exists()


def test_agents_add_on_a_new_database_says_it_creates_one(tmp_path):
    result = orchestrator("agents", "add", "gpu-1", "--db", str(tmp_path / "new.db"))
    assert result.returncode == 0
    assert f"creating a new database at {tmp_path / 'new.db'}" in result.stderr
    assert result.stdout.startswith("AGENT_ID=agt_") and "\nAGENT_SECRET=" in result.stdout


# --- help ---------------------------------------------------------------------

HELP_PAGES = [[], ["serve"], ["migrate"], ["agents"], ["agents", "add"], ["agents", "list"], ["agents", "remove"]]


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda c: " ".join(c) or "orchestrator")
def test_every_help_page_is_plain_text(command):
    result = orchestrator(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: orchestrator")
    assert "`" not in result.stdout, "reStructuredText or Markdown quotes in --help"


def test_help_points_to_the_settings_and_serve_names_its_defaults():
    assert "python -m server.config" in orchestrator("--help").stdout
    serve = " ".join(orchestrator("serve", "--help").stdout.split())   # argparse wraps lines
    assert "--host HOST address to listen on (default: the host of $ORCH_BIND, else 127.0.0.1" in serve
    assert "--port PORT port to listen on (default: the port of $ORCH_BIND, else 8000)" in serve
    assert "else var/orchestrator.db" in serve and "python -m server.config" in serve


def test_every_command_argument_and_option_has_help():
    def walk(parser):
        for action in parser._actions:
            yield parser.prog, action
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices[sub], type(parser)):
                    yield from walk(action.choices[sub])

    undocumented = [(prog, action.dest) for prog, action in walk(cli.parser())
                    if not action.help and action.dest not in ("command", "agents_command")]
    assert undocumented == []


# --- serve's address ------------------------------------------------------------

class Exec(Exception):
    """Raised instead of replacing the test process with gunicorn."""


@pytest.mark.parametrize(("argv", "bind"), [([], "0.0.0.0:9000"), (["--port", "9001"], "0.0.0.0:9001"),
                                            (["--host", "127.0.0.2"], "127.0.0.2:9000")])
def test_serve_keeps_orch_bind_unless_host_or_port_are_given(tmp_path, monkeypatch, argv, bind):
    def execve(path, args, env):
        raise Exec(env)

    monkeypatch.setenv("ORCH_BIND", "0.0.0.0:9000")
    monkeypatch.setattr(cli.os, "execve", execve)
    with pytest.raises(Exec) as started:
        cli.main(["serve", "--db", str(tmp_path / "s.db"), *argv])
    assert started.value.args[0]["ORCH_BIND"] == bind


# --- PostgreSQL -------------------------------------------------------------------

def test_agents_add_and_list_work_on_postgresql(pg_cluster):
    url = pg_cluster.create_database()
    creds = json.loads(orchestrator("agents", "add", "gpu-1", "--json", "--db", url).stdout)
    listed = json.loads(orchestrator("agents", "list", "--json", "--db", url).stdout)
    assert [(a["id"], a["state"]) for a in listed] == [(creds["id"], "offline")]


@pytest.mark.parametrize("command", [["migrate"], ["agents", "list"], ["agents", "add", "gpu-1"]])
def test_an_unreachable_postgresql_is_one_line_with_host_port_and_reason(command):
    port = free_port()     # nothing listens there
    result = orchestrator(*command, "--db", f"postgresql://nobody@127.0.0.1:{port}/orchestrator")
    assert result.returncode == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("orchestrator: PostgreSQL: ")
    assert "127.0.0.1" in line and str(port) in line and "refused" in line.lower()
