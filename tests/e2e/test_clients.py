"""Clients nobody here wrote, unchanged, against the fleet: the `ollama` and `openai` packages, litellm's
`ollama_chat/`, `ollama/` and `openai/` providers, langchain-ollama, and Open WebUI's chat payload.

Each streams a chat, makes one tool call round trip, gets a JSON-format answer, sends an image and
embeds text, through a real gunicorn server, an agent (`python -m agent`) and the Ollama simulator,
whose answers are deterministic (sim/features.py): a tool named in the user's message is called with
arguments made from its schema, `format` makes the answer JSON, embeddings are unit vectors of the text.
Network access stays off in the clients: litellm reads its bundled cost map (LITELLM_LOCAL_MODEL_COST_MAP),
and LangSmith tracing is off unless configured.
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
import requests

from devtools.processes import wait_until
from sim.features import THINKING, embedding, tool_call_for
from sim.tokens import chat_prompt, expected_text
from tests.stack import serving_stack

# Before litellm is imported: its documented switches for no network at import or at call time.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
import litellm  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_ollama import ChatOllama, OllamaEmbeddings  # noqa: E402
from litellm.litellm_core_utils.prompt_templates.factory import ollama_pt  # noqa: E402

TOKENS = 12
ASK = [{"role": "user", "content": "Why is the sky blue?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}
ASK_WEATHER = [{"role": "user", "content": "Use get_weather: is it raining in Paris?"}]
CALLED = tool_call_for(WEATHER)["function"]           # {"name": "get_weather", "arguments": {...}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n a tiny picture").decode()
OPENWEBUI = Path(__file__).parent / "fixtures" / "openwebui_chat.json"


def expected(messages: list[dict] = ASK, tokens: int = TOKENS, seed: int = 0) -> str:
    return expected_text(seed, tokens, "sim", chat_prompt(messages))


def with_image(text: str) -> str:
    """The simulator's prompt for a message carrying PNG (the image's digest joins it)."""
    import hashlib
    return text + f"\n[image {hashlib.sha256(base64.b64decode(PNG)).hexdigest()[:12]}]"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with serving_stack(tmp_path_factory.mktemp("clients"), "clients", TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def olla(stack) -> Iterator[ollama.Client]:
    client = ollama.Client(host=stack.url, timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def oai(stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="-", max_retries=0, timeout=30) as client:
        yield client


# --- the ollama package ------------------------------------------------------------

def test_ollama_streams_a_tool_call_and_takes_the_answer_back(olla):
    parts = list(olla.chat(model="sim", messages=ASK_WEATHER, tools=[WEATHER], stream=True))
    calls = [call for part in parts for call in part.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [(CALLED["name"], CALLED["arguments"])]
    assert parts[-1].done
    history = [*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [{"function": CALLED}]},
               {"role": "tool", "content": "Rain, 12 degrees", "tool_name": "get_weather"}]
    answer = olla.chat(model="sim", messages=history, tools=[WEATHER])
    assert answer.message.content == expected(history) and not answer.message.tool_calls


def test_ollama_gets_json_and_a_schema_answer(olla):
    assert json.loads(olla.chat(model="sim", messages=ASK, format="json").message.content) == {"answer": expected()}
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "ok": {"type": "boolean"}}}
    assert json.loads(olla.generate(model="sim", prompt="x", format=schema).response) == {"age": 1, "ok": True}


def test_ollama_thinking_streams_before_the_answer(olla):
    parts = list(olla.chat(model="sim", messages=ASK, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "".join(THINKING)
    assert "".join(p.message.content for p in parts) == expected()


def test_ollama_sends_an_image(olla):
    messages = [{"role": "user", "content": "What is in this picture?", "images": [PNG]}]
    assert olla.chat(model="sim", messages=messages).message.content == expected(
        [{"content": with_image("What is in this picture?")}])


def test_ollama_embeds_and_shows_what_the_fleet_reports(olla):
    assert [list(v) for v in olla.embed(model="sim", input=["a", "b"]).embeddings] == [
        embedding("sim:latest", "a"), embedding("sim:latest", "b")]
    assert list(olla.embeddings(model="sim", prompt="a").embedding) == embedding("sim:latest", "a")
    shown = olla.show("sim")
    assert set(shown.capabilities) == {"completion", "tools", "thinking", "vision"}
    assert shown.details.family == "sim" and shown.modelinfo["general.architecture"] == "sim"
    listed = olla.list().models
    assert [m.model for m in listed] == ["sim:latest"] and listed[0].size > 0 and listed[0].digest


def test_ollama_ps_lists_the_models_loaded_across_the_fleet(olla):
    olla.chat(model="sim", messages=ASK)
    running = wait_until(lambda: olla.ps().models, 15, 0.2, "the agent to report its loaded model")
    assert [m.model for m in running] == ["sim:latest"] and running[0].size_vram > 0


def test_model_management_is_refused_in_ollamas_shape(olla):
    with pytest.raises(ollama.ResponseError) as caught:
        olla.pull("sim")
    assert caught.value.status_code == 403 and "agents' hosts" in caught.value.error


# --- the openai package ------------------------------------------------------------

def test_openai_streams_a_tool_call_and_takes_the_answer_back(oai):
    chunks = list(oai.chat.completions.create(model="sim", messages=ASK_WEATHER, tools=[WEATHER], stream=True))
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (CALLED["name"], CALLED["arguments"])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather",
                                                             "arguments": calls[0].function.arguments}}]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": "Rain, 12 degrees"}]
    answer = oai.chat.completions.create(model="sim", messages=history, tools=[WEATHER])
    assert answer.choices[0].message.content == expected(history)
    assert answer.choices[0].finish_reason == "stop"


def test_openai_json_image_and_embeddings(oai):
    json_answer = oai.chat.completions.create(model="sim", messages=ASK, response_format={"type": "json_object"})
    assert json.loads(json_answer.choices[0].message.content) == {"answer": expected()}
    picture = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]
    answer = oai.chat.completions.create(model="sim", messages=picture)
    assert answer.choices[0].message.content == expected([{"content": with_image("What is in this picture?")}])
    # The client asks for base64 (float32) unless told otherwise: float32 precision, hence approx.
    vectors = oai.embeddings.create(model="sim", input=["a", "b"])
    assert [d.embedding for d in vectors.data] == [pytest.approx(embedding("sim:latest", text), abs=1e-6)
                                                  for text in ("a", "b")]
    as_floats = oai.embeddings.create(model="sim", input="a", encoding_format="float")
    assert as_floats.data[0].embedding == embedding("sim:latest", "a")


# --- litellm -------------------------------------------------------------------------

def litellm_expected(provider: str, messages: list[dict], images: bool = False) -> str:
    """The simulator's answer as litellm's provider asks: `ollama/` renders the chat as one prompt for
    /api/generate (litellm's own `ollama_pt`), the others send the messages."""
    if provider != "ollama":
        return expected([{"content": with_image(messages[0]["content"][0]["text"])}] if images else messages)
    rendered = ollama_pt("sim", messages)
    prompt = rendered["prompt"] if isinstance(rendered, dict) else rendered
    return expected_text(0, TOKENS, "sim", with_image(prompt) if images else prompt)


@pytest.mark.parametrize("provider", ["ollama_chat", "ollama", "openai"])
def test_litellm_streams_answers_json_and_sees_an_image(stack, provider):
    base = stack.url + ("/v1" if provider == "openai" else "")
    call = {"model": f"{provider}/sim", "api_base": base, "api_key": "-", "timeout": 30}
    stream = litellm.completion(messages=ASK, stream=True, **call)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == litellm_expected(provider, ASK)
    as_json = litellm.completion(messages=ASK, response_format={"type": "json_object"}, **call)
    assert json.loads(as_json.choices[0].message.content) == {"answer": litellm_expected(provider, ASK)}
    picture = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]
    seen = litellm.completion(messages=picture, **call)
    assert seen.choices[0].message.content == litellm_expected(provider, picture, images=True)


