"""Who may call what: signed agents, the admin token, user API keys."""
from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from functools import wraps

from flask import current_app, g, request

from protocol import signing

from . import body, replay
from .errors import TooManyRequests, Unauthorized
from .storage import agents, get_db


def _path_and_query() -> str:
    # Sign what was on the wire: gunicorn and Werkzeug keep it in RAW_URI.
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw:
        return raw
    query = request.query_string.decode("latin-1")
    return request.path + ("?" + query if query else "")


def verify_agent() -> str:
    """Check the request's signature and nonce; returns the agent id or raises 401 (429: nonce memory full).

    Any signed request goes through here: polls, chunk POSTs, and later the WebSocket upgrade.
    """
    agent_id = request.headers.get(signing.HEADER_ID)
    timestamp = request.headers.get(signing.HEADER_TIMESTAMP)
    signature = request.headers.get(signing.HEADER_SIGNATURE)
    if not (agent_id and timestamp and signature):
        raise Unauthorized("missing X-Agent-Id, X-Agent-Timestamp or X-Agent-Signature", code="missing_signature")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise Unauthorized("X-Agent-Timestamp must be unix seconds", code="bad_timestamp") from None
    config, now_ns = current_app.config, time.time_ns()
    skew = config["SIGNATURE_SKEW"]
    # In integer nanoseconds: a timestamp of hundreds of digits overflowed a float subtraction (a 500).
    if abs(now_ns - sent_at * 1_000_000_000) > skew * 1e9:
        # The server's clock in the answer: the agent can say by how much its own is off.
        raise Unauthorized(f"X-Agent-Timestamp is more than {skew:g} s from the server's clock (ORCH_SIGNATURE_SKEW):"
                           " synchronise this host's clock (NTP)", code="stale_timestamp",
                           extra={"server_time": now_ns / 1e9})
    nonce = _nonce(config["ALLOW_NO_NONCE"])
    found = agents.signing_key(get_db(), agent_id, config["SECRET_KEY"])
    # One message for unknown agents and bad signatures: don't reveal which ids exist.
    if found is None or not signing.verify_with_key(found.key, signature, request.method, _path_and_query(),
                                                    timestamp, body.raw_body(), nonce):
        raise Unauthorized("bad signature or unknown agent: check AGENT_ID/AGENT_SECRET", code="bad_signature")
    if found.removed:
        _revoked(agent_id)
    if nonce:
        _remember(agent_id, nonce, sent_at, now_ns / 1e9)
    g.agent_id = agent_id
    return agent_id


def _nonce(allow_none: bool) -> str:
    nonce = request.headers.get(signing.HEADER_NONCE, "")
    if nonce and not signing.NONCE.fullmatch(nonce):
        raise Unauthorized("X-Agent-Nonce must be 16 to 64 characters of A-Z a-z 0-9 _ -", code="bad_nonce")
    if not nonce and not allow_none:
        raise Unauthorized("X-Agent-Nonce is required: upgrade the agent (or set ORCH_ALLOW_NO_NONCE=1 on the "
                           "server for agents that cannot send one)", code="missing_nonce")
    return nonce


def _remember(agent_id: str, nonce: str, sent_at: int, now: float) -> None:
    try:
        nonce_memory(current_app).accept(agent_id, nonce, sent_at, now)
    except replay.Replayed:
        raise Unauthorized("this request was already received (its X-Agent-Nonce was used): a replay",
                           code="replayed_request") from None
    except replay.MemoryFull:
        raise TooManyRequests("too many requests from this agent inside the signature window: slow down",
                              code="too_many_requests") from None


def _revoked(agent_id: str) -> None:
    """401 ``agent_revoked``, after ending the removed agent's jobs (their streams are told at once)."""
    with get_db().transaction() as conn:
        agents.fail_revoked_jobs(conn, agent_id, time.time())
    raise Unauthorized("this agent was removed by an operator (orchestrator agents remove)", code="agent_revoked")


def nonce_memory(app) -> replay.NonceMemory:
    """The app's memory of agents' nonces (per process)."""
    memory = app.extensions.get("nonces")
    if memory is None:
        memory = app.extensions.setdefault(
            "nonces", replay.NonceMemory(app.config["SIGNATURE_SKEW"], app.config["NONCES_PER_AGENT"]))
    return memory


def agent_required(view: Callable) -> Callable:
    """Views for agents: the verified id is in ``g.agent_id``."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        verify_agent()
        return view(*args, **kwargs)
    return wrapped


def _bearer() -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def admin_required(view: Callable) -> Callable:
    """Views for operators: need ``ORCH_ADMIN_TOKEN`` when one is configured."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        token = current_app.config["ADMIN_TOKEN"]
        if token and not hmac.compare_digest(_bearer().encode(), token.encode()):
            raise Unauthorized("admin token required: Authorization: Bearer <ORCH_ADMIN_TOKEN>", code="admin_required")
        return view(*args, **kwargs)
    return wrapped


def check_api_key() -> None:
    """Raise 401 unless the request carries one of ``ORCH_API_KEYS`` (when any are set)."""
    keys = current_app.config["API_KEYS"]
    if not keys:
        return
    given = _bearer().encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        raise Unauthorized("a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key")


def api_key_required(view: Callable) -> Callable:
    """User-facing views: enforce ``ORCH_API_KEYS`` when configured."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        check_api_key()
        return view(*args, **kwargs)
    return wrapped
