"""What the server keeps of an agent's secret: the HMAC key it signs with, wrapped when a server key is set.

An HMAC verifier needs the key itself, so no one-way hash can stand in for it
(docs/protocol.md, "What the server stores").  The secret is shown once and
never stored; the server keeps ``derive_key(secret)``, which signs exactly as
well but is not the secret an operator may have reused.  With
``ORCH_SECRET_KEY`` set the key is stored wrapped: XORed with a pad
``HMAC-SHA256(server key, "wrap" + salt)`` under a random per-row salt, plus
a 16-byte tag that tells a wrong server key from a bad signature.  A copy of
the database alone then signs nothing.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from functools import lru_cache

PLAIN, WRAPPED = "plain", "wrapped"
SALT_BYTES = 16
TAG_BYTES = 16


class KeyWrapError(ValueError):
    """A stored key cannot be read with this server key (missing or wrong ``ORCH_SECRET_KEY``)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(server_key: str, *parts: bytes) -> bytes:
    return hmac.new(server_key.encode(), b"".join(parts), hashlib.sha256).digest()


def seal(key: bytes, server_key: str) -> str:
    """The stored form of an agent's derived key: wrapped under ``server_key``, or plain without one."""
    if not server_key:
        return f"{PLAIN}:{_b64(key)}"
    salt = secrets.token_bytes(SALT_BYTES)
    pad = _mac(server_key, b"wrap", salt)
    wrapped = bytes(a ^ b for a, b in zip(key, pad, strict=True))
    tag = _mac(server_key, b"check", salt, wrapped)[:TAG_BYTES]
    return f"{WRAPPED}:{_b64(salt)}:{_b64(wrapped)}:{_b64(tag)}"


@lru_cache(maxsize=4096)
def unseal(stored: str, server_key: str) -> bytes:
    """The derived key from its stored form; ``KeyWrapError`` if ``server_key`` cannot open it."""
    kind, _, rest = stored.partition(":")
    if kind == PLAIN:
        return _unb64(rest)
    if kind != WRAPPED:
        raise KeyWrapError(f"unknown stored key format {kind!r}")
    if not server_key:
        raise KeyWrapError("agents' keys are stored wrapped: set ORCH_SECRET_KEY to the key they were wrapped with")
    salt, wrapped, tag = (_unb64(part) for part in rest.split(":"))
    if not hmac.compare_digest(_mac(server_key, b"check", salt, wrapped)[:TAG_BYTES], tag):
        raise KeyWrapError("ORCH_SECRET_KEY is not the key the agents' keys were wrapped with")
    return bytes(a ^ b for a, b in zip(wrapped, _mac(server_key, b"wrap", salt), strict=True))


def is_wrapped(stored: str) -> bool:
    return stored.startswith(WRAPPED + ":")
