"""Signed agent requests through Flask's test client, for the in-process server suites."""
from __future__ import annotations

import json
import time

from protocol.signing import signed_headers
from server.storage.agents import AgentCredentials


def sign(creds: AgentCredentials, method: str, path: str, body: bytes = b"",
         timestamp: float | None = None) -> dict[str, str]:
    """Headers for a signed agent request (``path`` includes the query string)."""
    return signed_headers(creds.id, creds.secret, method, path, body,
                          int(time.time() if timestamp is None else timestamp))


def agent_post(client, creds: AgentCredentials, path: str, payload: dict):
    """POST ``payload`` as JSON to the test client, signed by ``creds``."""
    body = json.dumps(payload).encode()
    headers = sign(creds, "POST", path, body) | {"Content-Type": "application/json"}
    return client.post(path, data=body, headers=headers)


def agent_get(client, creds: AgentCredentials, path: str):
    return client.get(path, headers=sign(creds, "GET", path))
