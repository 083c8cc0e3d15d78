"""What the agent's exchanges with the server can end in, as exceptions its code acts on."""
from __future__ import annotations

import time


class AgentError(Exception):
    """Base of the agent's errors; `status` is the HTTP status when there was one."""

    def __init__(self, message: str = "", *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransportError(AgentError):
    """The POST may not have been stored (connection error, timeout, 5xx): retry it unchanged."""


class SeqConflict(AgentError):
    """409: the POST would leave a gap; the server holds every chunk before `expected_seq`."""

    def __init__(self, expected_seq: int) -> None:
        super().__init__(f"server expects seq {expected_seq}", status=409)
        self.expected_seq = expected_seq


class JobGone(AgentError):
    """410, 404 or 403: this agent no longer holds the job; stop, do not retry."""


class ProtocolError(AgentError):
    """The server answered something a correct server never does, e.g. a seq we never sent."""


class SignatureRejected(AgentError):
    """401: the server does not accept our signature (wrong AGENT_ID/AGENT_SECRET, removed agent, clock skew)."""


class AgentRevoked(SignatureRejected):
    """401 ``agent_revoked``: an operator removed this agent; its credentials will never work again."""


class ClockSkew(SignatureRejected):
    """401 ``stale_timestamp``: this host's clock is ``offset`` seconds behind the server's (negative: ahead)."""

    def __init__(self, offset: float | None, *, status: int | None = 401) -> None:
        told = f"by {offset:+.0f} s" if offset is not None else "by more than the server allows"
        super().__init__(f"this host's clock differs from the server's {told}: synchronise it (NTP)", status=status)
        self.offset = offset


class MalformedJob(AgentError):
    """A poll answered 200 with something that is not a valid job; `job_id` when it could be read."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class UpgradeRefused(ProtocolError):
    """The server, or a proxy on the way, answered the WebSocket upgrade with something else than 101.

    `TRANSPORT=auto` then falls back to the HTTP protocol; `status` is the answer's, when there was one.
    """


def rejection(message: str, code: object = None, server_time: object = None, status: int = 401) -> SignatureRejected:
    """What a 401 means, from its error code: revoked, a clock too far off (by how much), or a bad signature."""
    if code == "agent_revoked":
        return AgentRevoked(message, status=status)
    if code == "stale_timestamp":
        offset = server_time - time.time() if isinstance(server_time, int | float) else None
        return ClockSkew(offset)
    return SignatureRejected(message, status=status)
