"""A TCP proxy for tests that resets a share of the HTTP exchanges crossing it.

Every exchange on a relayed connection (the client's request bytes, then the
server's reply) draws its fate from a seeded generator: relayed, reset before
the request reaches the server, or reset as soon as the server's reply starts,
that is after the server acted on the request and before the client learns
its outcome.  A reset is a TCP RST to the client (``SO_LINGER`` 0), as a NAT
timing out or a crashing middlebox sends; the server's side is closed.

    with FlakyProxy(server_url, reset_rate=0.1).start() as proxy:
        ...  # point the agent at proxy.url
    proxy.resets  # what was cut, and where
    proxy.refuse("POST /api/v1/inference/stream ")  # reset every such request until refuse(None)
    proxy.refuse_upgrades(403)  # answer every WebSocket upgrade with a 403, as a proxy without WebSockets does

It runs an asyncio loop on a thread of the test process; HTTP/1.1 without
pipelining is assumed (a client sends its next request after the reply).
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit


class Fate(StrEnum):
    RELAY = "relay"
    BEFORE_REQUEST = "reset before the request reached the server"
    AFTER_REQUEST = "reset after the server got the request, before its reply"


@dataclass(frozen=True)
class Reset:
    fate: Fate
    request_line: str       # e.g. "POST /api/v1/inference/stream HTTP/1.1"


class FlakyProxy:
    """Relays to ``target`` (a URL); resets ``reset_rate`` of the exchanges, half of them after the request."""

    def __init__(self, target: str, reset_rate: float = 0.1, seed: int = 0) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.reset_rate = reset_rate
        self._random = random.Random(seed)
        self._refused: str | None = None
        self._upgrade_answer: int | None = None
        self.refused_upgrades = 0
        self.exchanges = 0
        self.resets: list[Reset] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flaky-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._relays: set[_ClientSide] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _ClientSide(self), "127.0.0.1", 0, backlog=1024), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            for relay in list(self._relays):
                relay._close()
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def refuse(self, request_prefix: str | None) -> None:
        """Reset every request whose first line starts with ``request_prefix``, before it reaches the server.

        ``None`` ends it.  Each refused request is recorded in ``resets`` like a random one.
        """
        self._refused = request_prefix

    def refuse_upgrades(self, status: int | None) -> None:
        """Answer every WebSocket upgrade request with ``status`` itself (None: relay them again)."""
        self._upgrade_answer = status

    def _draw(self, request_line: str) -> Fate:
        """One exchange's fate (called on the loop's thread only, so the sequence follows the seed)."""
        self.exchanges += 1
        refused = self._refused
        if refused is not None and request_line.startswith(refused):
            return Fate.BEFORE_REQUEST
        roll = self._random.random()
        if roll >= self.reset_rate:
            return Fate.RELAY
        return Fate.BEFORE_REQUEST if roll < self.reset_rate / 2 else Fate.AFTER_REQUEST


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Abort with an RST rather than a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class _ClientSide(asyncio.Protocol):
    """One client connection and the upstream connection relaying it."""

    def __init__(self, proxy: FlakyProxy) -> None:
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.early: list[bytes] = []        # client bytes that came before the upstream connected
        self.fate: Fate | None = None       # the running exchange's; None between exchanges
        self.request_line = ""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport
        self.proxy._relays.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server, _ = await loop.create_connection(lambda: _ServerSide(self), *self.proxy.target)
        except OSError:
            self._close(reset=True)
            return
        if self.closed:
            server.close()
            return
        self.server = server
        for data in self.early:
            server.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.fate is None:
            self.request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
            status = self.proxy._upgrade_answer
            if status is not None and b"\r\nupgrade: websocket" in data.lower():
                self._answer(status)
                return
            self.fate = self.proxy._draw(self.request_line)
        if self.fate is Fate.BEFORE_REQUEST:
            self._cut()
        elif self.server is None:
            self.early.append(data)
        else:
            self.server.write(data)

    def reply_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.fate is Fate.AFTER_REQUEST:
            self._cut()
            return
        self.fate = None        # the reply has begun: the client's next bytes are a new request
        self.client.write(data)

    def _answer(self, status: int) -> None:
        """Answer the request here, as a proxy that will not upgrade does, and close."""
        self.proxy.refused_upgrades += 1
        body = b"WebSocket upgrades are not allowed through this proxy\n"
        self.client.write(f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
                          f"\r\nConnection: close\r\n\r\n".encode() + body)
        self._close()

    def _cut(self) -> None:
        self.proxy.resets.append(Reset(self.fate, self.request_line))
        self._close(reset=True)

    def _close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._relays.discard(self)
        if reset:
            _reset(self.client)
        else:
            self.client.close()     # after the bytes already written
        if self.server is not None:
            self.server.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()


class _ServerSide(asyncio.Protocol):
    def __init__(self, relay: _ClientSide) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.reply_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._close()
