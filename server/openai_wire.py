"""OpenAI's chat completions in Ollama's terms and back: messages, tools, response_format, the chunk stream.

Requests: content parts become text and ``images`` (base64 ``data:`` URLs; an
agent fetches nothing from the web), an assistant's ``tool_calls`` (arguments
as a JSON string) become Ollama's (arguments as an object), a ``tool`` message
names its function through its ``tool_call_id``, ``response_format`` becomes
``format``, ``reasoning_effort`` becomes ``think``.  Answers: tool calls are
streamed whole, one ``tool_calls`` delta each (``index``, ``id``, name and all
the arguments), thinking as ``reasoning_content`` deltas, and
``finish_reason`` is ``tool_calls`` when the model called one.
"""
from __future__ import annotations

import json
from typing import Any

from . import features, frontdoor, streaming

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH_REASONS = {"stop": "stop", "length": "length"}
EFFORT_TO_THINK = {"none": False, "minimal": False, "low": "low", "medium": "medium", "high": "high"}


class Refused(ValueError):
    """A request the door cannot honour: ``param`` names the field, the message says why."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def messages(value: Any) -> Any:
    """OpenAI's message forms as Ollama's {role, content, images, tool_calls, tool_name}."""
    if not isinstance(value, list):
        return value              # validate_chat names the problem
    names: dict[str, str] = {}    # tool_call_id -> function name, for the tool messages that answer them
    plain = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return value
        role, content = message.get("role"), message.get("content")
        converted: dict[str, Any] = {}
        if isinstance(content, list):
            texts, images = [], []
            for j, part in enumerate(content):
                _part(part, f"messages[{i}].content[{j}]", texts, images)
            content = "".join(texts)
            if images:
                converted["images"] = images
        elif content is None and role == "assistant":
            content = ""          # an assistant turn that only carried tool calls
        if role == "assistant" and message.get("tool_calls") is not None:
            converted["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{i}].tool_calls", names)
        if role == "tool" and isinstance(message.get("tool_call_id"), str) and message["tool_call_id"] in names:
            converted["tool_name"] = names[message["tool_call_id"]]
        # A list or object as the role would be unhashable here: leave it for validate_chat to refuse.
        plain.append({"role": ROLES.get(role, role) if isinstance(role, str) else role, "content": content,
                      **converted})
    return plain


def _part(part: Any, name: str, texts: list[str], images: list[str]) -> None:
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
        return
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
            images.append(features.base64_image(url.split(";base64,", 1)[1], name))
            return
        raise Refused(f"'{name}': only images inlined as base64 data: URLs are supported (agents fetch no URLs)",
                      name, "unsupported_content")
    raise Refused(f"'{name}': content parts of type {kind!r} are not supported, only 'text' and 'image_url'",
                  name, "unsupported_content")


def _tool_calls(value: Any, name: str, names: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Refused(f"'{name}' must be a list of tool calls", name)
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Refused(f"'{name}[{i}]' must have a 'function' with a 'name'", name)
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise Refused(f"'{name}[{i}].function.arguments' is not valid JSON", name) from None
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
        calls.append({"function": {"name": function["name"], "arguments": arguments}})
    return calls


def request_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """``tools``, ``format``, ``think`` and ``keep_alive`` in Ollama's terms; Refused for what no agent honours."""
    fields: dict[str, Any] = {}
    choice = payload.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise Refused("'tool_choice' may be 'auto' or 'none': Ollama cannot force a tool call", "tool_choice",
                      "unsupported_parameter")
    if payload.get("tools") and choice != "none":
        fields["tools"] = payload["tools"]
    response_format = payload.get("response_format")
    answer_format = None if response_format is None else _format(response_format)
    if answer_format is not None:
        fields["format"] = answer_format
    effort = payload.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORT_TO_THINK:
            raise Refused(f"'reasoning_effort' must be one of {', '.join(EFFORT_TO_THINK)}", "reasoning_effort")
        fields["think"] = EFFORT_TO_THINK[effort]
    # Ollama's own names, for clients that send them through extra_body.
    for name in ("think", "keep_alive"):
        if payload.get(name) is not None:
            fields[name] = payload[name]
    return features.request_fields(fields)


def _format(value: Any) -> str | dict[str, Any] | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    schema = value.get("json_schema", {}).get("schema") if kind == "json_schema" and \
        isinstance(value.get("json_schema"), dict) else None
    if isinstance(schema, dict):
        return schema
    raise Refused("'response_format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                  "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}", "response_format")


def finish_reason(stats: dict[str, Any] | None, called_tools: bool) -> str:
    return "tool_calls" if called_tools else FINISH_REASONS.get((stats or {}).get("done_reason"), "stop")


def usage(stats: dict[str, Any] | None) -> dict[str, int]:
    stats = stats or {}
    prompt, completion = int(stats.get("prompt_eval_count") or 0), int(stats.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_tool_calls(calls: list[dict[str, Any]], call_id: str, first_index: int = 0) -> list[dict[str, Any]]:
    """Ollama's tool calls as OpenAI's, numbered from ``first_index``, with ids made from ``call_id``."""
    return [{"index": first_index + i, "id": call.get("id") or f"call_{call_id}_{first_index + i}",
             "type": "function", "function": {"name": call["function"]["name"],
                                              "arguments": json.dumps(call["function"].get("arguments", {}),
                                                                      ensure_ascii=False)}}
            for i, call in enumerate(calls)]


def message(answer: frontdoor.Answer, call_id: str) -> dict[str, Any]:
    """A whole answer as OpenAI's assistant message."""
    calls = openai_tool_calls(answer.tool_calls, call_id)
    content = answer.text if answer.text or not calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
    return message


class ChunkEncoder:
    """Engine events as ``chat.completion.chunk`` SSE events, role first, then ``data: [DONE]``."""

    def __init__(self, completion: dict[str, Any], include_usage: bool, error: type) -> None:
        self.completion = {**completion, "object": "chat.completion.chunk"}
        self.include_usage = include_usage
        self.error = error
        self.role_sent = False
        self.calls = 0

    def __call__(self, event: streaming.Event) -> bytes:
        if isinstance(event, streaming.KeepaliveEvent):
            return b": keepalive\n\n"
        if isinstance(event, streaming.StatusEvent):
            return b""
        if isinstance(event, streaming.ErrorEvent):
            return sse(self.error(event.message, frontdoor.FAILURE_STATUS.get(event.code, 500),
                                  code=event.code).to_json())
        out = b"" if self.role_sent else self._chunk({"role": "assistant", "content": ""})
        self.role_sent = True
        if isinstance(event, streaming.ChunkEvent):
            return out + self._delta(event)
        out += self._chunk({}, finish_reason(event.stats, self.calls > 0))
        if self.include_usage:
            out += sse({**self.completion, "choices": [], "usage": usage(event.stats)})
        return out + b"data: [DONE]\n\n"

    def _delta(self, event: streaming.ChunkEvent) -> bytes:
        if not event.parts:
            return self._chunk({"content": event.text})
        delta: dict[str, Any] = {}
        if event.text:
            delta["content"] = event.text
        if event.parts.get("thinking"):
            delta["reasoning_content"] = event.parts["thinking"]
        calls = event.parts.get("tool_calls")
        if calls:
            delta["tool_calls"] = openai_tool_calls(calls, self.completion["id"].removeprefix("chatcmpl-")[:12],
                                                    self.calls)
            self.calls += len(calls)
        return self._chunk(delta) if delta else b""

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {**self.completion, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None     # OpenAI's rule: null on every chunk but the last
        return sse(chunk)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
