"""Ollama's chat features, checked at every door: tools, images, format, think, keep_alive, embedding inputs.

Each check raises BadRequest naming the field (the doors render it in their own
error shape) before anything is queued; what passes goes to the agent as is,
so an agent's Ollama sees the fields its own clients would send.
"""
from __future__ import annotations

import binascii
import re
from base64 import b64decode
from typing import Any

from protocol.models import CHAT, FEATURES

from . import body
from .errors import BadRequest

MAX_TOOLS = 256             # Open WebUI sends 36 by default
MAX_IMAGES = 16             # per message
MAX_EMBED_INPUTS = 512
THINK_LEVELS = ("low", "medium", "high")
# Ollama's keep_alive: a number of seconds, or a Go duration ("5m", "1h30m", "-1"); 0 unloads.
DURATION = re.compile(r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?)+")
# Message fields besides role and content that Ollama reads.
MESSAGE_FIELDS = ("images", "tool_calls", "tool_name", "thinking")


def message_fields(message: dict[str, Any], where: str) -> dict[str, Any]:
    """The message's Ollama fields besides role and content, checked."""
    kept: dict[str, Any] = {}
    if message.get("images") is not None:
        kept["images"] = images(message["images"], f"{where}.images")
    if message.get("tool_calls") is not None:
        kept["tool_calls"] = tool_calls(message["tool_calls"], f"{where}.tool_calls")
    for name in ("tool_name", "thinking"):
        if message.get(name) is not None:
            kept[name] = body.text(message[name], f"{where}.{name}", allow_empty=True)
    return {k: v for k, v in kept.items() if v}


def images(value: Any, name: str) -> list[str]:
    """A list of base64-encoded images (Ollama's form), at most MAX_IMAGES."""
    if not isinstance(value, list) or len(value) > MAX_IMAGES:
        raise BadRequest(f"'{name}' must be a list of at most {MAX_IMAGES} base64-encoded images",
                         code="invalid_field")
    return [base64_image(image, f"{name}[{i}]") for i, image in enumerate(value)]


def base64_image(image: Any, name: str) -> str:
    """One base64-encoded image, checked (the agent's Ollama decodes it)."""
    if type(image) is not str or not image:
        raise BadRequest(f"'{name}' must be a base64-encoded image", code="invalid_field")
    try:
        b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{name}' is not valid base64", code="invalid_field") from None
    return image


def tool_calls(value: Any, name: str) -> list[dict[str, Any]]:
    """An assistant turn's tool calls: ``[{"function": {"name", "arguments": {...}}}]``."""
    if not isinstance(value, list):
        raise BadRequest(f"'{name}' must be a list of tool calls", code="invalid_field")
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or type(function.get("name")) is not str or not function["name"]:
            raise BadRequest(f"'{name}[{i}]' must be an object with a 'function' that has a 'name'",
                             code="invalid_field")
        if not isinstance(function.get("arguments", {}), dict):
            raise BadRequest(f"'{name}[{i}].function.arguments' must be an object", code="invalid_field")
    return value


def request_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """A chat's ``tools``, ``format``, ``think`` and ``keep_alive``, checked; absent ones are left out."""
    kept: dict[str, Any] = {}
    if payload.get("tools") is not None:
        kept["tools"] = tools(payload["tools"])
    if payload.get("format") not in (None, ""):
        kept["format"] = answer_format(payload["format"], "format")
    if payload.get("think") is not None:
        kept["think"] = think(payload["think"], "think")
    if payload.get("keep_alive") is not None:
        kept["keep_alive"] = keep_alive(payload["keep_alive"])
    return {k: v for k, v in kept.items() if v != []}


def tools(value: Any) -> list[dict[str, Any]]:
    """A list of function tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be a list of at most {MAX_TOOLS} function objects", code="invalid_field")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict)
                or type(function.get("name")) is not str or not function["name"].strip()):
            raise BadRequest(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                             code="invalid_field")
        if not isinstance(function.get("parameters", {}), dict):
            raise BadRequest(f"'tools[{i}].function.parameters' must be a JSON schema object", code="invalid_field")
    body.mapping({"tools": value}, "tools")
    return value


def answer_format(value: Any, name: str) -> str | dict[str, Any]:
    """``"json"`` or a JSON schema object."""
    if value == "json":
        return value
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be \"json\" or a JSON schema object", code="invalid_field")
    return body.mapping(value, name)


def think(value: Any, name: str) -> bool | str:
    if isinstance(value, bool) or value in THINK_LEVELS:
        return value
    raise BadRequest(f"'{name}' must be true, false or one of {', '.join(THINK_LEVELS)}", code="invalid_field")


def keep_alive(value: Any) -> int | float | str:
    if not isinstance(value, bool) and isinstance(value, int | float) and abs(value) < 10**12:
        return value
    if type(value) is str and len(value) <= 32 and DURATION.fullmatch(value):
        return value
    raise BadRequest("'keep_alive' must be a number of seconds or a duration such as \"5m\"", code="invalid_field")


def embed_inputs(value: Any, name: str = "input") -> list[str]:
    """An embedding input: a string or a list of 1 to MAX_EMBED_INPUTS strings."""
    inputs = [value] if type(value) is str else value
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_EMBED_INPUTS or \
            not all(type(text) is str for text in inputs):
        raise BadRequest(f"'{name}' must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings",
                         code="invalid_field")
    body.text("".join(inputs), name, allow_empty=True)
    return inputs


def kind_of(messages: list[dict[str, Any]], request: dict[str, Any]) -> str:
    """FEATURES when the chat uses anything an older agent would drop, else CHAT."""
    uses = any(k in request for k in ("tools", "format", "think"))
    return FEATURES if uses or any(k in m for m in messages for k in MESSAGE_FIELDS) else CHAT
