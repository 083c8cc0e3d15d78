"""A TCP delay proxy that puts an emulated WAN between agents and the server.

`python -m bench.proxy --target HOST:PORT --rtt-ms 40` prints
`proxy listening on http://HOST:PORT` once it accepts connections.

Every chunk of bytes read from one side is written to the other side `rtt/2`
after it was read, in order, per direction: a request and its answer cost one
round trip, and POSTs over one kept-alive connection cost one round trip each,
never more (no bandwidth limit, no loss). A new connection also pays for the
TCP handshake it skipped on loopback: the first bytes a client sends are held
until one round trip after the accept, which is when a real SYN, SYN-ACK would
have let it send them. So at `--rtt-ms 40`, a new connection plus one POST
costs 80 ms, the figure the diagnosis measured. Timers run on epoll, which
rounds up to whole milliseconds: a chunk is up to 1 ms late.

The benchmark uses it only for the WAN: even relaying at once, a third process
on the path costs about 0.4 ms per direction on a 2-core VM, which loopback
figures should not carry.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

CLOCK_SLACK = 0.0002  # a timer may fire this much before its chunk is due: deliver it then


class Direction:
    """Bytes one way: each chunk is written at `max(read time, not_before) + delay`, in order.

    With nothing due later, a chunk is written from the read callback itself:
    relaying at once costs one callback, not a task switch per chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, not_before: float,
                 on_eof: Callable[[], None]) -> None:
        self.loop = loop
        self.delay, self.not_before = delay, not_before
        self.on_eof = on_eof
        self.transport: asyncio.Transport | None = None  # the destination, once connected
        self.pending: deque[tuple[float, bytes | None]] = deque()  # b"": EOF, None: close
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None) -> None:
        now = time.monotonic()  # the event loop's clock too
        due = max(now, self.not_before) + self.delay
        if not self.pending and due <= now and self.transport is not None:
            self._deliver(data)
        else:
            self.pending.append((due, data))
            self._arm()

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._flush()

    def _arm(self) -> None:
        if self.timer is None and self.pending and self.transport is not None:
            self.timer = self.loop.call_at(self.pending[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        while self.pending and self.pending[0][0] <= time.monotonic() + CLOCK_SLACK:
            self._deliver(self.pending.popleft()[1])
        self._arm()

    def _deliver(self, data: bytes | None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data is None:
            transport.close()
        elif data:
            transport.write(data)
        else:
            if transport.can_write_eof():
                transport.write_eof()
            self.on_eof()


class Connection:
    """One client connection relayed to the target."""

    def __init__(self, target: tuple[str, int], rtt: float, client: asyncio.Transport) -> None:
        self.client = client
        self.server: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        # The handshake a loopback connect skipped: the client's first bytes leave one round trip late.
        self.upstream = Direction(loop, rtt / 2, time.monotonic() + rtt, self._eof_sent)
        self.downstream = Direction(loop, rtt / 2, 0.0, self._eof_sent)
        self.downstream.attach(client)
        self._eofs = 0
        loop.create_task(self._connect(loop, target))

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int]) -> None:
        try:
            transport, _ = await loop.create_connection(lambda: ServerSide(self), *target)
        except OSError as exc:
            log.warning("target %s:%d unreachable: %s", *target, exc)
            self.client.close()
            return
        self.server = transport
        self.upstream.attach(transport)

    def _eof_sent(self) -> None:
        # Both sides have closed their half: nothing more can flow either way.
        self._eofs += 1
        if self._eofs == 2:
            self.client.close()
            if self.server is not None:
                self.server.close()

    def lost(self) -> None:
        """Either side is gone: the other is closed once the bytes already read have reached it."""
        self.upstream.push(None)
        self.downstream.push(None)


class ClientSide(asyncio.Protocol):
    """The agent's side of a relayed connection."""

    def __init__(self, target: tuple[str, int], rtt: float) -> None:
        self.target, self.rtt = target, rtt
        self.connection: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection = Connection(self.target, self.rtt, transport)

    def data_received(self, data: bytes) -> None:
        self.connection.upstream.push(data)

    def eof_received(self) -> bool:
        self.connection.upstream.push(b"")
        return True  # keep the other half open for the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.lost()


class ServerSide(asyncio.Protocol):
    """The server's side of a relayed connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def data_received(self, data: bytes) -> None:
        self.connection.downstream.push(data)

    def eof_received(self) -> bool:
        self.connection.downstream.push(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.lost()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], target: tuple[str, int], rtt: float) -> None:
    """Relay until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientSide(target, rtt), *listen, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"proxy listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: %(default)s)")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server to relay to")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="emulated round trip (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must not be negative")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench.proxy %(levelname)s %(message)s")
    asyncio.run(serve(_address(args.listen), _address(args.target), args.rtt_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
