"""The admin CLI: orchestrator serve|migrate|agents add|list|remove (also python -m server)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULTS, ENV_PREFIX, ConfigError, check_workers, load_config
from .storage import POSTGRES_SCHEMES, StorageError, agents, migrated, migrations, open_storage

DESCRIPTION = """\
Run and administer the orchestrator: the server, its database and the agents allowed to serve.

  orchestrator migrate                 create the database, or bring it up to date
  orchestrator agents add NAME         register a GPU host's agent; prints its AGENT_ID and AGENT_SECRET once
  orchestrator serve                   run the server (gunicorn with one gevent worker)
  orchestrator agents list             agents, their state (online, left, offline, removed) and work done
"""
SETTINGS_HINT = (f"Every command reads the {ENV_PREFIX}* environment variables; python -m server.config lists them "
                 "with their defaults.")
DATABASE_HELP = (f"SQLite file or postgresql:// URL (default: ${ENV_PREFIX}DATABASE if set, else "
                 f"{DEFAULTS['DATABASE']}, relative to the current directory)")


class CliError(Exception):
    """A refusal the operator can act on; printed as one line, exit status 2."""


def _database(args: argparse.Namespace) -> tuple[str, str]:
    """The database to use and where that choice came from (for messages)."""
    if args.db:
        return args.db, "--db"
    if os.environ.get(ENV_PREFIX + "DATABASE"):
        return os.environ[ENV_PREFIX + "DATABASE"], f"{ENV_PREFIX}DATABASE"
    return DEFAULTS["DATABASE"], "the default"


def _existing_database(args: argparse.Namespace) -> str:
    """The database of a command that only reads or changes what is there: refused if the SQLite file is missing.

    A missing file would otherwise be created empty, and an empty listing hides that the path is wrong.
    PostgreSQL needs no check here: an unreachable server is one StorageError line with host, port and reason.
    """
    url, source = _database(args)
    if url.startswith(POSTGRES_SCHEMES) or url == ":memory:" or Path(url).exists():
        return url
    origin = f"from {source}" if Path(url).is_absolute() else f"{source} {url}, relative to this directory"
    raise CliError(f"no database at {Path(url).resolve()} ({origin}); create it with: orchestrator migrate "
                   f"--db {url}, or name an existing one with --db or {ENV_PREFIX}DATABASE")


def _created(url: str) -> bool:
    """Whether using ``url`` is about to create a new SQLite file."""
    return not url.startswith(POSTGRES_SCHEMES) and url != ":memory:" and not Path(url).exists()


def cmd_serve(args: argparse.Namespace) -> int:
    url, _ = _database(args)
    env = dict(os.environ, **{ENV_PREFIX + "DATABASE": url})
    if args.host or args.port:
        host, port = _bind_parts(env.get(ENV_PREFIX + "BIND") or DEFAULTS["BIND"])
        env[ENV_PREFIX + "BIND"] = f"{args.host or host}:{args.port or port}"
    # Fail here, with one clear line, not inside a worker.
    check_workers(load_config(environ=env))
    with migrated(url):
        pass
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:server.gunicorn_conf", "server.wsgi:app"]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _bind_parts(bind: str) -> tuple[str, str]:
    host, _, port = bind.rpartition(":")
    return (host or "127.0.0.1", port) if port.isdigit() else ("127.0.0.1", "8000")


def cmd_migrate(args: argparse.Namespace) -> int:
    url, _ = _database(args)
    store = open_storage(url)
    try:
        store.check()       # one line saying where and why, before a pool retries in the background
        applied = migrations.migrate(store)
    finally:
        store.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def cmd_agents_add(args: argparse.Namespace) -> int:
    url, _ = _database(args)
    if _created(url):
        print(f"orchestrator: creating a new database at {url}", file=sys.stderr)
    secret_key = load_config()["SECRET_KEY"]
    with migrated(url) as conn:
        creds = agents.add_agent(conn, args.name, secret_key=secret_key)
    if args.json:
        print(json.dumps({"id": creds.id, "secret": creds.secret}))
    else:
        print(f"AGENT_ID={creds.id}\nAGENT_SECRET={creds.secret}\n"
              "(the secret is shown only now: put both in the GPU host's agent environment)")
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    window = load_config()["AGENT_ONLINE_SECONDS"]
    with migrated(_existing_database(args)) as conn:
        rows = agents.list_agents(conn, time.time(), window)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'ID':22} {'NAME':16} {'STATE':8} {'LAST SEEN':19} {'JOBS':>6} {'TOKENS':>8}  MODELS")
    for a in rows:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["last_seen"])) if a["last_seen"] else "never"
        print(f"{a['id']:22} {a['name'][:16]:16} {a['state']:8} {seen:19} {a['jobs_done']:>6} "
              f"{a['tokens_streamed']:>8}  " + ",".join(a["models"]))
    return 0


def cmd_agents_remove(args: argparse.Namespace) -> int:
    with migrated(_existing_database(args)) as conn:
        removed = agents.remove_agent(conn, args.id)
    if removed:
        print(f"removed {args.id}: its requests get 401 from now on and its models are no longer offered")
        return 0
    print(f"no active agent {args.id}", file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    """The command line, every option with its help and default."""
    p = argparse.ArgumentParser(prog="orchestrator", description=DESCRIPTION, epilog=SETTINGS_HINT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH_OR_URL", help=DATABASE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str, func) -> argparse.ArgumentParser:
        cmd = parent.add_parser(name, parents=[common], help=text, description=text, epilog=SETTINGS_HINT)
        cmd.set_defaults(func=func)
        return cmd

    host, port = _bind_parts(DEFAULTS["BIND"])
    serve = command(sub, "serve", "run the server: gunicorn with one gevent worker, migrating the database first",
                    cmd_serve)
    serve.add_argument("--host", help=f"address to listen on (default: the host of ${ENV_PREFIX}BIND, else {host}; "
                       "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, help=f"port to listen on (default: the port of ${ENV_PREFIX}BIND, "
                       f"else {port})")
    command(sub, "migrate", "create the database, or apply the migrations it lacks", cmd_migrate)

    agents_p = sub.add_parser("agents", help="register, list and remove agents",
                              description="Register, list and remove the agents allowed to serve.")
    agents_sub = agents_p.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    add = command(agents_sub, "add", "register an agent; prints its id and secret, the secret only this once",
                  cmd_agents_add)
    add.add_argument("name", help="a name for people, e.g. the GPU host's name")
    add.add_argument("--json", action="store_true", help='print {"id": ..., "secret": ...} instead')
    lst = command(agents_sub, "list", "list agents with their state and work done (never their secrets); "
                  "refuses a database that does not exist", cmd_agents_list)
    lst.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    rm = command(agents_sub, "remove", "remove an agent at once: its requests get 401, its models are no longer "
                 "offered", cmd_agents_remove)
    rm.add_argument("id", help="the agent's id (agt_...), as orchestrator agents list shows it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, migrations.MigrationError, StorageError, ConfigError) as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
