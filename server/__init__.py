"""ollama-orchestrator's server: many Ollama agents behind one streaming chat API."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then ORCH_* variables, then ``config``."""
    # Imported here, not at module level: agents import server.signing and
    # should not pay for Flask on a GPU host.
    from flask import Flask

    from . import db, errors, migrations
    from .config import load_config
    from .notifier import Notifier
    from .sweeper import Sweeper

    app = Flask(__name__)
    settings = load_config(config)
    app.config.update(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    logging.getLogger("server").setLevel(settings["LOG_LEVEL"])

    db.init_app(app)
    errors.init_app(app)
    conn = db.connect(settings["DATABASE"])
    try:
        if settings["MIGRATE_ON_START"]:
            migrations.migrate(conn)
        elif migrations.pending(conn):
            raise migrations.MigrationError("the database needs migrations: run `orchestrator migrate`")
    finally:
        conn.conn.close()

    app.extensions["notifier"] = Notifier()
    _register_blueprints(app)
    app.extensions["sweeper"] = Sweeper(app)
    if settings["SWEEP_INTERVAL"] > 0:
        app.extensions["sweeper"].start()
    return app


def _register_blueprints(app: Flask) -> None:
    from . import chat, inference, metrics, ollama_api, openai_api, pages

    for module in (inference, chat, openai_api, ollama_api, metrics, pages):
        app.register_blueprint(module.bp)
