"""Replay protection for signed agent requests: each nonce is accepted once while its timestamp is valid.

``NonceMemory.accept(agent_id, nonce, timestamp)`` remembers the nonce of a
request whose signature was verified until the request's timestamp leaves the
skew window (after that the timestamp check refuses the copy anyway).  Per
agent, nonces sit in buckets by timestamp second, so forgetting is dropping
whole buckets.  Per process: see docs/protocol.md ("Replays") for what that
means behind several workers or hosts.
"""
from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field


class Replayed(Exception):
    """This nonce was already accepted from this agent."""


class MemoryFull(Exception):
    """This agent sent more nonces inside one window than the memory holds: refuse, never forget early."""


@dataclass
class _AgentNonces:
    nonces: dict[str, int] = field(default_factory=dict)            # nonce -> its request's timestamp
    by_second: dict[int, list[str]] = field(default_factory=dict)   # timestamp -> nonces stamped with it
    seconds: list[int] = field(default_factory=list)                # heap of by_second's keys


class NonceMemory:
    """Nonces seen per agent; at most ``per_agent`` per agent, each kept ``window`` seconds past its timestamp."""

    def __init__(self, window: float, per_agent: int) -> None:
        self.window = window
        self.per_agent = per_agent
        self._agents: dict[str, _AgentNonces] = {}
        self._lock = threading.Lock()

    def accept(self, agent_id: str, nonce: str, timestamp: int, now: float) -> None:
        """Record ``nonce``; raises ``Replayed`` if it was seen inside the window, ``MemoryFull`` past the bound."""
        with self._lock:
            seen = self._agents.setdefault(agent_id, _AgentNonces())
            self._forget_expired(seen, now)
            if nonce in seen.nonces:
                raise Replayed(nonce)
            if len(seen.nonces) >= self.per_agent:
                raise MemoryFull(agent_id)
            seen.nonces[nonce] = timestamp
            bucket = seen.by_second.get(timestamp)
            if bucket is None:
                bucket = seen.by_second[timestamp] = []
                heapq.heappush(seen.seconds, timestamp)
            bucket.append(nonce)

    def _forget_expired(self, seen: _AgentNonces, now: float) -> None:
        # A request stamped `second` is accepted until now = second + window: keep its nonce that long.
        while seen.seconds and seen.seconds[0] + self.window + 1 < now:
            for nonce in seen.by_second.pop(heapq.heappop(seen.seconds)):
                del seen.nonces[nonce]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(a.nonces) for a in self._agents.values())
