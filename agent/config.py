"""Every agent setting, declared once: name, environment variable, default and one line of help.

Layering (lowest first): these defaults, then the environment, then the command
line. A missing or malformed setting raises `ConfigError` with one line that
names the variable or flag; `python -m agent.config` prints the README table.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

OLLAMA_DEFAULT_PORT = 11434


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line naming it."""


def _url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http:// or https:// URL")
    return value.strip().rstrip("/")


def ollama_host_url(value: str) -> str:
    """Ollama's own `OLLAMA_HOST` (`0.0.0.0`, `host:port`, `:11434`, a URL) as a URL to connect to."""
    value = value.strip()
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    host = parts.hostname or ""
    if host in ("", "0.0.0.0", "::"):  # a bind-everything address: connect locally
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    if port is None and parts.scheme == "http":
        port = OLLAMA_DEFAULT_PORT
    return _url(f"{parts.scheme}://{host}" + (f":{port}" if port else "") + parts.path)


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return value.strip()


def _number(minimum: float, *, above: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("is not a number") from None
        if number != number or number < minimum or (above and number == minimum):
            raise ValueError(f"must be {'above' if above else 'at least'} {minimum:g}")
        return number
    return parse


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("is not a whole number") from None
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _models(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


def _batch_mode(value: str) -> str:
    if value.strip().lower() not in ("fixed", "adaptive"):
        raise ValueError("must be 'fixed' or 'adaptive'")
    return value.strip().lower()


def _transport(value: str) -> str:
    if value.strip().lower() not in ("auto", "ws", "http"):
        raise ValueError("must be 'auto', 'ws' or 'http'")
    return value.strip().lower()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("is not a boolean (1/0, true/false)")


def _backend(value: str) -> str:
    if value.strip().lower() not in ("ollama", "openai"):
        raise ValueError("must be 'ollama' or 'openai'")
    return value.strip().lower()


def _log_level(value: str) -> str:
    if value.strip().upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value.strip().upper()


@dataclass(frozen=True)
class Setting:
    """One setting: environment variable `name`, flag `--name-in-kebab-case`."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = _text
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def field(self) -> str:
        return self.name.lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("API_BASE", "http://127.0.0.1:8000", "URL of the orchestrator server.", _url),
    Setting("AGENT_ID", None, "This agent's id, from `orchestrator agents add NAME`.", required=True),
    Setting("AGENT_SECRET", None, "This agent's secret, shown once by `orchestrator agents add`; "
            "prefer the environment to the flag, which `ps` shows.", required=True),
    Setting("OLLAMA_URL", f"http://127.0.0.1:{OLLAMA_DEFAULT_PORT}", "Ollama's URL; when unset, derived from "
            "Ollama's own `OLLAMA_HOST`.", _url),
    Setting("BACKEND", "ollama", "`ollama` (Ollama's native API) or `openai` (any server streaming "
            "`/v1/chat/completions`: llama.cpp's llama-server, vLLM, LM Studio).", _backend),
    Setting("BACKEND_URL", "", "The engine's URL; required with BACKEND=openai (e.g. http://127.0.0.1:8080, "
            "with or without /v1); with BACKEND=ollama it overrides OLLAMA_URL.", _url),
    Setting("BACKEND_API_KEY", "", "Bearer key for an OpenAI-compatible engine started with one "
            "(vLLM's --api-key, LM Studio).", _text),
    Setting("TRANSPORT", "auto", "`auto` (a WebSocket when the server offers one, else the HTTP protocol), `ws` "
            "(WebSocket only) or `http` (polls and POSTs only).", _transport),
    Setting("POLL_INTERVAL", 0.1, "HTTP protocol: seconds between polls while the queue is empty (short poll).",
            _number(0, above=True)),
    Setting("LONG_POLL", 0.0, "HTTP protocol: seconds the server may hold a poll open waiting for a job; "
            "0 = short poll.", _number(0)),
    Setting("MAX_JOBS", 1, "Jobs run at once; match Ollama's `OLLAMA_NUM_PARALLEL`.", _count),
    Setting("MODELS", (), "Comma-separated models to serve; empty = every model in Ollama's "
            "`/api/tags`, refreshed every minute.", _models),
    Setting("BATCH_MAX_TOKENS", 5, "HTTP protocol: tokens per POST at most (fixed mode).", _count),
    Setting("BATCH_MAX_DELAY", 0.05, "HTTP protocol: seconds a token may wait for others before its POST "
            "(fixed mode).",
            _number(0)),
    Setting("BATCH_MODE", "adaptive", "HTTP protocol: `fixed` (coalesce up to BATCH_MAX_TOKENS / "
            "BATCH_MAX_DELAY) or `adaptive` (post at once when no POST is in flight).", _batch_mode),
    Setting("SHUTDOWN_TIMEOUT", 30.0, "Seconds running jobs get to finish after SIGTERM/SIGINT.", _number(0)),
    Setting("LEGACY", False, "Behave like the old agent (benchmark baseline): HTTP only, 1.5 s poll, one POST "
            "per token, no batching, a new connection per request.", _bool),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.", _log_level),
)


# The one home of every agent default: AgentConfig and TokenBatcher read theirs from here.
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS if not s.required}


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings after parsing; field names are the settings' names in lower case."""

    agent_id: str
    agent_secret: str
    api_base: str = DEFAULTS["API_BASE"]
    ollama_url: str = DEFAULTS["OLLAMA_URL"]
    backend: str = DEFAULTS["BACKEND"]
    backend_url: str = DEFAULTS["BACKEND_URL"]
    backend_api_key: str = DEFAULTS["BACKEND_API_KEY"]
    transport: str = DEFAULTS["TRANSPORT"]
    poll_interval: float = DEFAULTS["POLL_INTERVAL"]
    long_poll: float = DEFAULTS["LONG_POLL"]
    max_jobs: int = DEFAULTS["MAX_JOBS"]
    models: tuple[str, ...] = DEFAULTS["MODELS"]
    batch_max_tokens: int = DEFAULTS["BATCH_MAX_TOKENS"]
    batch_max_delay: float = DEFAULTS["BATCH_MAX_DELAY"]
    batch_mode: str = DEFAULTS["BATCH_MODE"]
    shutdown_timeout: float = DEFAULTS["SHUTDOWN_TIMEOUT"]
    legacy: bool = DEFAULTS["LEGACY"]
    log_level: str = DEFAULTS["LOG_LEVEL"]

    @property
    def adaptive(self) -> bool:
        return self.batch_mode == "adaptive"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise ConfigError(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    """The command line: one flag per setting; values stay strings so errors name the flag."""
    p = _Parser(prog="orchestrator-agent",
                description="Run beside Ollama: take jobs from the orchestrator and stream the answers back.")
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        text = f"{s.help} [env {s.name}; default {default if default not in (None, '') else 'none'}]"
        if s.parse is _bool:
            p.add_argument(s.flag, dest=s.field, action="store_const", const="1", help=text)
        else:
            p.add_argument(s.flag, dest=s.field, metavar=s.name, help=text)
    return p


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Defaults, then the environment, then `argv`; raises `ConfigError`."""
    environ = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw, source = getattr(args, s.field), s.flag
        if raw is None:
            raw, source = environ.get(s.name), s.name
        if raw is None and s.name == "OLLAMA_URL" and environ.get("OLLAMA_HOST"):
            values[s.field] = _parsed(ollama_host_url, environ["OLLAMA_HOST"], "OLLAMA_HOST")
            continue
        if raw is None or (s.required and not raw.strip()):
            if s.required:
                raise ConfigError(f"{s.name} is not set (environment variable {s.name} or {s.flag})")
            values[s.field] = s.default
            continue
        values[s.field] = _parsed(s.parse, raw, source)
    if values["backend"] == "openai" and not values["backend_url"]:
        raise ConfigError("BACKEND=openai needs BACKEND_URL, the OpenAI-compatible server's URL")
    return AgentConfig(**values)


def _parsed(parse: Callable[[str], Any], raw: str, source: str) -> Any:
    try:
        return parse(raw)
    except ValueError as exc:
        shown = raw if len(raw) <= 60 else raw[:57] + "..."
        raise ConfigError(f"{source}={shown!r} {exc}") from None


def markdown_table() -> str:
    """The README's table of agent settings."""
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "required" if s.required else ",".join(s.default) if isinstance(s.default, tuple) else s.default
        shown = "required" if s.required else f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{s.name}` | `{s.flag}` | {shown} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
