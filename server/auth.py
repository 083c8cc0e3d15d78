"""Who may call what: signed agents, the admin token, user API keys."""
from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from functools import wraps

from flask import current_app, g, request

from protocol import signing

from . import body
from .errors import Unauthorized
from .storage import agents, get_db


def _path_and_query() -> str:
    # Sign what was on the wire: gunicorn and Werkzeug keep it in RAW_URI.
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw:
        return raw
    query = request.query_string.decode("latin-1")
    return request.path + ("?" + query if query else "")


def verify_agent() -> str:
    """Check the request's signature; returns the agent id or raises 401."""
    agent_id = request.headers.get(signing.HEADER_ID)
    timestamp = request.headers.get(signing.HEADER_TIMESTAMP)
    signature = request.headers.get(signing.HEADER_SIGNATURE)
    if not (agent_id and timestamp and signature):
        raise Unauthorized("missing X-Agent-Id, X-Agent-Timestamp or X-Agent-Signature", code="missing_signature")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise Unauthorized("X-Agent-Timestamp must be unix seconds", code="bad_timestamp") from None
    skew = current_app.config["SIGNATURE_SKEW"]
    # In integer nanoseconds: a timestamp of hundreds of digits overflowed a float subtraction (a 500).
    if abs(time.time_ns() - sent_at * 1_000_000_000) > skew * 1e9:
        raise Unauthorized(f"X-Agent-Timestamp is more than {skew:g} s from the server's clock (ORCH_SIGNATURE_SKEW):"
                           " synchronise this host's clock (NTP)", code="stale_timestamp")
    secret = agents.secret_for(get_db(), agent_id)
    # One message for unknown agents and bad signatures: don't reveal which ids exist.
    if secret is None or not signing.verify(secret, signature, request.method, _path_and_query(), timestamp,
                                            body.raw_body()):
        raise Unauthorized("bad signature or unknown agent: check AGENT_ID/AGENT_SECRET", code="bad_signature")
    g.agent_id = agent_id
    return agent_id


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
