"""One chunk of an answer on the wire: what the agent posts in ``chunks`` and the server stores by ``seq``.

An item of ``chunks`` is either a string (plain text, the original form, which
old agents keep sending and which stays the cheapest) or an object holding the
parts Ollama streams besides text::

    "Hello"                                                   text only
    {"thinking": "Let me see"}                                a reasoning model's thinking
    {"tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}
    {"text": "", "embedding": [0.1, -0.2]}                    one input's vector (embedding jobs)

Every item is one ``seq``: storage stays seq-idempotent whatever it holds.
``to_wire`` and ``from_wire`` are the only encoder and parser (the agent
encodes, the server parses); the WebSocket transport reuses them as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Ollama's final-line fields kept as a job's stats; other keys are dropped.
STATS_FIELDS = ("done_reason", "eval_count", "eval_duration", "prompt_eval_count", "prompt_eval_duration",
                "total_duration", "load_duration")
# Keys of an item object besides "text"; anything else is refused, so a typo never vanishes silently.
PARTS = ("thinking", "tool_calls", "embedding")


class WireError(ValueError):
    """An item that is not a valid chunk; the message names the problem."""


@dataclass(frozen=True)
class Delta:
    """One chunk: text and, rarely, thinking, tool calls or an embedding vector."""

    text: str = ""
    thinking: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    embedding: tuple[float, ...] | None = field(default=None)

    @property
    def plain(self) -> bool:
        """Only text: sent and stored as a bare string."""
        return not (self.thinking or self.tool_calls or self.embedding is not None)

    def parts(self) -> dict[str, Any] | None:
        """The non-text parts as a JSON object (what storage keeps beside the text), or None."""
        if self.plain:
            return None
        parts: dict[str, Any] = {}
        if self.thinking:
            parts["thinking"] = self.thinking
        if self.tool_calls:
            parts["tool_calls"] = list(self.tool_calls)
        if self.embedding is not None:
            parts["embedding"] = list(self.embedding)
        return parts

    def to_wire(self) -> str | dict[str, Any]:
        """The item as it goes in ``chunks``."""
        if self.plain:
            return self.text
        item = self.parts() or {}
        if self.text:
            item["text"] = self.text
        return item


def from_wire(item: Any) -> Delta:
    """Parse one item of ``chunks``; raises WireError."""
    if type(item) is str:
        return Delta(item)
    if not isinstance(item, dict):
        raise WireError("an item of 'chunks' must be a string or an object")
    unknown = set(item) - {"text", *PARTS}
    if unknown:
        raise WireError(f"unknown key(s) in a chunk: {', '.join(sorted(unknown))}")
    text, thinking = item.get("text", ""), item.get("thinking", "")
    if type(text) is not str or type(thinking) is not str:
        raise WireError("a chunk's 'text' and 'thinking' must be strings")
    return Delta(text, thinking, _tool_calls(item.get("tool_calls")), _embedding(item.get("embedding")))


def from_parts(text: str, parts: dict[str, Any] | None) -> Delta:
    """A stored chunk (its text, and the parts beside it) as a Delta."""
    if not parts:
        return Delta(text)
    embedding = parts.get("embedding")
    return Delta(text, parts.get("thinking", ""), tuple(parts.get("tool_calls") or ()),
                 None if embedding is None else tuple(embedding))


def _tool_calls(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise WireError("a chunk's 'tool_calls' must be a list")
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or type(function.get("name")) is not str or not function["name"]:
            raise WireError("each tool call needs a 'function' with a non-empty 'name'")
        if not isinstance(function.get("arguments", {}), dict):
            raise WireError("a tool call's 'arguments' must be an object")
    return tuple(value)


def _embedding(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
            not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) for x in value):
        raise WireError("a chunk's 'embedding' must be a list of finite numbers")
    return tuple(value)
