"""ollama-orchestrator's server: many Ollama agents behind one streaming chat API."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import (
    agent_socket,
    chat,
    errors,
    inference,
    keywrap,
    limits,
    metrics,
    ollama_api,
    ollama_models,
    openai_api,
    operators,
    pages,
    storage,
)
from .config import ConfigError, load_config
from .notifier import Notifier
from .storage import agents, migrations
from .sweeper import Sweeper


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then ORCH_* variables, then ``config``."""
    app = Flask(__name__)
    settings = load_config(config)
    app.config.update(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    logging.getLogger("server").setLevel(settings["LOG_LEVEL"])

    store = storage.open_storage(settings["DATABASE"], Notifier(), settings["POOL_SIZE"])
    store.check()
    if settings["MIGRATE_ON_START"]:
        migrations.migrate(store)
    elif migrations.pending(store):
        raise migrations.MigrationError("the database needs migrations: run `orchestrator migrate`")
    storage.init_app(app, store)
    _seal_agent_keys(store, settings["SECRET_KEY"])
    # Streams still waiting when the database has been away a whole lease end with an error.
    store.start_listening(give_up_after=settings["LEASE_SECONDS"])
    errors.init_app(app)
    limits.init_app(app)
    _register_blueprints(app)
    app.extensions["sweeper"] = Sweeper(app)
    store.health.listeners.append(app.extensions["sweeper"].storage_changed)
    # Streams waiting on a write that cannot come re-read and end with storage_unavailable.
    store.health.listeners.append(lambda ok: ok or store.notifier.wake_all())
    if settings["SWEEP_INTERVAL"] > 0:
        app.extensions["sweeper"].start()
    return app


def _seal_agent_keys(store: storage.Storage, secret_key: str) -> None:
    """Secrets stored before migration 0003 become keys; keys are wrapped once ORCH_SECRET_KEY is set."""
    try:
        with store.connection() as conn:
            changed = agents.seal_stored_keys(conn, secret_key)
    except keywrap.KeyWrapError as exc:
        raise ConfigError(str(exc)) from None
    if changed:
        logging.getLogger("server").info("stored %d agent key(s) %s", changed,
                                         "wrapped with ORCH_SECRET_KEY" if secret_key else "in place of secrets")


def _register_blueprints(app: Flask) -> None:
    for module in (inference, agent_socket, chat, openai_api, ollama_api, ollama_models, operators, metrics, pages):
        app.register_blueprint(module.bp)
