"""From raw observations to figures: one chat's latencies and losses, then a configuration's summary.

A chat is measured against the simulator's emission log: the simulator records
when it wrote each token (`time.time()`), the client when it read it, so a
token's added latency is what everything between Ollama and the user costs.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from bench.client import Trace

BACKLOG_TOKENS = 10


@dataclass
class ChatResult:
    """One chat as measured; times in ms, `arrived_ms`/`emitted_ms` relative to the client's request."""

    config: str
    network: str
    case: str  # sequential | concurrent
    round: int
    tag: str
    error: str | None = None
    expected: int = 0  # tokens the simulator emitted
    delivered: int = 0  # of those, received in order
    lost: int = 0
    duplicated: int = 0
    pickup_ms: float | None = None  # until the simulated Ollama got the request: queue, poll, agent
    ttft_ms: float | None = None
    sim_ttft_ms: float | None = None
    ttft_overhead_ms: float | None = None
    total_ms: float | None = None
    gap_avg_ms: float | None = None
    gap_max_ms: float | None = None
    backlog_ms: float | None = None  # added latency of the last tokens minus that of the first ones
    emitted_ms: list[float] = field(default_factory=list)
    arrived_ms: list[float] = field(default_factory=list)
    added_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.lost == 0 and self.duplicated == 0

    def to_json(self) -> dict:
        return {k: _rounded(v) for k, v in asdict(self).items()}


@dataclass
class Window:
    """What one sequential chat or one concurrent batch cost, measured around it."""

    config: str
    network: str
    case: str
    started: float
    ended: float
    tokens: int = 0
    agent_requests: int = 0
    agent_connections: int = 0
    agent_frames: int = 0         # WebSocket frames the agents sent (the socket's counterpart of requests)
    server_cpu_s: float = 0.0
    agent_cpu_s: float = 0.0

    def to_json(self) -> dict:
        return {k: _rounded(v) for k, v in asdict(self).items()}


def measure_chat(result: ChatResult, trace: Trace, records: Sequence[dict]) -> ChatResult:
    """Fill `result` from the client's `trace` and the simulator's `records` for this chat."""
    start = next((r for r in records if r["event"] == "start"), None)
    emitted = sorted((r for r in records if r["event"] == "token"), key=lambda r: r["i"])
    failures = [r for r in records if r["event"] in ("error", "client_gone")]
    if start is None:
        result.error = trace.error or "the simulator never saw this chat"
        return result
    result.expected = len(emitted)
    if failures:
        result.error = f"simulator: {failures[0]['event']} at token {failures[0].get('i')}"
    elif trace.error:
        result.error = trace.error
    elif not trace.done:
        result.error = "no end of stream"

    tokens = _first_of_each_id(trace)
    result.duplicated = len(trace.tokens) - len(tokens)
    expected_text = "".join(r["text"] for r in emitted)
    received_text = "".join(t.text for t in tokens)
    common = _common_prefix(expected_text, received_text)
    ends = list(_cumulative(len(t.text) for t in tokens))
    arrivals = []
    position = 0
    for record in emitted:
        position += len(record["text"])
        if position > common:
            break
        arrivals.append(tokens[bisect.bisect_left(ends, position)].at)
    result.delivered = len(arrivals)
    result.lost = result.expected - result.delivered
    if len(received_text) > len(expected_text) and common == len(expected_text):
        # More text than was generated, after all of it: the tail was sent twice.
        result.duplicated += len(tokens) - bisect.bisect_left(ends, len(expected_text)) - 1

    t0 = trace.started
    result.pickup_ms = (start["t"] - t0) * 1000
    result.emitted_ms = [(r["t"] - t0) * 1000 for r in emitted]
    result.arrived_ms = [(t - t0) * 1000 for t in arrivals]
    # Only delivered tokens have an arrival: the emitted list may be longer.
    result.added_ms = [a - e for a, e in zip(result.arrived_ms, result.emitted_ms, strict=False)]
    if arrivals:
        result.ttft_ms = result.arrived_ms[0]
        result.sim_ttft_ms = (emitted[0]["t"] - start["t"]) * 1000
        result.ttft_overhead_ms = result.ttft_ms - result.sim_ttft_ms
        result.total_ms = result.arrived_ms[-1]
        gaps = _gaps(result)
        if gaps:
            result.gap_avg_ms = sum(gaps) / len(gaps)
            result.gap_max_ms = max(gaps)
        result.backlog_ms = _backlog(result.added_ms)
    return result