@pytest.mark.parametrize("provider", ["ollama_chat", "openai"])
def test_litellm_tool_call_round_trip(stack, provider):
    # litellm's `ollama/` provider has no tool API to pass through (/api/generate takes no tools): it
    # writes the functions into the prompt and asks for JSON, which only a real model can answer.
    base = stack.url + ("/v1" if provider == "openai" else "")
    call = {"model": f"{provider}/sim", "api_base": base, "api_key": "-", "timeout": 30}
    reply = litellm.completion(messages=ASK_WEATHER, tools=[WEATHER], **call).choices[0].message
    called = reply.tool_calls[0]
    assert (called.function.name, json.loads(called.function.arguments)) == (CALLED["name"], CALLED["arguments"])
    history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": called.id, "type": "function", "function": {"name": called.function.name,
                                                           "arguments": called.function.arguments}}]},
               {"role": "tool", "tool_call_id": called.id, "content": "Rain, 12 degrees"}]
    answer = litellm.completion(messages=history, tools=[WEATHER], **call).choices[0].message
    assert answer.content and not answer.tool_calls


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_litellm_embeds(stack, provider):
    base = stack.url + ("/v1" if provider == "openai" else "")
    result = litellm.embedding(model=f"{provider}/sim", input=["a", "b"], api_base=base, api_key="-", timeout=30)
    assert [d["embedding"] for d in result.data] == [embedding("sim:latest", "a"), embedding("sim:latest", "b")]


