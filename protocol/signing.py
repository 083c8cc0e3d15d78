"""Agent request signatures: HMAC-SHA256 through itsdangerous.

The signed string is four lines joined by ``\\n``::

    METHOD            upper case, e.g. POST
    PATH?QUERY        exactly as sent on the wire (no '?' when there is no query)
    TIMESTAMP         unix seconds, as in X-Agent-Timestamp
    SHA256(BODY)      lower-case hex digest of the raw body (of b"" when empty)

The signature is ``itsdangerous.Signer(secret, salt=SALT, key_derivation="hmac",
digest_method=sha256).get_signature(string)`` (URL-safe base64, no padding).
The server verifies with ``verify``, the agent signs with ``signed_headers``;
docs/protocol.md has the test vectors.
"""
from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from itsdangerous import Signer

SALT = "ollama-orchestrator.agent-request"
HEADER_ID = "X-Agent-Id"
HEADER_TIMESTAMP = "X-Agent-Timestamp"
HEADER_SIGNATURE = "X-Agent-Signature"


@lru_cache(maxsize=4096)
def _signer(secret: str) -> Signer:
    # Deriving the key costs more than signing; cache it per secret.
    return Signer(secret, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256)


def string_to_sign(method: str, path_and_query: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body or b"").hexdigest()
    return f"{method.upper()}\n{path_and_query}\n{timestamp}\n{digest}".encode()


def sign(secret: str, method: str, path_and_query: str, timestamp: str, body: bytes) -> str:
    """The ``X-Agent-Signature`` value for one request."""
    return _signer(secret).get_signature(string_to_sign(method, path_and_query, timestamp, body)).decode()


def verify(secret: str, signature: str, method: str, path_and_query: str, timestamp: str, body: bytes) -> bool:
    """True when ``signature`` was made with ``secret`` over this request."""
    expected = sign(secret, method, path_and_query, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def signed_headers(agent_id: str, secret: str, method: str, path_and_query: str, body: bytes,
                   timestamp: int) -> dict[str, str]:
    """The three headers an agent sends with every request."""
    ts = str(int(timestamp))
    return {
        HEADER_ID: agent_id,
        HEADER_TIMESTAMP: ts,
        HEADER_SIGNATURE: sign(secret, method, path_and_query, ts, body),
    }
