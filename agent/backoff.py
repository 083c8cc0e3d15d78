"""The agent's one retry pause: exponential back-off with jitter, capped (the poll loop's and the batcher's)."""
from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_FACTOR = 2.0
# base * factor ** 32 is past any cap already; bounding the exponent keeps the power finite.
MAX_EXPONENT = 32


@dataclass(frozen=True)
class Backoff:
    """Pause before retry `attempt` (0 first): `base * factor ** attempt`, at most `cap`, then jittered."""

    base: float
    cap: float
    factor: float = DEFAULT_FACTOR

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (counted from 0)."""
        delay = min(self.cap, self.base * self.factor ** min(attempt, MAX_EXPONENT))
        # Jitter spreads the agents that all lost the server at once; keeping half the
        # delay guarantees the back-off still grows.
        return delay * random.uniform(0.5, 1.0)


# Reaching the server (a poll, the WebSocket): 0.1 s, 0.2 s, ... up to 10 s between attempts.
SERVER_BACKOFF = Backoff(base=0.1, cap=10.0)