# --- langchain-ollama --------------------------------------------------------------------

def test_langchain_streams_calls_a_tool_answers_json_sees_an_image_and_embeds(stack):
    llm = ChatOllama(model="sim", base_url=stack.url)
    assert "".join(chunk.content for chunk in llm.stream(ASK[0]["content"])) == expected()

    @tool
    def get_weather(location: str) -> str:
        """Current weather for a city."""
        return "Rain, 12 degrees"

    question = HumanMessage(ASK_WEATHER[0]["content"])
    reply = llm.bind_tools([get_weather]).invoke([question])
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"location": "sim"})]
    answered = llm.bind_tools([get_weather]).invoke(
        [question, reply, ToolMessage(get_weather.invoke(reply.tool_calls[0]["args"]),
                                      tool_call_id=reply.tool_calls[0]["id"])])
    assert answered.content and not answered.tool_calls
    assert json.loads(ChatOllama(model="sim", base_url=stack.url, format="json").invoke("x").content) == {
        "answer": expected([{"content": "x"}])}
    picture = HumanMessage(content=[{"type": "text", "text": "What is in this picture?"},
                                    {"type": "image_url", "image_url": f"data:image/png;base64,{PNG}"}])
    # langchain-ollama joins text parts each after a line feed.
    assert llm.invoke([picture]).content == expected([{"content": with_image("\nWhat is in this picture?")}])
    vectors = OllamaEmbeddings(model="sim", base_url=stack.url).embed_documents(["a", "b"])
    assert vectors == [embedding("sim:latest", "a"), embedding("sim:latest", "b")]


# --- Open WebUI's payload --------------------------------------------------------------

def test_open_webuis_default_chat_with_its_36_tools_streams_a_whole_answer_on_both_doors(stack):
    payload = json.loads(OPENWEBUI.read_text())
    assert len(payload["tools"]) == 36
    with requests.post(stack.url + "/api/chat", data=json.dumps(payload), timeout=30, stream=True,
                       headers={"Connection": "close"}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert "".join(line["message"]["content"] for line in lines) == expected(payload["messages"])
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"
    openai_payload = {k: v for k, v in payload.items() if k != "options"}
    with requests.post(stack.url + "/v1/chat/completions", json=openai_payload, timeout=30, stream=True,
                       headers={"Connection": "close"}) as response:
        events = [line.removeprefix(b"data: ") for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected(payload["messages"])


def test_litellms_ollama_provider_posts_without_a_content_type_and_is_served(stack):
    # What litellm and Ollama's own `curl -d` examples send: JSON with no Content-Type header.
    body = json.dumps({"model": "sim", "messages": ASK, "stream": False}).encode()
    with requests.post(stack.url + "/api/chat", data=body, timeout=30, headers={"Connection": "close"}) as response:
        assert "Content-Type" not in response.request.headers
        assert response.status_code == 200 and response.json()["message"]["content"] == expected()


# --- a client that leaves ----------------------------------------------------------------

@pytest.mark.parametrize("door", ["/api/chat", "/v1/chat/completions"])
def test_a_front_door_client_that_leaves_stops_generation_at_once_whatever_the_grace(
        live_server_factory, simulator, start_agent, door):
    # A grace of a minute: only the door's own rule (OpenAI and Ollama clients cannot resume) can stop
    # the answer within the 15 s deadline below.
    server = live_server_factory(ORCH_CANCEL_GRACE="60")
    start_agent(server, simulator.url, "leaver")
    long = {"model": "sim", "messages": ASK, "stream": True, "options": {"sim_tokens": 5000, "sim_interval_ms": 20}}
    with requests.post(server.url + door, json=long, stream=True, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    wait_until(lambda: any(r["event"] == "client_gone" for r in simulator.records()), 15, 0.05,
               "the simulator to see the agent hang up")
