"""The agent end to end: gunicorn with the gevent worker, the agent and the Ollama simulator, all real processes."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest
import requests

from devtools.processes import ROOT, LiveServer, agent_environment, launch_agent, start_simulator, wait_until
from server.storage import migrated
from server.storage.agents import AgentCredentials, list_agents
from tests.e2e.chat_client import EventStream, chat, chats_at_once, expected, start_chat

# --- one server, simulator and agent shared by the module's simple cases -------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    server = LiveServer(tmp / "server.db", tmp / "server.log", {"ORCH_CANCEL_GRACE": "0"}).start()
    sim = start_simulator(tmp, "--models", "sim,other", "--first-token-ms", "20", "--interval-ms", "5",
                          "--tokens", "30")
    # "ghost" is declared but missing from Ollama: the server routes it, Ollama answers 404.
    # "other" is left to agents a test starts for itself.
    agent = launch_agent(server, sim.url, tmp / "agent.log", "stack", MODELS="sim,ghost")
    yield server, sim, agent
    agent.stop(signal.SIGKILL)
    sim.stop()
    server.stop()


def test_a_chat_streams_the_simulators_exact_text(stack):
    server, _, _ = stack
    answer = chat(server, "Why is the sky blue? ✨")
    assert answer.done and answer.error is None
    assert answer.text == expected("Why is the sky blue? ✨", 30)
    assert answer.ids == list(range(len(answer.ids)))


@pytest.mark.parametrize(("model", "options", "message"), [
    ("sim", {"sim_error_after": 3}, "Ollama: simulated failure"),
    ("sim", {"sim_drop_after": 3}, "the connection to Ollama was lost after 3 tokens"),
    ("sim", {"sim_status": 500}, "Ollama answered 500"),
    ("ghost", {}, 'model "ghost" not found'),
])
def test_a_failing_ollama_ends_the_chat_with_a_clear_error_and_the_agent_keeps_serving(stack, model, options,
                                                                                       message):
    server, _, agent = stack
    answer = chat(server, "break, please", model, **options)
    assert answer.error is not None and answer.error["code"] == "agent_error"
    assert answer.error["message"].startswith(message)
    if "sim_error_after" in options or "sim_drop_after" in options:
        assert answer.text == expected("break, please", 3)
    assert chat(server, "and now?").text == expected("and now?", 30)
    assert agent.proc.poll() is None


def test_a_wrong_secret_stops_the_agent_at_start_with_one_line(stack):
    server, sim, _ = stack
    env = agent_environment(server.url, AgentCredentials(server.add_agent("wrong").id, "not-the-secret"), sim.url)
    result = subprocess.run([sys.executable, "agent/agent.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "orchestrator-agent: server rejected our signature: check AGENT_ID/AGENT_SECRET")


def test_a_user_disconnect_stops_the_simulators_generation(stack):
    server, sim, _ = stack
    requests.post(sim.url + "/sim/reset", timeout=5)
    with start_chat(server, "a long story", sim_tokens=5000, sim_interval_ms=20) as response:
        request_id = response.headers["X-Request-Id"]
        assert len(EventStream(response).read(stop_after=3).ids) == 3
    req = next(r["req"] for r in sim.records() if r["event"] == "start" and r["model"] == "sim")

    def ended() -> list[dict]:
        return [r for r in sim.records() if r["req"] == req and r["event"] in ("client_gone", "done")]

    end = wait_until(ended, 15, message="the simulator's client_gone record")
    assert end[0]["event"] == "client_gone" and end[0]["i"] < 5000
    status = requests.get(f"{server.url}/api/v1/chat/{request_id}", timeout=5).json()["status"]
    assert status == "cancelled"


def test_the_legacy_profile_posts_each_token_alone_and_streams_the_same_text(stack, start_agent):
    server, sim, _ = stack
    agent = start_agent(server, sim.url, "legacy", MODELS="other", LEGACY="1")
    answer = chat(server, "like before", "other")
    assert answer.done and answer.text == expected("like before", 30, "other")
    done_line = wait_until(lambda: [x for x in agent.log().splitlines() if " done after " in x], 10)[0]
    assert "(30 tokens, 32 POSTs)" in done_line  # the acknowledgement, 30 tokens, done


def test_a_second_signal_stops_the_agent_at_once(stack, start_agent):
    server, sim, _ = stack
    agent = start_agent(server, sim.url, "cold", MODELS="other", LONG_POLL=30, TRANSPORT="http")
    with start_chat(server, "never finished", "other", sim_tokens=5000, sim_interval_ms=20) as response:
        # Kept: a dropped EventStream closes the connection, and with no cancel grace the job ended at once,
        # so the warm stop sometimes finished before the second signal came (exit -15, not 143).
        events = EventStream(response)
        assert events.read(stop_after=1).ids == [0]  # delivered through a long poll
        agent.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "warm stop" in agent.log(), 10, message="the warm stop")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(15) == 128 + signal.SIGTERM
    assert "stopping at once" in agent.log() and "Traceback" not in agent.log()


def test_two_agents_with_two_slots_serve_ten_concurrent_chats_then_stop_from_a_long_poll(stack, start_agent):
    server, sim, _ = stack
    start_agent(server, sim.url, "one", MODELS="other", MAX_JOBS=2, BATCH_MODE="adaptive")
    two = start_agent(server, sim.url, "two", MODELS="other", MAX_JOBS=2, LONG_POLL=30, TRANSPORT="http")
    answers = chats_at_once(server, [f"question {i}" for i in range(10)], "other", sim_interval_ms=10)
    for i in range(10):
        assert answers[i].done and answers[i].text == expected(f"question {i}", 30, "other"), i
    with migrated(server.database) as conn:
        done = {a["name"]: a["jobs_done"] for a in list_agents(conn) if a["name"] in ("one", "two")}
    assert done["one"] + done["two"] == 10 and done["one"] and done["two"], done
    # Idle now, "two" is parked in a 30 s long poll: SIGTERM cuts it short.
    two.proc.send_signal(signal.SIGTERM)
    assert two.proc.wait(15) == 0, two.log()


def test_sigterm_lets_the_running_job_finish_then_the_agent_exits_0(stack, start_agent):
    server, sim, _ = stack
    agent = start_agent(server, sim.url, "finisher", MODELS="other")
    with start_chat(server, "finish me", "other", sim_tokens=60, sim_interval_ms=20) as response:
        events = EventStream(response)
        events.read(stop_after=1)
        agent.proc.send_signal(signal.SIGTERM)
        answer = events.read()
    assert answer.done and answer.text == expected("finish me", 60, "other")
    assert agent.proc.wait(30) == 0
    assert "warm stop" in agent.log() and "Traceback" not in agent.log()


# --- a case that needs processes of its own -------------------------------------

def test_a_server_outage_mid_stream_loses_and_duplicates_nothing(live_server, simulator, start_agent):
    agent = start_agent(live_server, simulator.url, TRANSPORT="http")     # the WebSocket's: test_faults.py
    tokens = 100
    with start_chat(live_server, "survive this", sim_tokens=tokens, sim_interval_ms=20) as response:
        answer = EventStream(response).read(stop_after=5)
        live_server.kill()
    wait_until(lambda: "failed (" in agent.log(), 15, message="the agent noticing the outage")
    live_server.start()
    resumed = requests.get(f"{live_server.url}/api/v1/chat/stream/{answer.request_id}", stream=True,
                           headers={"Last-Event-ID": str(answer.ids[-1])}, timeout=(5, 60))
    with resumed:
        EventStream(resumed, answer).read()
    assert answer.done, answer.error
    assert answer.ids == list(range(tokens)) and answer.text == expected("survive this", tokens)


def test_a_stopping_agents_models_are_withdrawn_at_once_while_its_running_job_finishes(live_server, simulator,
                                                                                        start_agent):
    agent = start_agent(live_server, simulator.url, "leaving", LONG_POLL=30)

    def listed() -> tuple[list[str], str]:
        models = requests.get(live_server.url + "/api/v1/models", timeout=5).json()["models"]
        agents = requests.get(live_server.url + "/api/v1/agents", timeout=5).json()["agents"]
        return [m["name"] for m in models], next(a["state"] for a in agents if a["id"] == agent.creds.id)

    assert listed() == (["sim:latest"], "online")
    with start_chat(live_server, "one more answer", sim_tokens=150, sim_interval_ms=20) as response:
        events = EventStream(response)
        events.read(stop_after=1)
        agent.proc.send_signal(signal.SIGTERM)
        # Without the goodbye the agent stayed listed for ORCH_AGENT_ONLINE_SECONDS (60 s).
        wait_until(lambda: listed() == ([], "left"), 15, 0.05, "the agent's models to be withdrawn")
        refused = requests.post(live_server.url + "/api/v1/chat/stream", timeout=5,
                                json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, "model_not_found")
        answer = events.read()
    assert answer.done and answer.text == expected("one more answer", 150)
    assert agent.proc.wait(30) == 0
    assert "told the server we are leaving" in agent.log() and "Traceback" not in agent.log()


# --- revoked mid-answer -----------------------------------------------------------------

@pytest.mark.engines("sqlite", "postgres")
def test_an_agent_removed_mid_answer_ends_the_chat_with_agent_revoked_and_exits_with_status_3(
        live_server, simulator, start_agent):
    agent = start_agent(live_server, simulator.url, "doomed")
    with start_chat(live_server, "revoked mid-answer", sim_tokens=500, sim_interval_ms=20) as response:
        events = EventStream(response)
        assert len(events.read(stop_after=3).ids) == 3
        removed = subprocess.run([sys.executable, "-m", "server", "agents", "remove", agent.creds.id,
                                  "--db", live_server.database], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert removed.returncode == 0, removed.stderr
        # At once: the agent posts a token every 20 ms, and its next POST is refused (or NOTIFY wakes the stream).
        reader = threading.Thread(target=events.read, daemon=True)
        reader.start()
        reader.join(10)
    answer = events.answer
    assert answer.error is not None and answer.error["code"] == "agent_revoked", answer.error
    assert agent.proc.wait(30) == 3
    assert "revoked by the server" in agent.log() and "bad signature" not in agent.log()
