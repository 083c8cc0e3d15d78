"""What the agent needs from an inference engine: its models and one streaming chat.

`agent.ollama` implements it for Ollama's native API; an OpenAI-compatible
backend can sit beside it without the worker changing.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class BackendError(Exception):
    """The engine failed a request; the message is meant for the user who asked."""


class ChatStream(Protocol):
    """One answer being generated. Iterating connects and yields its tokens in order.

    Iteration raises `BackendError` when the engine fails, and simply ends after
    `close()`, which any thread may call at any time (even before iterating) and
    which is what makes the engine stop generating. `stats` is set once the
    answer ended normally. A stream may also offer `send()`, which writes the
    request without waiting for the answer (`agent.httpstream`); `JobRun`
    calls it before anything else.
    """

    stats: dict | None

    @property
    def closed(self) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """An inference engine reachable at `url`."""

    url: str

    def models(self) -> list[str]:
        """The model names clients may ask for; raises `BackendError` when unreachable."""
        ...

    def chat(self, model: str, messages: list[dict], options: dict) -> ChatStream:
        """A not-yet-started streaming chat; no I/O happens until it is iterated."""
        ...
