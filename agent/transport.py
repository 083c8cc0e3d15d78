"""How the worker reaches the server: one small interface, the HTTP protocol or the WebSocket, or `auto`.

The worker asks a `Transport` for the next job (`next_job`) and for the
`Poster` that carries a job's tokens back; it never branches on which one it
has. `TRANSPORT=auto` (the default) opens the WebSocket and falls back to the
HTTP poll/POST protocol when the server or a proxy refuses the upgrade,
saying so once in the log; `ws` and `http` use one only.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.batcher import TokenBatcher
from agent.client import ServerClient
from agent.config import AgentConfig
from agent.exceptions import UpgradeRefused
from agent.job import Job, Poster
from agent.legacy import LegacyPoster
from agent.socket_client import SocketClient

log = logging.getLogger(__name__)

# How long one `next_job` call waits for a pushed job: only bounds how soon the worker notices a stop or a
# change of models; a job is handed over the moment its frame arrives.
SOCKET_WAIT = 1.0


class Transport(Protocol):
    """What the worker needs from the way it talks to the server."""

    name: str
    api_base: str

    def next_job(self, models: Sequence[str], slots: int, kinds: Sequence[str] | None) -> Job | None:
        """Tell the server what we serve (``kinds``: the job kinds we run; None: plain chats only, as older agents)
        and how many more jobs we can take; a job, or None for now."""

    def idle_delay(self, started: float) -> float:
        """Seconds to wait before asking again, after `next_job` (begun at `started`) brought nothing."""

    def poster(self, job_id: str, on_cancel: Callable[[], None] | None, max_items: int | None = None) -> Poster:
        """Where a job's tokens go; ``max_items`` caps the items one request carries (large embedding vectors)."""

    def wake(self) -> None:
        """A slot came free: end a wait in `next_job` if the transport can."""

    def close(self) -> None: ...


class HttpTransport:
    """The HTTP protocol: polls (long or short) and one POST in flight per job."""

    name = "http"

    def __init__(self, client: ServerClient, config: AgentConfig) -> None:
        self.client, self.config = client, config
        self.api_base = client.api_base

    def next_job(self, models: Sequence[str], slots: int, kinds: Sequence[str] | None) -> Job | None:
        return self.client.poll(models, slots, self.config.long_poll, kinds)

    def idle_delay(self, started: float) -> float:
        # Long poll: ask again at once, unless the server answered 204 without holding the poll.
        if self.config.long_poll and time.monotonic() - started >= self.config.poll_interval:
            return 0.0
        return self.config.poll_interval

    def poster(self, job_id: str, on_cancel: Callable[[], None] | None, max_items: int | None = None) -> Poster:
        cfg = self.config
        if cfg.legacy:
            return LegacyPoster(job_id, self.client, on_cancel)
        return TokenBatcher(job_id, self.client.send, max_tokens=cfg.batch_max_tokens, max_delay=cfg.batch_max_delay,
                            adaptive=cfg.adaptive, on_cancel=on_cancel, max_items=max_items)

    def wake(self) -> None:
        """A parked poll cannot be cut short; the next one carries the new slot count."""

    def close(self) -> None:
        self.client.close()


class SocketTransport:
    """The WebSocket: jobs pushed the moment they are queued, tokens sent as frames as they come."""

    name = "ws"

    def __init__(self, client: SocketClient) -> None:
        self.client = client
        self.api_base = client.api_base

    def next_job(self, models: Sequence[str], slots: int, kinds: Sequence[str] | None) -> Job | None:
        return self.client.next_job(models, slots, SOCKET_WAIT, kinds)

    def idle_delay(self, started: float) -> float:
        return 0.0          # next_job itself waited for a push

    def poster(self, job_id: str, on_cancel: Callable[[], None] | None, max_items: int | None = None) -> Poster:
        return self.client.poster(job_id, on_cancel)      # frames are cut to the frame size, vectors included

    def wake(self) -> None:
        self.client.wake()

    def close(self) -> None:
        self.client.close()


class AutoTransport:
    """The WebSocket while the server accepts it; the HTTP protocol from the first refused upgrade on."""

    def __init__(self, socket: SocketTransport, http: HttpTransport, name: str = "agent") -> None:
        self.socket, self.http, self._name = socket, http, name
        self.active: Transport = socket
        self.api_base = http.api_base

    @property
    def name(self) -> str:
        return self.active.name

    def next_job(self, models: Sequence[str], slots: int, kinds: Sequence[str] | None) -> Job | None:
        if self.active is self.socket:
            try:
                return self.socket.next_job(models, slots, kinds)
            except UpgradeRefused as exc:
                log.warning("%s: TRANSPORT=auto: the WebSocket upgrade was refused (%s), by the server or a proxy "
                            "on the way: using the HTTP poll/POST protocol from now on", self._name, exc)
                self.socket.close()
                self.active = self.http
        return self.http.next_job(models, slots, kinds)

    def idle_delay(self, started: float) -> float:
        return self.active.idle_delay(started)

    def poster(self, job_id: str, on_cancel: Callable[[], None] | None, max_items: int | None = None) -> Poster:
        return self.active.poster(job_id, on_cancel, max_items)

    def wake(self) -> None:
        self.active.wake()

    def close(self) -> None:
        self.socket.close()
        self.http.close()


def build_transport(config: AgentConfig, client: ServerClient, name: str) -> Transport:
    """The transport `config.transport` names (the legacy profile always polls over HTTP)."""
    http = HttpTransport(client, config)
    if config.legacy or config.transport == "http":
        return http
    socket = SocketTransport(SocketClient(config.api_base, config.agent_id, config.agent_secret, name=name))
    return socket if config.transport == "ws" else AutoTransport(socket, http, name)