def _backlog(added: Sequence[float], tokens: int = BACKLOG_TOKENS) -> float | None:
    """How much later the last `tokens` tokens arrive than the first ones: ~0 unless a queue builds up."""
    if len(added) < 2 * tokens:
        return None
    return sum(added[-tokens:]) / tokens - sum(added[:tokens]) / tokens


def _first_of_each_id(trace: Trace) -> list:
    seen: set[int] = set()
    tokens = []
    for token in trace.tokens:
        if token.id is not None:
            if token.id in seen:
                continue
            seen.add(token.id)
        tokens.append(token)
    return tokens


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cumulative(values: Iterable[int]) -> Iterable[int]:
    total = 0
    for value in values:
        total += value
        yield total


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0..100), linearly interpolated between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


SUMMARY_FIELDS = (
    "config", "network", "case", "chats", "failed", "pickup_p50_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_overhead_p50_ms",
    "ttft_overhead_p95_ms", "added_p50_ms", "added_p95_ms", "added_max_ms", "gap_avg_ms", "gap_max_ms",
    "total_p50_ms", "stream_p50_ms", "backlog_p50_ms", "requests_per_100_tokens", "frames_per_100_tokens",
    "connections_per_100_tokens", "server_cpu_s_per_100_tokens", "agent_cpu_s_per_100_tokens", "cpu_ms_per_token",
    "tokens", "lost", "duplicated",
)


def summarize(config: str, network: str, case: str, chats: Sequence[ChatResult],
              windows: Sequence[Window]) -> dict:
    """One row of the report: `SUMMARY_FIELDS` over every chat and window of one configuration."""
    measured = [c for c in chats if c.ttft_ms is not None]
    added = [a for c in chats for a in c.added_ms]
    gaps = [g for c in measured for g in _gaps(c)]
    tokens = sum(w.tokens for w in windows) or sum(c.delivered for c in chats)
    per_100 = (lambda v: v * 100 / tokens) if tokens and windows else (lambda v: None)
    direct = config == "direct"
    row = {
        "config": config, "network": network, "case": case, "chats": len(chats),
        "failed": sum(1 for c in chats if c.error is not None),
        "pickup_p50_ms": percentile([c.pickup_ms for c in measured], 50),
        "ttft_p50_ms": percentile([c.ttft_ms for c in measured], 50),
        "ttft_p95_ms": percentile([c.ttft_ms for c in measured], 95),
        "ttft_overhead_p50_ms": percentile([c.ttft_overhead_ms for c in measured], 50),
        "ttft_overhead_p95_ms": percentile([c.ttft_overhead_ms for c in measured], 95),
        "added_p50_ms": percentile(added, 50), "added_p95_ms": percentile(added, 95),
        "added_max_ms": max(added, default=None),
        "gap_avg_ms": sum(gaps) / len(gaps) if gaps else None, "gap_max_ms": max(gaps, default=None),
        "total_p50_ms": percentile([c.total_ms for c in measured], 50),
        "stream_p50_ms": percentile([c.arrived_ms[-1] - c.arrived_ms[0] for c in measured], 50),
        "backlog_p50_ms": percentile([c.backlog_ms for c in measured if c.backlog_ms is not None], 50),
        "requests_per_100_tokens": None if direct else per_100(sum(w.agent_requests for w in windows)),
        "frames_per_100_tokens": None if direct else per_100(sum(w.agent_frames for w in windows)),
        "connections_per_100_tokens": None if direct else per_100(sum(w.agent_connections for w in windows)),
        "cpu_ms_per_token": None if direct else per_100(sum(w.server_cpu_s + w.agent_cpu_s for w in windows) * 10),
        "server_cpu_s_per_100_tokens": None if direct else per_100(sum(w.server_cpu_s for w in windows)),
        "agent_cpu_s_per_100_tokens": None if direct else per_100(sum(w.agent_cpu_s for w in windows)),
        "tokens": sum(c.delivered for c in chats),
        "lost": sum(c.lost for c in chats), "duplicated": sum(c.duplicated for c in chats),
    }
    return {name: _rounded(row[name]) for name in SUMMARY_FIELDS}


def _gaps(chat: ChatResult) -> list[float]:
    return [b - a for a, b in pairwise(chat.arrived_ms)]


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
