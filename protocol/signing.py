"""Agent request signatures: HMAC-SHA256, the way itsdangerous' ``Signer`` computes it.

The signed string is four lines joined by ``\\n``, and a fifth when the request carries a nonce::

    METHOD            upper case, e.g. POST
    PATH?QUERY        exactly as sent on the wire (no '?' when there is no query)
    TIMESTAMP         unix seconds, as in X-Agent-Timestamp
    SHA256(BODY)      lower-case hex digest of the raw body (of b"" when empty)
    NONCE             X-Agent-Nonce, when sent: a fresh random value per request

The signature is ``itsdangerous.Signer(secret, salt=SALT, key_derivation="hmac",
digest_method=sha256).get_signature(string)`` (URL-safe base64, no padding):
HMAC-SHA256 keyed with ``derive_key(secret) = HMAC-SHA256(secret, SALT)``.  The
server keeps only that derived key (``verify_with_key``); the agent signs with
``signed_headers``; docs/protocol.md has the test vectors.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from functools import lru_cache

SALT = "ollama-orchestrator.agent-request"
HEADER_ID = "X-Agent-Id"
HEADER_TIMESTAMP = "X-Agent-Timestamp"
HEADER_SIGNATURE = "X-Agent-Signature"
HEADER_NONCE = "X-Agent-Nonce"
# 16 to 64 URL-safe characters; the reference agent sends 22 (16 random bytes).
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def derive_key(secret: str) -> bytes:
    """The HMAC key a secret signs with: ``HMAC-SHA256(key=secret, message=SALT)`` (itsdangerous' "hmac")."""
    return hmac.new(secret.encode(), SALT.encode(), hashlib.sha256).digest()


@lru_cache(maxsize=4096)
def _key(secret: str) -> bytes:
    # Deriving costs as much as signing; cache it per secret.
    return derive_key(secret)


def new_nonce() -> str:
    """A fresh ``X-Agent-Nonce`` value: 16 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(16)


def string_to_sign(method: str, path_and_query: str, timestamp: str, body: bytes, nonce: str = "") -> bytes:
    digest = hashlib.sha256(body or b"").hexdigest()
    signed = f"{method.upper()}\n{path_and_query}\n{timestamp}\n{digest}"
    return (signed + "\n" + nonce if nonce else signed).encode()


def sign_with_key(key: bytes, method: str, path_and_query: str, timestamp: str, body: bytes, nonce: str = "") -> str:
    """The ``X-Agent-Signature`` value for one request, from the derived key."""
    mac = hmac.new(key, string_to_sign(method, path_and_query, timestamp, body, nonce), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def sign(secret: str, method: str, path_and_query: str, timestamp: str, body: bytes, nonce: str = "") -> str:
    """The ``X-Agent-Signature`` value for one request."""
    return sign_with_key(_key(secret), method, path_and_query, timestamp, body, nonce)


def verify_with_key(key: bytes, signature: str, method: str, path_and_query: str, timestamp: str, body: bytes,
                    nonce: str = "") -> bool:
    """True when ``signature`` was made with the secret whose derived key is ``key``, over this request."""
    expected = sign_with_key(key, method, path_and_query, timestamp, body, nonce)
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def verify(secret: str, signature: str, method: str, path_and_query: str, timestamp: str, body: bytes,
           nonce: str = "") -> bool:
    """True when ``signature`` was made with ``secret`` over this request."""
    return verify_with_key(_key(secret), signature, method, path_and_query, timestamp, body, nonce)


def signed_headers(agent_id: str, secret: str, method: str, path_and_query: str, body: bytes,
                   timestamp: int, nonce: str | None = None) -> dict[str, str]:
    """The headers an agent sends with every request: id, timestamp, a fresh nonce and the signature.

    ``nonce=""`` signs the old way, without one (only servers that allow it accept that).
    """
    ts = str(int(timestamp))
    nonce = new_nonce() if nonce is None else nonce
    headers = {HEADER_ID: agent_id, HEADER_TIMESTAMP: ts}
    if nonce:
        headers[HEADER_NONCE] = nonce
    headers[HEADER_SIGNATURE] = sign(secret, method, path_and_query, ts, body, nonce)
    return headers
