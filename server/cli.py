"""The admin CLI: ``orchestrator serve|migrate|agents ...`` (also ``python -m server``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from .config import DEFAULTS, ENV_PREFIX, ConfigError, check_workers, load_config
from .storage import StorageError, agents, migrated, migrations, open_storage


def _db_path(args: argparse.Namespace) -> str:
    return args.db or os.environ.get(ENV_PREFIX + "DATABASE") or DEFAULTS["DATABASE"]


def cmd_serve(args: argparse.Namespace) -> int:
    env = dict(os.environ, **{ENV_PREFIX + "DATABASE": _db_path(args), ENV_PREFIX + "BIND": f"{args.host}:{args.port}"})
    # Fail here, with one clear line, not inside a worker.
    check_workers(load_config(environ=env))
    with migrated(_db_path(args)):
        pass
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:server.gunicorn_conf", "server.wsgi:app"]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def cmd_migrate(args: argparse.Namespace) -> int:
    store = open_storage(_db_path(args))
    try:
        applied = migrations.migrate(store)
    finally:
        store.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def cmd_agents_add(args: argparse.Namespace) -> int:
    secret_key = load_config()["SECRET_KEY"]
    with migrated(_db_path(args)) as conn:
        creds = agents.add_agent(conn, args.name, secret_key=secret_key)
    if args.json:
        print(json.dumps({"id": creds.id, "secret": creds.secret}))
    else:
        print(f"agent id:     {creds.id}\nagent secret: {creds.secret}\n"
              "(the secret is shown only now: set AGENT_ID and AGENT_SECRET on the GPU host)")
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    with migrated(_db_path(args)) as conn:
        rows = agents.list_agents(conn)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'ID':22} {'NAME':16} {'LAST SEEN':20} {'JOBS':>6} {'TOKENS':>8}  MODELS")
    for a in rows:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["last_seen"])) if a["last_seen"] else "never"
        if a["removed_at"]:
            seen = "removed"
        print(f"{a['id']:22} {a['name'][:16]:16} {seen:20} {a['jobs_done']:>6} {a['tokens_streamed']:>8}  "
              + ",".join(a["models"]))
    return 0


def cmd_agents_remove(args: argparse.Namespace) -> int:
    with migrated(_db_path(args)) as conn:
        removed = agents.remove_agent(conn, args.id)
    if removed:
        print(f"removed {args.id}")
        return 0
    print(f"no active agent {args.id}", file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", help=f"SQLite file (default: ${ENV_PREFIX}DATABASE or {DEFAULTS['DATABASE']})")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the server (gunicorn, gevent worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", parents=[common], help="apply pending migrations").set_defaults(func=cmd_migrate)
    agents_p = sub.add_parser("agents", help="manage agents").add_subparsers(dest="agents_command", required=True)
    add = agents_p.add_parser("add", parents=[common], help="register an agent; prints its id and secret once")
    add.add_argument("name")
    add.add_argument("--json", action="store_true", help='print {"id": ..., "secret": ...}')
    add.set_defaults(func=cmd_agents_add)
    lst = agents_p.add_parser("list", parents=[common], help="list agents (never their secrets)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_agents_list)
    rm = agents_p.add_parser("remove", parents=[common], help="remove an agent: its requests get 401")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_agents_remove)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (migrations.MigrationError, StorageError, ConfigError) as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
