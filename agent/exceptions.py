"""What the agent's exchanges with the server can end in, as exceptions its code acts on."""
from __future__ import annotations


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


class MalformedJob(AgentError):
    """A poll answered 200 with something that is not a valid job; `job_id` when it could be read."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class UpgradeRefused(ProtocolError):
    """The server, or a proxy on the way, answered the WebSocket upgrade with something else than 101.

    `TRANSPORT=auto` then falls back to the HTTP protocol; `status` is the answer's, when there was one.
    """
