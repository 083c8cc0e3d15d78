"""How the simulator writes Ollama's JSON: timestamps, response lines, chunks, `/api/tags` entries."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from sim.plan import Plan


def rfc3339(ns: int) -> str:
    """`ns` since the epoch as Go's RFC3339Nano in UTC, the way Ollama writes `created_at`."""
    secs, frac = divmod(ns, 1_000_000_000)
    digits = f"{frac:09d}".rstrip("0")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + (f".{digits}Z" if digits else "Z")


def dumps(obj: object) -> bytes:
    """`obj` as compact JSON in raw UTF-8, as Go's encoding/json writes it."""
    # Never \u-escaped: clients must meet real multi-byte sequences split across reads.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def chunk(payload: bytes) -> bytes:
    """`payload` framed as one HTTP/1.1 chunk; an empty payload ends the body."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def model_entry(name: str, modified_at: str) -> dict:
    """One `/api/tags` entry for `name`, with a stable made-up digest and size."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    details = {
        "parent_model": "", "format": "gguf", "family": "sim", "families": ["sim"],
        "parameter_size": "7B", "quantization_level": "Q4_0",
    }
    size = 4_000_000_000 + int(digest[:6], 16)
    return {"name": name, "model": name, "modified_at": modified_at, "size": size, "digest": digest, "details": details}


@dataclass
class Turn:
    """One chat or generate request being answered."""

    req: int
    kind: str  # "chat" or "generate"
    model: str  # as the client spelled it: Ollama echoes that
    prompt: str
    plan: Plan
    ready: float  # time.monotonic() when the model is loaded
    load_ns: int
    started_ns: int

    def line(self, token: str | dict, **fields: object) -> bytes:
        """One response object carrying a token (text, or `{"thinking"}` / `{"tool_calls"}`), newline-terminated."""
        body: dict = {"model": self.model, "created_at": rfc3339(time.time_ns())}
        text = token if isinstance(token, str) else token.get("text", "")
        extra = {} if isinstance(token, str) else {k: v for k, v in token.items() if k != "text"}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text, **extra}
        else:
            body["response"] = text
            if "thinking" in extra:
                body["thinking"] = extra["thinking"]
        return dumps({**body, **fields}) + b"\n"

    def final(self, tokens: list | str = "") -> bytes:
        """The `done` object with Ollama's statistics, all durations in nanoseconds; with the whole
        answer's `tokens` when it was not streamed."""
        items = [tokens] if isinstance(tokens, str) else tokens
        whole: dict = {}
        text = "".join(t for t in items if isinstance(t, str))
        thinking = "".join(t.get("thinking", "") for t in items if isinstance(t, dict))
        calls = [c for t in items if isinstance(t, dict) for c in t.get("tool_calls", ())]
        if thinking:
            whole["thinking"] = thinking
        if calls:
            whole["tool_calls"] = calls
        offsets, count = self.plan.offsets, len(self.plan.tokens)
        stats = {
            "done_reason": self.plan.done_reason,
            "done": True,
            "total_duration": time.perf_counter_ns() - self.started_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": max(1, len(self.prompt.split())),
            "prompt_eval_duration": int(offsets[0] * 1e9),
            "eval_count": count,
            "eval_duration": int((offsets[-1] - offsets[0]) * 1e9),
        }
        if self.kind == "generate":
            stats["context"] = list(range(1, stats["prompt_eval_count"] + count + 1))
        return self.line({**whole, "text": text} if whole else text, **stats)
