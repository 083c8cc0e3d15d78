"""Replayed signed requests are refused (issue 14, item 3), against a real gunicorn server.

A request captured on the way (a proxy's log) and sent again inside the skew window used to be
served: a replayed poll handed out, and so read, the next user's prompt; a replayed legacy
``chunk`` POST (no ``seq``) stored its text once per copy.  Every agent request now carries a
nonce, remembered per agent for the window: the copy gets 401 ``replayed_request`` and changes
nothing.  Agents that send no nonce work only where the operator allows it.
"""
from __future__ import annotations

import json
import time

from devtools.processes import LiveServer
from protocol.signing import signed_headers
from server.storage import jobs, migrated
from tests.e2e.test_auth import JSON, POLL, STREAM, Fleet, Request, fleet, signed  # noqa: F401 (fleet is a fixture)

HELLO = [{"role": "user", "content": "a private prompt"}]


def test_a_replayed_chunk_post_is_refused_and_stores_nothing(fleet):  # noqa: F811
    captured = fleet.chunk_post(fleet.alice, len(fleet.stored()["chunks"]), ["!"])
    assert fleet.send(captured)[0] == 200
    before = fleet.stored()
    for _ in range(3):
        status, body = fleet.send(captured)
        assert (status, body["error"]["code"]) == (401, "replayed_request")
    assert fleet.stored() == before


def test_a_legacy_chunk_post_sent_three_times_stores_its_text_once(fleet):  # noqa: F811
    body = json.dumps({"id": fleet.job, "chunk": " legacy", "done": False}).encode()
    captured = Request("POST", STREAM, body, signed(fleet.alice, "POST", STREAM, body) | JSON)
    stored_before = len(fleet.stored()["chunks"])
    replies = [fleet.send(captured) for _ in range(3)]
    assert [status for status, _ in replies] == [200, 401, 401]
    assert [reply["error"]["code"] for _, reply in replies[1:]] == ["replayed_request"] * 2
    texts = [row[2] for row in fleet.stored()["chunks"]]
    assert len(texts) == stored_before + 1 and texts.count(" legacy") == 1


def test_a_replayed_poll_is_refused_and_hands_out_no_job(fleet):  # noqa: F811
    path = POLL + "?models=replayed&slots=1"
    captured = Request("GET", path, b"", signed(fleet.bob, "GET", path))
    assert fleet.send(captured)[0] == 204              # nothing queued yet: the capture's own answer
    with migrated(fleet.server.database) as db:
        job = jobs.create_job(db, "replayed", HELLO, {}, time.time())
    before = fleet.stored()
    for _ in range(5):
        status, body = fleet.send(captured)
        assert (status, body["error"]["code"]) == (401, "replayed_request")
    assert fleet.stored() == before
    with migrated(fleet.server.database) as db:
        assert jobs.get_job(db, job)["status"] == "queued"


def _old_style_poll(creds) -> Request:
    """A poll signed the way agents did before the nonce: four lines, no X-Agent-Nonce."""
    path = POLL + "?models=old&slots=0"
    return Request("GET", path, b"", signed_headers(creds.id, creds.secret, "GET", path, b"", int(time.time()),
                                                    nonce=""))


def test_agents_without_a_nonce_work_only_where_the_operator_allows_it(fleet, tmp_path):  # noqa: F811
    status, body = fleet.send(_old_style_poll(fleet.bob))
    assert (status, body["error"]["code"]) == (401, "missing_nonce")
    allowing = LiveServer(tmp_path / "allowing.db", tmp_path / "allowing.log", {"ORCH_ALLOW_NO_NONCE": 1}).start()
    try:
        creds = allowing.add_agent("old-agent")
        assert Fleet(allowing, creds, creds, creds, "").send(_old_style_poll(creds)) == (204, None)
    finally:
        allowing.stop()
