"""The simulator's OpenAI-compatible routes: `/v1/models` and `/v1/chat/completions`.

The same deterministic tokens, timing and faults as its Ollama routes (a chat
with the same model, messages and seed answers the same text), in the shape
llama.cpp's `llama-server` and vLLM stream: `chat.completion.chunk` events,
the role first, `finish_reason` and (with `stream_options.include_usage`)
`usage` at the end, then `data: [DONE]`.  Tests use it to drive an agent with
`BACKEND=openai` without a real engine.  Mixed into `SimulatorHandler`.
"""
from __future__ import annotations

import time

from protocol.models import canonical_model
from sim.plan import SimError, build_plan
from sim.tokens import chat_prompt
from sim.wire import Turn, chunk, dumps

SSE = "text/event-stream"
JSON = "application/json; charset=utf-8"
# OpenAI's request fields that the plan reads under Ollama's option names.
AS_OPTIONS = {"seed": "seed", "max_tokens": "num_predict", "max_completion_tokens": "num_predict"}


class OpenAIRoutes:
    """Handler methods for the OpenAI routes; errors use OpenAI's error object."""

    def _openai_models(self) -> None:
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "simulator"}
                  for name in self.server.config.models]
        self._send(200, dumps({"object": "list", "data": models}), JSON)

    def _openai_chat(self) -> None:
        try:
            self._openai_answer(self._json_body())
        except SimError as exc:
            error = {"message": exc.message, "type": "invalid_request_error", "param": None, "code": None}
            self._send(exc.status, dumps({"error": error}), JSON)

    def _openai_answer(self, body: dict) -> None:
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            raise SimError(400, "model is required")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise SimError(400, "messages must be a non-empty list of objects")
        if canonical_model(model) not in self.server.models:
            raise SimError(404, f"The model `{model}` does not exist")
        options = {k: v for k, v in body.items() if k.startswith("sim_")}
        options.update({AS_OPTIONS[k]: v for k, v in body.items() if k in AS_OPTIONS and v is not None})
        prompt = chat_prompt(messages)
        plan = build_plan(self.server.config, canonical_model(model), prompt, options)
        stream = body.get("stream") is True
        turn = self._start("openai", model, prompt, plan, stream, body.get("sim_tag"))
        usage = (body.get("stream_options") or {}).get("include_usage") is True
        if stream:
            self._openai_stream(turn, usage)
        else:
            self._openai_whole(turn)

    def _openai_stream(self, turn: Turn, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", SSE)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Sim-Request", str(turn.req))
        self.end_headers()
        plan, emit_log, completion = turn.plan, self.server.emit_log, _completion(turn)
        if not self._write(_event(completion, {"role": "assistant", "content": ""})):
            return self._client_gone(turn, 0)
        for i, token in enumerate(plan.tokens):
            if not self._await_client(turn.ready + plan.offsets[i]):
                return self._client_gone(turn, i)
            if plan.fault_at == i:
                return self._openai_fault(turn, i)
            t = time.time()
            if not self._write(_event(completion, {"content": token})):
                return self._client_gone(turn, i)
            emit_log.record("token", turn.req, t=t, i=i, text=token)
        count = len(plan.tokens)
        if plan.fault_at == count:
            return self._openai_fault(turn, count)
        tail = _event(completion, {}, plan.done_reason)
        if include_usage:
            tail += chunk(b"data: " + dumps({**completion, "choices": [], "usage": _usage(turn)}) + b"\n\n")
        if not self._write(tail + chunk(b"data: [DONE]\n\n") + chunk(b"")):
            return self._client_gone(turn, count)
        emit_log.record("done", turn.req, done_reason=plan.done_reason)

    def _openai_fault(self, turn: Turn, i: int) -> None:
        self.server.emit_log.record("error", turn.req, kind=turn.plan.fault, i=i)
        if turn.plan.fault == "error":
            error = {"message": "simulated failure", "type": "server_error", "param": None, "code": None}
            self._write(chunk(b"data: " + dumps({"error": error}) + b"\n\n") + chunk(b""))
        else:
            self._drop()

    def _openai_whole(self, turn: Turn) -> None:
        if not self._await_whole(turn):
            return
        plan = turn.plan
        message = {"role": "assistant", "content": "".join(plan.tokens)}
        answer = {**_completion(turn), "object": "chat.completion", "usage": _usage(turn),
                  "choices": [{"index": 0, "message": message, "finish_reason": plan.done_reason}]}
        self._send(200, dumps(answer), JSON)
        self.server.emit_log.record("done", turn.req, done_reason=plan.done_reason)


def _completion(turn: Turn) -> dict:
    return {"id": f"chatcmpl-sim-{turn.req}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": turn.model}


def _event(completion: dict, delta: dict, finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return chunk(b"data: " + dumps({**completion, "choices": [choice]}) + b"\n\n")


def _usage(turn: Turn) -> dict:
    prompt = max(1, len(turn.prompt.split()))
    return {"prompt_tokens": prompt, "completion_tokens": len(turn.plan.tokens),
            "total_tokens": prompt + len(turn.plan.tokens)}
