"""The Ollama-compatible front door, driven by the official `ollama` package against real processes:
gunicorn with the gevent worker, an agent (`python -m agent`) and the Ollama simulator."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import ollama
import pytest

from server.storage.agents import add_agent, touch
from sim.tokens import chat_prompt, expected_text
from tests.stack import serving_stack

TOKENS = 30
MESSAGES = [{"role": "user", "content": "Why is the sky blue? ✨"}]


def expected(seed: int = 0, tokens: int = TOKENS, messages: list[dict] = MESSAGES) -> str:
    return expected_text(seed, tokens, "sim", chat_prompt(messages))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with serving_stack(tmp_path_factory.mktemp("ollama"), "ollama-door", TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def olla(stack) -> Iterator[ollama.Client]:
    client = ollama.Client(host=stack.url, timeout=30)
    yield client
    client.close()   # before the server stops: an idle keep-alive connection would hold its graceful shutdown


def test_a_streamed_chat_gives_the_simulators_exact_text_and_final_statistics(olla):
    parts = list(olla.chat(model="sim", messages=MESSAGES, stream=True))
    assert "".join(p.message.content for p in parts) == expected()
    assert all(p.message.role == "assistant" and not p.done for p in parts[:-1])
    final = parts[-1]
    assert final.done and final.done_reason == "stop"
    assert final.eval_count == TOKENS and final.prompt_eval_count == len(chat_prompt(MESSAGES).split())
    assert final.total_duration > 0


def test_a_whole_chat_passes_options_through(olla):
    response = olla.chat(model="sim", messages=MESSAGES, options={"seed": 11, "num_predict": 6})
    assert response.message.content == expected(seed=11, tokens=6)
    assert response.done_reason == "length"


def test_generate_streams_the_prompt_answer_with_the_system_prompt_first(olla):
    parts = list(olla.generate(model="sim", prompt="Tell me a story", system="You are terse.", stream=True))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]
    assert "".join(p.response for p in parts) == expected(messages=messages)
    assert parts[-1].done


def test_tags_lists_the_models_online_agents_serve(olla):
    assert [m.model for m in olla.list().models] == ["sim:latest"]


def test_an_unknown_model_is_an_ollama_404(olla):
    with pytest.raises(ollama.ResponseError) as caught:
        olla.chat(model="llama-nope", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert "llama-nope" in caught.value.error


def test_a_backend_failure_mid_stream_raises_in_the_client_after_the_tokens_so_far(olla):
    text = ""
    with pytest.raises(ollama.ResponseError, match="simulated failure"):
        for part in olla.chat(model="sim", messages=MESSAGES, stream=True, options={"sim_error_after": 5}):
            text += part.message.content
    assert text == expected(tokens=5)


def test_an_empty_chat_loads_the_model_like_ollama(olla):
    response = olla.chat(model="sim", messages=[])
    assert response.done and response.done_reason == "load" and response.message.content == ""


# --- bad input, in process ------------------------------------------------------

@pytest.fixture
def served(app, dbconn):
    touch(dbconn, add_agent(dbconn, "a").id, time.time(), ["sim"])


def assert_ollama_error(response, status: int) -> str:
    assert response.status_code == status, response.data[:300]
    body = response.get_json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    return body["error"]


@pytest.mark.parametrize("path, payload, fragment", [
    ("/api/chat", {"model": "sim", "messages": "hi"}, "messages"),
    ("/api/chat", {"model": "sim", "messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]},
     "images"),
    ("/api/chat", {"model": "sim", "messages": [{"role": "user", "content": "x", "images": "aGk="}]}, "images"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "tools": "all"}, "tools"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "format": ["json"]}, "format"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "think": "hard"}, "think"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "keep_alive": "forever"}, "keep_alive"),
    ("/api/chat", {"model": "sim", "messages": [{"role": "assistant", "content": "",
                                                 "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}]},
     "tool_calls"),
    ("/api/embed", {"model": "sim", "input": 5}, "input"),
    ("/api/embed", {"model": "sim", "input": ["a", 5]}, "input"),
    ("/api/embed", {"model": "sim", "input": []}, "input"),
    ("/api/embed", {"model": "sim", "input": ["a"] * 513}, "input"),
    ("/api/embed", {"model": "sim", "input": "a", "truncate": "yes"}, "truncate"),
    ("/api/embeddings", {"model": "sim", "prompt": ["a"]}, "prompt"),
    ("/api/generate", {"model": "sim", "prompt": "x", "suffix": "y"}, "suffix"),
    ("/api/generate", {"model": "sim", "prompt": "x", "raw": True}, "raw"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "options": [1]}, "options"),
    ("/api/chat", {"model": "sim", "messages": MESSAGES, "stream": "no"}, "stream"),
    ("/api/chat", {"messages": MESSAGES}, "model"),
    ("/api/generate", {"model": "sim", "prompt": "x", "format": 5}, "format"),
    ("/api/generate", {"model": "sim", "prompt": "x", "images": ["%%%"]}, "images"),
])
def test_bad_requests_are_ollama_400s(client, served, dbconn, path, payload, fragment):
    assert fragment in assert_ollama_error(client.post(path, json=payload), 400)
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_unknown_models_and_malformed_bodies_keep_the_ollama_shape(client):
    assert "ghost" in assert_ollama_error(client.post("/api/chat", json={"model": "ghost", "messages": MESSAGES}), 404)
    assert "ghost" in assert_ollama_error(client.post("/api/generate", json={"model": "ghost", "prompt": "x"}), 404)
    assert_ollama_error(client.post("/api/chat", data=b"{nope", headers={"Content-Type": "application/json"}), 400)


def test_requests_are_queued_as_ollama_front_door_jobs(client, served, dbconn):
    response = client.post("/api/chat", json={"model": "sim", "messages": MESSAGES, "options": {"seed": 3}})
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    response.close()
    messages, options, front_door = dbconn.execute("SELECT messages, options, front_door FROM jobs").fetchone()
    assert (json.loads(messages), json.loads(options), front_door) == (MESSAGES, {"seed": 3}, "ollama")
