"""What the agent needs from an inference engine: its models and one streaming chat.

`agent.ollama` implements it for Ollama's native API; an OpenAI-compatible
backend can sit beside it without the worker changing.  A stream yields the
answer's chunks in their wire form (`protocol.deltas`): a string for plain
text, an object for thinking, tool calls or an embedding vector.
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

    def __iter__(self) -> Iterator[str | dict]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """An inference engine reachable at `url`."""

    url: str
    kinds: tuple[str, ...]    # the job kinds it runs (protocol.models)

    def models(self) -> list[str]:
        """The model names clients may ask for; raises `BackendError` when unreachable."""
        ...

    def chat(self, model: str, messages: list[dict], options: dict, request: dict | None = None) -> ChatStream:
        """A not-yet-started streaming chat (`request`: tools, format, think, keep_alive); no I/O until iterated."""
        ...

    def embed(self, model: str, inputs: list[str], options: dict, request: dict | None = None) -> ChatStream:
        """A not-yet-started embedding of `inputs`: it yields one `{"embedding": [...]}` item per input."""
        ...

    def describe(self) -> dict | None:
        """What the engine says of its models (the report of `protocol.models`), or None when it says nothing."""
        ...
