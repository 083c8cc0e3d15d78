"""The status page's charts: delivered tokens/s and first-token p50/p95, bucket by bucket.

Computed from job timings (``stats.streamed_jobs``), never from the chunks
table: under load that would read millions of rows per refresh.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .storage.stats import percentile


def bucket_series(rows: Iterable[tuple], now: float, window: float, points: int) -> dict[str, Any]:
    """Per bucket: tokens/s, and first-token p50/p95 of the jobs whose first token fell in it.

    Buckets sit on multiples of their width, so a chart refreshed every few
    seconds keeps its points still; the newest one is still filling (its
    ``seconds`` say how much of it has passed).  A job's tokens are spread
    evenly from its first token to its end (now, while running): the jobs
    table knows when an answer streamed, not when each chunk came.
    """
    width = window / points
    first_start = (math.floor(now / width) - points + 1) * width
    tokens = [0.0] * points
    latencies: list[list[float]] = [[] for _ in range(points)]
    for created, first_token, finished, count in rows:
        index = math.floor((first_token - first_start) / width)
        if 0 <= index < points:
            latencies[index].append(first_token - created)
        _spread(tokens, count, first_token, max(first_token, now if finished is None else finished), first_start, width)
    buckets = []
    for i in range(points):
        start = first_start + i * width
        seconds = min(width, now - start)
        samples = sorted(latencies[i])
        buckets.append({"start": start, "seconds": round(seconds, 3),
                        "tokens_per_second": round(tokens[i] / seconds, 2) if seconds > 0 else 0.0,
                        "first_tokens": len(samples),
                        "first_token_p50": percentile(samples, 50), "first_token_p95": percentile(samples, 95)})
    return {"bucket_seconds": width, "buckets": buckets}


def _spread(tokens: list[float], count: int, start: float, end: float, first_start: float, width: float) -> None:
    """Add ``count`` tokens streamed evenly over ``[start, end]`` to the buckets it overlaps."""
    first = max(0, math.floor((start - first_start) / width))
    last = min(len(tokens) - 1, math.floor((end - first_start) / width))
    if end == start:
        if first == last:  # inside the window: one bucket takes them all
            tokens[first] += count
        return
    for i in range(first, last + 1):
        bucket_start = first_start + i * width
        overlap = min(end, bucket_start + width) - max(start, bucket_start)
        if overlap > 0:
            tokens[i] += count * overlap / (end - start)
