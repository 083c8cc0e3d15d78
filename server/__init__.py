"""ollama-orchestrator's server: many Ollama agents behind one streaming chat API."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import agent_socket, chat, errors, inference, metrics, ollama_api, openai_api, operators, pages, storage
from .config import load_config
from .notifier import Notifier
from .storage import migrations
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
    if settings["MIGRATE_ON_START"]:
        migrations.migrate(store)
    elif migrations.pending(store):
        raise migrations.MigrationError("the database needs migrations: run `orchestrator migrate`")
    storage.init_app(app, store)
    # Streams still waiting when the database has been away a whole lease end with an error.
    store.start_listening(give_up_after=settings["LEASE_SECONDS"])
    errors.init_app(app)
    _register_blueprints(app)
    app.extensions["sweeper"] = Sweeper(app)
    if settings["SWEEP_INTERVAL"] > 0:
        app.extensions["sweeper"].start()
    return app


def _register_blueprints(app: Flask) -> None:
    for module in (inference, agent_socket, chat, openai_api, ollama_api, operators, metrics, pages):
        app.register_blueprint(module.bp)
