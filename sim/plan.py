"""What one simulated answer will be: settings, per-request `options.sim_*` overrides, the plan."""
from __future__ import annotations

import random
from dataclasses import dataclass

from sim.tokens import generate_tokens

DEFAULT_MODELS = "sim"
DEFAULT_LOAD_MS = 0.0
DEFAULT_FIRST_TOKEN_MS = 200.0
DEFAULT_INTERVAL_MS = 20.0
DEFAULT_TOKENS = 40
DEFAULT_JITTER_MS = 0.0
DEFAULT_SEED = 0


class SimError(Exception):
    """A request the simulator answers with `status` and Ollama's `{"error": message}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SimConfig:
    """The command-line settings; a request's `options.sim_*` keys override them."""

    models: tuple[str, ...] = (DEFAULT_MODELS,)
    load_ms: float = DEFAULT_LOAD_MS
    first_token_ms: float = DEFAULT_FIRST_TOKEN_MS
    interval_ms: float = DEFAULT_INTERVAL_MS
    tokens: int = DEFAULT_TOKENS
    jitter_ms: float = DEFAULT_JITTER_MS
    seed: int = DEFAULT_SEED


@dataclass(frozen=True)
class Plan:
    """One answer: its tokens, when each is due (seconds after the model is ready) and any fault."""

    tokens: list[str]
    offsets: list[float]  # len(tokens) + 1 entries; the last is the final line's
    done_reason: str
    fault_at: int | None = None
    fault: str | None = None  # "error" or "drop"
    status: int | None = None  # answer at once with this HTTP status


def _option(options: dict, key: str, kind: type, default, minimum: float | None = 0):
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise SimError(400, f"option {key} must be {'an integer' if kind is int else 'a number'}")
    if minimum is not None and value < minimum:
        raise SimError(400, f"option {key} must be at least {minimum}")
    return kind(value)


def build_plan(config: SimConfig, model: str, prompt: str, options: dict) -> Plan:
    """Apply a request's `options` over `config` to decide its tokens, timing and fault."""
    seed = _option(options, "sim_seed", int, _option(options, "seed", int, config.seed, None), None)
    count = _option(options, "sim_tokens", int, config.tokens)
    cap = _option(options, "num_predict", int, -1, None)
    done_reason = "stop"
    if 0 < cap < count:
        count, done_reason = cap, "length"
    interval = _option(options, "sim_interval_ms", float, config.interval_ms)
    jitter = _option(options, "sim_jitter_ms", float, config.jitter_ms)
    rng = random.Random(f"jitter|{seed}")
    at = _option(options, "sim_first_token_ms", float, config.first_token_ms) / 1000
    offsets = []
    for i in range(count):
        if i:
            at += max(0.0, interval + rng.uniform(-jitter, jitter)) / 1000
        offsets.append(at)
    offsets.append(at)  # the final line follows the last token at once
    faults = [
        (at_index, name)
        for name in ("error", "drop")
        if (at_index := _option(options, f"sim_{name}_after", int, None)) is not None and at_index <= count
    ]
    fault_at, fault = min(faults) if faults else (None, None)
    status = _option(options, "sim_status", int, None, 400)
    if status is not None and status > 599:
        raise SimError(400, "option sim_status must be an HTTP error status")
    return Plan(generate_tokens(seed, count, model, prompt), offsets, done_reason, fault_at, fault, status)
