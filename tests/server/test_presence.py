"""Which agents the server offers: an agent that says goodbye (SIGTERM) or is removed is shown as such at once."""
from __future__ import annotations

import time

import pytest

from protocol.wire import LEAVE_PATH, POLL_PATH, STREAM_PATH
from server.storage import agents, jobs
from tests.signed import BackgroundPoll, agent_get, agent_post, parked, sign

pytestmark = pytest.mark.engines("sqlite", "postgres")

HELLO = [{"role": "user", "content": "hello"}]


def leave(client, creds):
    return client.post(LEAVE_PATH, headers=sign(creds, "POST", LEAVE_PATH))


def offered(client) -> dict[str, list]:
    """What each list a user or an operator reads says about the agents and their models."""
    return {
        "models": [m["name"] for m in client.get("/api/v1/models").get_json()["models"]],
        "openai": [m["id"] for m in client.get("/v1/models").get_json()["data"]],
        "ollama": [m["name"] for m in client.get("/api/tags").get_json()["models"]],
        "status": [a["id"] for a in client.get("/api/v1/status").get_json()["agents"]],
    }


def state(client, agent_id: str) -> str:
    return next(a["state"] for a in client.get("/api/v1/agents").get_json()["agents"] if a["id"] == agent_id)


def chat_status(client, model="llama") -> int:
    return client.post("/api/v1/chat/stream", json={"model": model, "messages": HELLO}).status_code


def test_an_agent_that_says_goodbye_is_no_longer_offered_anywhere_at_once(client, agent_creds):
    assert agent_get(client, agent_creds, POLL_PATH + "?models=llama").status_code == 204
    assert offered(client) == {"models": ["llama:latest"], "openai": ["llama:latest"], "ollama": ["llama:latest"],
                               "status": [agent_creds.id]}
    assert state(client, agent_creds.id) == "online"

    response = leave(client, agent_creds)

    assert (response.status_code, response.get_json()) == (200, {"ok": True})
    assert offered(client) == {"models": [], "openai": [], "ollama": [], "status": []}
    assert state(client, agent_creds.id) == "left"
    assert chat_status(client) == 404


def test_the_next_poll_after_a_goodbye_brings_the_agent_back(client, agent_creds):
    agent_get(client, agent_creds, POLL_PATH + "?models=llama")
    leave(client, agent_creds)
    assert agent_get(client, agent_creds, POLL_PATH).status_code == 204
    assert state(client, agent_creds.id) == "online"
    assert offered(client)["models"] == ["llama:latest"]


def test_a_long_poll_parked_before_the_goodbye_takes_no_job_and_does_not_bring_the_agent_back(app, client, dbconn,
                                                                                             agent_creds):
    poll = BackgroundPoll(app, agent_creds, "wait=10")
    parked(app)
    leave(client, agent_creds)
    job_id = jobs.create_job(dbconn, "llama", HELLO, {}, time.time())   # wakes the parked poll
    assert poll.result().status_code == 204
    assert jobs.get_job(dbconn, job_id)["status"] == "queued"
    assert state(client, agent_creds.id) == "left"


def test_jobs_running_at_the_goodbye_still_finish(app, client, dbconn, agent_creds):
    job_id = jobs.create_job(dbconn, "llama", HELLO, {}, time.time())
    assert agent_get(client, agent_creds, POLL_PATH + "?models=llama").get_json()["id"] == job_id
    leave(client, agent_creds)
    reply = agent_post(client, agent_creds, STREAM_PATH, {"id": job_id, "chunks": ["Hi"], "seq": 0, "done": True})
    assert reply.status_code == 200
    assert jobs.get_job(dbconn, job_id)["status"] == "done"
    assert state(client, agent_creds.id) == "left"   # its posts do not make it online again


def test_a_goodbye_needs_a_valid_signature_and_changes_nothing_without_one(client, agent_creds):
    agent_get(client, agent_creds, POLL_PATH + "?models=llama")
    headers = sign(agent_creds, "POST", LEAVE_PATH)
    headers["X-Agent-Signature"] = headers["X-Agent-Signature"][::-1]
    response = client.post(LEAVE_PATH, headers=headers)
    assert (response.status_code, response.get_json()["error"]["code"]) == (401, "bad_signature")
    assert state(client, agent_creds.id) == "online"


def test_a_removed_agent_is_listed_as_removed_and_offered_nowhere_at_once(client, dbconn, agent_creds):
    agent_get(client, agent_creds, POLL_PATH + "?models=llama")
    assert agents.remove_agent(dbconn, agent_creds.id)
    assert state(client, agent_creds.id) == "removed"
    assert offered(client) == {"models": [], "openai": [], "ollama": [], "status": []}
    assert leave(client, agent_creds).status_code == 401


def test_an_agent_silent_past_the_online_window_is_offline(client, dbconn, agent_creds):
    agents.touch(dbconn, agent_creds.id, time.time() - 3600, ["llama"])
    assert state(client, agent_creds.id) == "offline"
    assert offered(client)["models"] == []


def test_a_model_report_before_the_first_poll_offers_nothing_and_serves_no_model(client, agent_creds):
    """An agent reports its Ollama's models before it polls; online with no models declared yet it read as
    serving any model, so a chat for a model nobody serves was queued (and `make run` printed one)."""
    report = {"models": [{"name": "llama:latest", "size": 1}], "running": []}
    assert agent_post(client, agent_creds, "/api/v1/inference/models", report).status_code == 200
    assert offered(client) == {"models": [], "openai": [], "ollama": [], "status": []}
    assert chat_status(client, "no-such-model") == 404
    assert agent_get(client, agent_creds, POLL_PATH + "?models=llama").status_code == 204
    assert offered(client)["models"] == ["llama:latest"]
