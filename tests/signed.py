"""Signed agent requests through Flask's test client (long polls in a thread too), for the in-process server suites."""
from __future__ import annotations

import json
import threading
import time

from devtools.processes import wait_until
from protocol.signing import signed_headers
from protocol.wire import POLL_PATH
from server.notifier import ANY_MODEL_KEY
from server.storage import get_storage
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


class BackgroundPoll:
    """A signed long poll (``query``) in a thread, with its own test client; ``result()`` waits for its answer."""

    def __init__(self, app, creds, query: str) -> None:
        self.response = None
        self._thread = threading.Thread(target=self._run, args=(app, creds, f"{POLL_PATH}?{query}"), daemon=True)
        self._thread.start()

    def _run(self, app, creds, path):
        self.response = agent_get(app.test_client(), creds, path)

    def result(self):
        self._thread.join(15)
        assert self.response is not None, "the long poll did not answer"
        return self.response


def parked(app, key=ANY_MODEL_KEY, count=1) -> None:
    """Wait until ``count`` long polls are parked on notifier ``key``."""
    wait_until(lambda: get_storage(app).notifier.waiting(key) == count, message=f"{count} poll(s) parked on {key}")
