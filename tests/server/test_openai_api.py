"""The OpenAI-compatible front door, driven by the official `openai` package against real processes:
gunicorn with the gevent worker, an agent (`python -m agent`) and the Ollama simulator."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest
import requests

from server.storage.agents import add_agent, touch
from sim.tokens import chat_prompt, expected_text
from tests.stack import serving_stack

TOKENS = 30
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? ✨"}]


def expected(seed: int = 0, tokens: int = TOKENS, messages: list[dict] = MESSAGES) -> str:
    return expected_text(seed, tokens, "sim", chat_prompt(messages))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with serving_stack(tmp_path_factory.mktemp("openai"), "openai-door", TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def oai(stack) -> Iterator[openai.OpenAI]:
    # Closed before the server stops: an idle keep-alive connection would hold its graceful shutdown.
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


def test_a_stream_gives_the_simulators_exact_text_role_first_then_finish_reason_and_usage(oai):
    chunks = list(oai.chat.completions.create(model="sim", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected()
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["stop"]
    assert chunks[-1].choices == []
    prompt_words = len(chat_prompt(MESSAGES).split())
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_words, TOKENS)
    assert all(c.usage is None for c in chunks[:-1])


def test_a_whole_answer_maps_seed_and_max_tokens_to_ollama_options(oai):
    completion = oai.chat.completions.create(model="sim", messages=MESSAGES, seed=7, max_tokens=9,
                                                temperature=0.3, top_p=0.9, stop=["never"])
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected(seed=7, tokens=9)
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 9


def test_a_stream_without_include_usage_has_no_usage(oai):
    chunks = list(oai.chat.completions.create(model="sim", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected()


def test_models_lists_what_online_agents_serve(oai):
    # One name per model, Ollama's full one: "sim" and "sim:latest" are the same model.
    assert [model.id for model in oai.models.list()] == ["sim:latest"]
    assert oai.models.retrieve("sim").id == oai.models.retrieve("sim:latest").id == "sim:latest"


def test_an_unknown_model_is_an_openai_404(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_a_backend_failure_mid_stream_raises_in_the_client_after_the_tokens_so_far(oai):
    stream = oai.chat.completions.create(model="sim", messages=MESSAGES, stream=True,
                                            extra_body={"options": {"sim_error_after": 4}})
    text = ""
    with pytest.raises(openai.APIError, match="simulated failure"):
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == expected(tokens=4)


def test_a_backend_failure_without_stream_is_an_openai_error(oai):
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(model="sim", messages=MESSAGES, extra_body={"options": {"sim_drop_after": 2}})
    assert caught.value.status_code == 502
    assert caught.value.code == "agent_error"
    assert "lost after 2 tokens" in caught.value.message


def test_api_keys_guard_every_user_endpoint(live_server_factory, tmp_path):
    server = live_server_factory(tmp_path / "keys.db", ORCH_API_KEYS="k-one,k-two")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10) as anonymous:
        with pytest.raises(openai.AuthenticationError) as caught:
            anonymous.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k-two", max_retries=0, timeout=10) as keyed:
        assert list(keyed.models.list()) == []
    chat = {"model": "sim", "messages": MESSAGES}
    for path in ("/api/v1/chat/stream", "/v1/chat/completions", "/api/chat"):
        assert status_of("POST", server.url + path, json=chat) == 401, path
        # With a key the request gets past the check (and finds no agent for the model).
        assert status_of("POST", server.url + path, json=chat, headers={"Authorization": "Bearer k-one"}) == 404, path
    assert status_of("GET", server.url + "/api/tags") == 401


def status_of(method: str, url: str, headers: dict | None = None, **kwargs) -> int:
    # Connection: close, or the idle keep-alive connection holds up the server's graceful stop.
    headers = {"Connection": "close", **(headers or {})}
    with requests.request(method, url, headers=headers, timeout=10, **kwargs) as response:
        return response.status_code


# --- bad input, in process ------------------------------------------------------

@pytest.fixture
def served(app, dbconn):
    """An online agent declaring the model "sim", so requests get past the model check."""
    touch(dbconn, add_agent(dbconn, "a").id, time.time(), ["sim"])


def post(client, payload: dict):
    return client.post("/v1/chat/completions", json={"model": "sim", "messages": MESSAGES, **payload})


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.data[:300]
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    return error


@pytest.mark.parametrize("payload, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0]"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"reasoning_effort": "maximal"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"model": None}, "model"),
])
def test_bad_parameters_are_openai_400s_naming_the_parameter(client, served, dbconn, payload, param):
    error = assert_openai_error(post(client, payload), 400, param)
    assert error["type"] == "invalid_request_error"
    assert dbconn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_malformed_json_and_unknown_routes_keep_the_openai_shape(client):
    response = client.post("/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)
    assert_openai_error(client.post("/v1/completions", json={}), 404)
    assert_openai_error(client.get("/v1/models/ghost"), 404, "model")


def test_openai_content_parts_and_the_developer_role_become_plain_messages(client, served, dbconn):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    response = post(client, {"messages": [{"role": "developer", "content": "Be terse."},
                                                     {"role": "user", "content": parts}], "stream": True})
    assert response.status_code == 200
    response.close()
    messages, front_door = dbconn.execute("SELECT messages, front_door FROM jobs").fetchone()
    assert json.loads(messages) == [{"role": "system", "content": "Be terse."},
                                    {"role": "user", "content": "Hello there"}]
    assert front_door == "openai"

