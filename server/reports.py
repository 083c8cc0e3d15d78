"""What agents report of their Ollama's models, checked on the way in and merged on the way out.

An agent posts its report (``POST /api/v1/inference/models``, protocol/models.py)
when it starts and whenever its models change, at most once a minute; the
Ollama door reads the reports of online agents for ``/api/tags`` (sizes,
digests, families), ``/api/show`` (details, capabilities, template) and
``/api/ps`` (models loaded across the fleet).  The freshest report wins where
two agents describe the same model.
"""
from __future__ import annotations

from typing import Any

from protocol.models import MAX_REPORTED_MODELS, RUNNING_FIELDS, SHOW_FIELDS, TAG_FIELDS, canonical_model

from . import body
from .errors import BadRequest


def checked(payload: dict[str, Any]) -> dict[str, Any]:
    """The report's known fields, or BadRequest naming the bad one."""
    body.mapping(payload, "report")          # lone surrogates anywhere: storage could not encode them
    models = _entries(payload.get("models", []), "models")
    running = _entries(payload.get("running", []), "running")
    version = payload.get("version")
    if version is not None and (type(version) is not str or len(version) > 100):
        raise BadRequest("'version' must be a short string", code="invalid_field")
    kept_models = []
    for i, entry in enumerate(models):
        kept = _kept(entry, TAG_FIELDS, f"models[{i}]")
        show = entry.get("show")
        if show is not None:
            if not isinstance(show, dict):
                raise BadRequest(f"'models[{i}].show' must be an object", code="invalid_field")
            kept["show"] = {k: show[k] for k in SHOW_FIELDS if show.get(k) is not None}
        kept_models.append(kept)
    kept_running = [_kept(entry, RUNNING_FIELDS, f"running[{i}]") for i, entry in enumerate(running)]
    return {"models": kept_models, "running": kept_running, "version": version}


def _entries(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_REPORTED_MODELS:
        raise BadRequest(f"'{name}' must be a list of at most {MAX_REPORTED_MODELS} objects", code="invalid_field")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or type(entry.get("name")) is not str or not entry["name"].strip():
            raise BadRequest(f"'{name}[{i}]' must be an object with a non-empty 'name'", code="invalid_field")
    return value


def _kept(entry: dict[str, Any], fields: tuple[str, ...], where: str) -> dict[str, Any]:
    kept = {k: entry[k] for k in fields if entry.get(k) is not None}
    for size in ("size", "size_vram", "context_length"):
        value = kept.get(size)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise BadRequest(f"'{where}.{size}' must be an integer, 0 or more", code="invalid_field")
    for text in ("digest", "modified_at", "expires_at"):
        if text in kept and type(kept[text]) is not str:
            raise BadRequest(f"'{where}.{text}' must be a string", code="invalid_field")
    if "details" in kept and not isinstance(kept["details"], dict):
        raise BadRequest(f"'{where}.details' must be an object", code="invalid_field")
    return kept


def described(reports: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The freshest report's entry for ``model`` (``:latest`` or not), or None."""
    name = canonical_model(model)
    for report in reports:
        for entry in report.get("models", ()):
            if canonical_model(entry["name"]) == name:
                return entry
    return None


def running(reports: list[dict[str, Any]], served: set[str]) -> list[dict[str, Any]]:
    """Models loaded on online agents, once each (the latest expiry), among ``served`` canonical names."""
    loaded: dict[str, dict[str, Any]] = {}
    for report in reports:
        for entry in report.get("running", ()):
            name = canonical_model(entry["name"])
            if name in served and str(entry.get("expires_at", "")) >= str(loaded.get(name, {}).get("expires_at", "")):
                loaded[name] = {**entry, "name": name, "model": name}
    return [loaded[name] for name in sorted(loaded)]
