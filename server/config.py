"""Every server setting, declared once: name, default, type and one line of help.

Layering (lowest first): these defaults, then ``ORCH_<NAME>`` environment
variables, then the mapping passed to ``create_app``.  The README's
configuration table is generated from ``SETTINGS`` and a test keeps it true.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.wire import MAX_CHUNKS_PER_POST

ENV_PREFIX = "ORCH_"


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _notifier(value: str) -> str:
    if value not in ("condition", "poll"):
        raise ValueError("must be 'condition' or 'poll'")
    return value


def _keys(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE", "var/orchestrator.db", "The SQLite database file, or a `postgresql://` URL for many "
            "workers and hosts on one PostgreSQL database.", str),
    Setting("POOL_SIZE", 16, "Database connections each worker keeps (PostgreSQL: at most this many open).", int),
    Setting("BIND", "127.0.0.1:8000", "Address gunicorn listens on (`orchestrator serve --host/--port` set it).", str),
    Setting("WORKERS", 1, "gunicorn worker processes; more than one needs `ORCH_NOTIFIER=poll` on SQLite.", int),
    Setting("WORKER_CONNECTIONS", 10000, "Connections per gevent worker; every open stream and parked long poll "
            "holds one (10,000 idle ones measured ~135 MB).", int),
    Setting("ACCESS_LOG", "", "File for gunicorn's access log (`-` = stderr); empty = none.", str),
    Setting("MAX_STREAMS", 2000, "Chat streams one worker holds at once (every door, streamed or not); more get 429 "
            "`too_many_streams`. Kept below the connections the worker can hold, with room for agents.", int),
    Setting("MAX_STREAMS_PER_CLIENT", 200, "Chat streams one client address holds at once per worker; more get 429 "
            "`too_many_streams`.", int),
    Setting("TRUST_FORWARDED_FOR", False, "Take the client address from the last `X-Forwarded-For` hop (behind "
            "nginx: deploy/nginx.conf sets it); off = the socket's peer address.", _bool),
    Setting("BODY_TIMEOUT", 10.0, "Seconds a client has to send a whole request body; slower ones get 408 and are "
            "disconnected.", float),
    Setting("MAX_BODY_BYTES", 1024 * 1024, "Largest accepted request body (413) or agent WebSocket frame (the "
            "socket is closed).", int),
    Setting("MAX_CHUNKS_PER_POST", MAX_CHUNKS_PER_POST, "Chunks in one agent POST; more get 413 `too_many_chunks` "
            f"(agents send at most {MAX_CHUNKS_PER_POST}: keep it at least that).", int),
    Setting("ADMIN_TOKEN", "", "Bearer token for admin endpoints (`/api/v1/agents`, status); empty = open.", str),
    Setting("API_KEYS", (), "Comma-separated API keys; when set, user endpoints need `Authorization: Bearer <key>`.", _keys),
    Setting("SIGNATURE_SKEW", 60.0, "Seconds an agent's `X-Agent-Timestamp` may differ from the server clock.", float),
    Setting("ALLOW_NO_NONCE", False, "Accept agent requests without `X-Agent-Nonce` (agents older than the nonce; "
            "such requests can be replayed within the skew window).", _bool),
    Setting("NONCES_PER_AGENT", 100_000, "Nonces remembered per agent over the skew window, per process; an agent "
            "sending more gets 429 (100,000 is 800 requests/s at the default skew).", int),
    Setting("SECRET_KEY", "", "Server key that wraps the agents' signing keys in the database (32+ random "
            "characters); empty = stored unwrapped. Keep it out of the database's backups.", str),
    Setting("LEASE_SECONDS", 30.0, "A running job's lease; every POST from its agent renews it.", float),
    Setting("DELIVERY_LEASE_SECONDS", 5.0, "How long a handed-out job waits for its agent's first POST before it is requeued.", float),
    Setting("MAX_ATTEMPTS", 3, "Times a job may be handed out before it fails.", int),
    Setting("MAX_LONG_POLL", 30.0, "Upper bound on the `wait` parameter of a long poll, in seconds.", float),
    Setting("WS_PING_INTERVAL", 20.0, "Seconds between pings on an agent's WebSocket: keeps NAT mappings alive "
            "and finds dead peers.", float),
    Setting("WS_PING_TIMEOUT", 20.0, "An agent WebSocket whose pong has not come this many seconds after a ping is "
            "closed as dead.", float),
    Setting("AGENT_ONLINE_SECONDS", 60.0, "An agent that polled or posted within this window counts as online.", float),
    Setting("QUEUE_TIMEOUT", 120.0, "A chat no agent took within this many seconds fails with `queue_timeout`.", float),
    Setting("KEEPALIVE_SECONDS", 15.0, "Interval of `: keepalive` comments on an idle stream.", float),
    Setting("CANCEL_GRACE", 5.0, "Seconds after a client leaves before its request is cancelled (0 = at once).", float),
    Setting("NOTIFIER", "condition", "`condition` (in-process notifier) or `poll` (legacy 100 ms database poll).", _notifier),
    Setting("POLL_INTERVAL", 0.1, "Database poll interval of the legacy `poll` notifier, in seconds.", float),
    Setting("SWEEP_INTERVAL", 1.0, "Seconds between sweeps for expired leases, queue timeouts and cancellations.", float),
    Setting("MIGRATE_ON_START", True, "Apply pending migrations when the app starts.", _bool),
    Setting("LOG_LEVEL", "INFO", "Python logging level of the server.", str),
)

DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}
_BY_NAME = {s.name: s for s in SETTINGS}


class ConfigError(ValueError):
    """A setting could not be parsed; the message names the variable."""


def load_config(overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Defaults, then ``ORCH_*`` variables, then ``overrides``."""
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for setting in SETTINGS:
        raw = environ.get(ENV_PREFIX + setting.name)
        if raw is None:
            continue
        try:
            config[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}{setting.name}={raw!r}: {exc}") from None
    for name, value in (overrides or {}).items():
        if name in _BY_NAME and isinstance(value, str) and _BY_NAME[name].parse is not str:
            try:
                value = _BY_NAME[name].parse(value)
            except ValueError as exc:
                raise ConfigError(f"{name}={value!r}: {exc}") from None
        config[name] = value
    return config


def check_workers(config: Mapping[str, Any]) -> None:
    """Refuse several workers on SQLite: its wake-ups reach only one process (unless ``NOTIFIER=poll``)."""
    shared = str(config["DATABASE"]).startswith(("postgresql://", "postgres://"))
    if config["WORKERS"] > 1 and not shared and config["NOTIFIER"] != "poll":
        raise ConfigError(
            f"{ENV_PREFIX}WORKERS={config['WORKERS']} needs PostgreSQL ({ENV_PREFIX}DATABASE=postgresql://...): "
            "on SQLite a worker's wake-ups reach only its own streams and long polls "
            f"(or set {ENV_PREFIX}NOTIFIER=poll for the legacy 100 ms database poll)")
    if config["WORKERS"] < 1:
        raise ConfigError(f"{ENV_PREFIX}WORKERS must be 1 or more")


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{ENV_PREFIX}{s.name}` | {shown} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
