"""Ollama's features through the queue, in process: structured chunks stored once each by seq and
shown by the native door, job kinds routed only to agents that run them (embeddings end to end:
tests/e2e/test_clients.py)."""
from __future__ import annotations

import json
import time

import pytest

from protocol.models import KINDS
from server.storage import jobs
from tests.signed import agent_get, agent_post

pytestmark = pytest.mark.engines("sqlite", "postgres")

POLL, STREAM = "/api/v1/inference/poll", "/api/v1/inference/stream"
ALL_KINDS = "&kinds=" + ",".join(KINDS)
CALL = {"function": {"name": "get_weather", "arguments": {"location": "Paris"}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "weather?"}]


def poll(client, creds, query: str = "models=sim" + ALL_KINDS):
    response = agent_get(client, creds, f"{POLL}?{query}")
    return response.get_json() if response.status_code == 200 else None


def test_structured_chunks_are_stored_once_each_and_streamed_beside_the_text(client, agent_creds, dbconn):
    poll(client, agent_creds, "models=sim" + ALL_KINDS)        # online, running every kind
    response = client.post("/api/v1/chat/stream", json={"model": "sim", "messages": ASK, "tools": [TOOL]})
    job = poll(client, agent_creds)
    assert (job["kind"], job["tools"], job["model"]) == ("features", [TOOL], "sim:latest")
    batch = {"id": job["id"], "seq": 0, "chunks": [{"thinking": "hmm"}, "It is", {"tool_calls": [CALL]}]}
    for _ in range(2):                                         # a retried POST stores nothing twice
        assert agent_post(client, agent_creds, STREAM, batch).get_json()["next_seq"] == 3
    agent_post(client, agent_creds, STREAM, {"id": job["id"], "seq": 3, "chunks": [], "done": True})
    rows = dbconn.execute("SELECT seq, text, parts FROM chunks ORDER BY seq").fetchall()
    assert [(seq, text, json.loads(parts) if parts else None) for seq, text, parts in rows] == [
        (0, "", {"thinking": "hmm"}), (1, "It is", None), (2, "", {"tool_calls": [CALL]})]
    body = response.get_data(as_text=True)
    assert body.splitlines()[:8] == [
        "id: 0", 'data: {"delta": "", "thinking": "hmm"}', "",
        "id: 1", 'data: {"delta": "It is"}', "",
        "id: 2", 'data: {"delta": "", "tool_calls": [{"function": {"name": "get_weather", '
                 '"arguments": {"location": "Paris"}}}]}']
    assert body.endswith("data: [DONE]\n\n")


def test_older_agents_get_plain_chats_only_and_features_wait_for_an_agent_that_passes_them(
        client, agent_creds, dbconn):
    poll(client, agent_creds, "models=sim")                    # an older agent: no kinds
    refused = client.post("/api/chat", json={"model": "sim", "messages": ASK, "tools": [TOOL], "stream": False})
    assert refused.status_code == 404 and "older agent" in refused.get_json()["error"]
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    now = time.time()
    features = jobs.create_job(dbconn, "sim:latest", ASK, {}, now, "ollama", "features", {"tools": [TOOL]})
    embed = jobs.create_job(dbconn, "sim:latest", [], {}, now + 1, "ollama", "embed", {"input": ["a"]})
    assert poll(client, agent_creds, "models=sim") is None      # neither goes to an older agent
    assert poll(client, agent_creds, "models=sim&kinds=chat,embed")["id"] == embed
    assert poll(client, agent_creds, "models=sim:latest&kinds=features")["id"] == features

