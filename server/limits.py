"""Admission: how many chat streams one worker holds, in all and per client address.

Every open chat stream (native SSE, a resumed stream, the OpenAI and Ollama
doors, streamed or not) holds a connection, a greenlet and ~40 KB until its
job ends.  9,999 of them from one client once made ``/healthz`` wait 15 s and
the worker grow from 41 to 432 MB; beyond ``MAX_STREAMS`` in all or
``MAX_STREAMS_PER_CLIENT`` from one address a chat now gets 429
``too_many_streams`` before anything is stored, so agents, ``/healthz`` and
other clients keep their connections.  Counted per worker process.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from flask import Flask, current_app, g, request

from .errors import TooManyRequests


@dataclass
class StreamSlot:
    """One admitted stream; ``release`` (idempotent) gives the slot back."""

    slots: StreamSlots
    client: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots.release(self.client)


class StreamSlots:
    """Open streams in this process, in all and per client address."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> StreamSlot:
        """A slot for one more stream from ``client``; TooManyRequests beyond either limit."""
        with self._lock:
            if self.open >= self.total:
                raise TooManyRequests(f"this server holds {self.total} streams, its limit: retry later",
                                      code="too_many_streams")
            held = self._by_client.get(client, 0)
            if held >= self.per_client:
                raise TooManyRequests(f"{held} streams are open from your address, the limit: close one first",
                                      code="too_many_streams")
            self.open += 1
            self._by_client[client] = held + 1
        return StreamSlot(self, client)

    def release(self, client: str) -> None:
        with self._lock:
            self.open -= 1
            left = self._by_client.get(client, 1) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)


def stream_slots(app: Flask) -> StreamSlots:
    return app.extensions["stream_slots"]


def client_address() -> str:
    """The client's address: the socket's peer, or the last X-Forwarded-For hop when ORCH_TRUST_FORWARDED_FOR.

    The last hop is the one our own proxy appended (nginx's ``$proxy_add_x_forwarded_for``):
    a client can put anything before it, nothing after.
    """
    if current_app.config["TRUST_FORWARDED_FOR"]:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return request.remote_addr or "unknown"


def admit() -> None:
    """Take a stream slot for this request before anything is stored (429 beyond the limits); idempotent."""
    if g.get("stream_slot") is None:
        g.stream_slot = stream_slots(current_app).take(client_address())


def hand_over() -> StreamSlot:
    """The request's slot, now owned by its stream (released when the stream closes)."""
    admit()
    return g.pop("stream_slot")


def _release_unclaimed(_exc: BaseException | None = None) -> None:
    # A request that took a slot and failed before its stream began (a 404 model_not_found...).
    slot = g.pop("stream_slot", None)
    if slot is not None:
        slot.release()


def init_app(app: Flask) -> None:
    app.extensions["stream_slots"] = StreamSlots(app.config["MAX_STREAMS"], app.config["MAX_STREAMS_PER_CLIENT"])
    app.teardown_request(_release_unclaimed)
