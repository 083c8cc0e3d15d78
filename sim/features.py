"""The simulator's answers to Ollama's features: tools, images, format, think, embeddings, show and ps.

Deterministic, so tests know what comes back (`tool_call_for`, `json_answer`,
`THINKING`, `embedding`):

- a model's capabilities come from its name: one with `embed` in it is an
  embedding model (chats refused), one with `plain` in it has no tools, thinking
  or vision; every other one has them all.  A request for a feature the model
  lacks is refused with Ollama's own message (`"NAME" does not support tools`);
- with `tools`, when the last message is the user's and names a tool, the
  model calls that tool once, with arguments made from its JSON schema; else
  it answers in text (Open WebUI sends dozens of tools with every chat);
- `format` ("json" or a schema) makes the answer one JSON object;
- `think` streams the `THINKING` tokens as `thinking` before the answer;
- `images` must be base64 and change the answer (their digest joins the prompt);
- embeddings are unit vectors of `EMBED_DIMENSIONS` derived from the text.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import replace

from sim.plan import Plan, SimError

THINKING = ["Let", " me", " think", " about", " that", "."]
EMBED_DIMENSIONS = 8
FULL = ["completion", "tools", "thinking", "vision"]


def capabilities(model: str) -> list[str]:
    """What the simulated `model` can do, from its name."""
    if "embed" in model:
        return ["embedding"]
    return ["completion"] if "plain" in model else list(FULL)


def check(body: dict, model: str, messages: list[dict]) -> str:
    """Refuse what `model` cannot do as Ollama refuses it; returns the images' part of the prompt."""
    can = capabilities(model)
    if "completion" not in can:
        raise SimError(400, f'"{model}" does not support chat')
    if body.get("tools") and "tools" not in can:
        raise SimError(400, f"registry.ollama.ai/library/{model} does not support tools")
    if body.get("think") and "thinking" not in can:
        raise SimError(400, f'"{model}" does not support thinking')
    images = [image for m in messages for image in (m.get("images") or ())] + list(body.get("images") or ())
    if images and "vision" not in can:
        raise SimError(400, f'"{model}" does not support images')
    digests = []
    for image in images:
        try:
            digests.append(hashlib.sha256(base64.b64decode(image, validate=True)).hexdigest()[:12])
        except (binascii.Error, ValueError, TypeError):
            raise SimError(400, "illegal base64 data in image") from None
    return "".join(f"\n[image {d}]" for d in digests)


def shape(plan: Plan, body: dict, messages: list[dict]) -> Plan:
    """The plan's tokens turned into what the request asked for (tool call, JSON, thinking first)."""
    tokens: list = list(plan.tokens)
    called = _named_tool(body.get("tools"), messages)
    if called is not None:
        tokens = [{"tool_calls": [tool_call_for(called)]}]
    elif body.get("format"):
        tokens = [json_answer(body["format"], "".join(plan.tokens))]
    if body.get("think"):
        tokens = [{"thinking": t} for t in THINKING] + tokens
    if tokens == plan.tokens:
        return plan
    step = plan.offsets[1] - plan.offsets[0] if len(plan.tokens) > 1 else 0.0
    offsets = [plan.offsets[0] + i * step for i in range(len(tokens))]
    return replace(plan, tokens=tokens, offsets=[*offsets, offsets[-1]], fault_at=None if plan.fault_at is None
                   else min(plan.fault_at, len(tokens)))


def _named_tool(tools: object, messages: list[dict]) -> dict | None:
    last = messages[-1] if messages else {}
    if not isinstance(tools, list) or last.get("role") != "user":
        return None
    content = str(last.get("content") or "")
    return next((tool for tool in tools if isinstance(tool, dict)
                 and (tool.get("function") or {}).get("name", "\0") in content), None)


def tool_call_for(tool: dict) -> dict:
    """The call the simulator makes of `tool`: its name, and arguments made from its parameters' schema."""
    function = tool.get("function") or {}
    return {"function": {"name": function.get("name", ""), "arguments": example(function.get("parameters") or {})}}


def json_answer(answer_format: object, text: str) -> str:
    """The whole answer for `format`: `{"answer": text}` for "json", else an example of the schema."""
    if isinstance(answer_format, dict):
        return json.dumps(example(answer_format, text), ensure_ascii=False)
    return json.dumps({"answer": text}, ensure_ascii=False)


def example(schema: dict, text: str = "sim") -> object:
    """A value that satisfies the simple JSON schemas tools and formats use."""
    kind = schema.get("type")
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        return {name: example(sub, text) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example(schema.get("items") or {}, text)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text)


def embedding(model: str, text: str, dimensions: int | None = None) -> list[float]:
    """A unit vector from the text: the same text always gets the same vector."""
    digest = hashlib.sha256(f"{model}|{text}".encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBED_DIMENSIONS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    vector = [round(x / norm, 6) for x in raw]
    return vector[:dimensions] if dimensions else vector
