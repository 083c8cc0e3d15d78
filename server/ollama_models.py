"""Ollama-compatible front door, models: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, management.

The fleet's models are what online agents serve, once each by Ollama's full
name (``sim`` is ``sim:latest``); sizes, digests, details, capabilities and the
models loaded come from what the agents' Ollamas report (``reports``).  Model
management answers in Ollama's error shape: the fleet's models are managed on
the agents' hosts, with their own ``ollama pull``.
"""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app

from protocol.models import canonical_model

from . import body, frontdoor, reports
from .auth import api_key_required
from .ollama_wire import OllamaError, install_error_handlers, model_not_found, timestamp
from .storage import agents, get_db

bp = Blueprint("ollama_models", __name__)
install_error_handlers(bp)

# The Ollama API whose behaviour this door follows (tools streamed, think, /api/show capabilities).
VERSION = "0.12.0"
MANAGED_ON_HOSTS = ("this server is a fleet of Ollama hosts: its models are managed on the agents' hosts "
                    "(`ollama pull`, `ollama rm` there), not through its API")
NO_DETAILS = {"parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "",
              "quantization_level": ""}


@bp.get("/api/version")
def version():
    return {"version": VERSION}


@bp.get("/api/tags")
@api_key_required
def tags():
    known = _reports()
    return {"models": [_tag(name, reports.described(known, name)) for name in frontdoor.served_models()]}


def _tag(name: str, entry: dict[str, Any] | None) -> dict[str, Any]:
    entry = entry or {}
    return {"name": name, "model": name, "modified_at": entry.get("modified_at") or timestamp(),
            "size": entry.get("size", 0), "digest": entry.get("digest", ""),
            "details": {**NO_DETAILS, **entry.get("details", {})}}


@bp.post("/api/show")
@api_key_required
def show():
    payload = body.json_object(any_content_type=True)
    # Older clients name the model "name", as Ollama's API once did.
    model = body.text(payload.get("model", payload.get("name")), "model")
    if not frontdoor.serves(model):
        raise model_not_found(model)
    entry = reports.described(_reports(), model) or {}
    shown = entry.get("show", {})
    return {"modelfile": "", "parameters": shown.get("parameters", ""), "template": shown.get("template", ""),
            "details": {**NO_DETAILS, **shown.get("details", entry.get("details", {}))},
            "model_info": shown.get("model_info", {}),
            "capabilities": shown.get("capabilities", ["completion"]),
            "modified_at": shown.get("modified_at") or entry.get("modified_at") or timestamp()}


@bp.get("/api/ps")
@api_key_required
def ps():
    served = {canonical_model(name) for name in frontdoor.served_models()}
    return {"models": [{**entry, "details": {**NO_DETAILS, **entry.get("details", {})}}
                       for entry in reports.running(_reports(), served)]}


@bp.route("/api/pull", methods=["POST"])
@bp.route("/api/push", methods=["POST"])
@bp.route("/api/create", methods=["POST"])
@bp.route("/api/copy", methods=["POST"])
@bp.route("/api/delete", methods=["DELETE"])
@bp.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
@api_key_required
def manage(digest: str | None = None):
    raise OllamaError(MANAGED_ON_HOSTS, 403)


def _reports() -> list[dict[str, Any]]:
    return agents.reports(get_db(), time.time(), current_app.config["AGENT_ONLINE_SECONDS"])
