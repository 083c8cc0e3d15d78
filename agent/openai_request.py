"""A job in OpenAI's terms, for the OpenAI-compatible backend: messages, tools, format, think.

Jobs carry Ollama's forms: images as bare base64 beside the text, tool calls
with arguments as objects, a tool answer naming its function.  OpenAI's API
wants content parts with `data:` URLs, arguments as JSON strings with ids,
and a `tool_call_id` on the answer; `format` becomes `response_format` and
`think` becomes `reasoning_effort` (llama.cpp and vLLM read both).
"""
from __future__ import annotations

import json

THINK_TO_EFFORT = {True: "medium", False: "none", "low": "low", "medium": "medium", "high": "high"}


def openai_messages(messages: list[dict]) -> list[dict]:
    """Ollama's messages as OpenAI's; tool calls get ids the tool answers that follow them refer to."""
    converted, pending = [], []    # pending: (id, function name) of calls not answered yet
    for n, message in enumerate(messages):
        out: dict = {"role": message.get("role"), "content": message.get("content", "")}
        if message.get("images"):
            out["content"] = [{"type": "text", "text": out["content"] or ""}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                for image in message["images"]]
        if message.get("tool_calls"):
            calls = []
            for i, call in enumerate(message["tool_calls"]):
                function = call.get("function", {})
                call_id = call.get("id") or f"call_{n}_{i}"
                pending.append((call_id, function.get("name")))
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": function.get("name"),
                                           "arguments": json.dumps(function.get("arguments", {}))}})
            out["tool_calls"] = calls
        if message.get("role") == "tool" and pending:
            named = next((p for p in pending if p[1] == message.get("tool_name")), pending[0])
            pending.remove(named)
            out["tool_call_id"] = named[0]
        converted.append(out)
    return converted


def request_fields(request: dict | None) -> dict:
    """`tools`, `response_format` and `reasoning_effort` from a job's Ollama fields."""
    request = request or {}
    fields: dict = {}
    if request.get("tools"):
        fields["tools"] = request["tools"]
    answer_format = request.get("format")
    if answer_format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(answer_format, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer_format}}
    if request.get("think") in THINK_TO_EFFORT:
        fields["reasoning_effort"] = THINK_TO_EFFORT[request["think"]]
    return fields


class ToolCallAssembler:
    """OpenAI streams a tool call in pieces (an index, then its id, name and argument fragments);
    Ollama's form, which the server stores, is the whole call: this keeps the pieces until the end."""

    def __init__(self) -> None:
        self._calls: dict[int, dict] = {}

    def add(self, pieces: object) -> None:
        for piece in pieces if isinstance(pieces, list) else ():
            if not isinstance(piece, dict):
                continue
            call = self._calls.setdefault(piece.get("index", len(self._calls)), {"name": "", "arguments": ""})
            function = piece.get("function") or {}
            call["id"] = piece.get("id") or call.get("id")
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def finished(self) -> list[dict]:
        """The calls, whole, in Ollama's form (arguments that are not JSON are kept as `{"raw": ...}`)."""
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = {"raw": call["arguments"]}
            calls.append({"function": {"name": call["name"], "arguments": arguments}})
        self._calls.clear()
        return calls
