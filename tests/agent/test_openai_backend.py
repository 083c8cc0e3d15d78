"""The OpenAI-compatible backend against a tiny scripted OpenAI streaming server on a real socket."""
from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ollama
import openai
import pytest
import requests

from agent.__main__ import build_backend
from agent.backend import BackendError
from agent.config import ConfigError, load_config
from agent.openai_backend import OpenAIBackend, openai_options
from devtools.processes import LiveServer, free_port, launch_agent, start_simulator, wait_until
from sim.tokens import chat_prompt, expected_text

MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]
TOKENS = 30


def chunk(delta: dict, finish_reason: str | None = None, **extra) -> bytes:
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


USAGE = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
GOOD_STREAM = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
               chunk({"content": " 🦙"}), chunk({}, "length"), USAGE, b"data: [DONE]\n\n"]


@dataclass
class Script:
    """What the fake server answers to the next chat: a status and body pieces, sent one by one."""

    status: int = 200
    pieces: list[bytes] = field(default_factory=lambda: list(GOOD_STREAM))
    hold: threading.Event | None = None      # wait for this before piece number `hold_before`
    hold_before: int = 2
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    hung_up: threading.Event = field(default_factory=threading.Event)


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Script

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": "smol"}, {"id": "big"}]}).encode()
        self._reply(200 if self.path == "/v1/models" else 404, body)

    def do_POST(self) -> None:  # noqa: N802
        script = self.server.script
        script.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        script.headers.append(dict(self.headers))
        if script.status != 200:
            return self._reply(script.status, b"".join(script.pieces))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.close_connection = True
        try:
            for i, piece in enumerate(script.pieces):
                if script.hold is not None and i == script.hold_before:
                    while not script.hold.wait(0.01):
                        if hung_up(self.connection):
                            script.hung_up.set()
                            return
                self.wfile.write(piece)
                self.wfile.flush()
        except OSError:
            script.hung_up.set()

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def hung_up(connection: socket.socket) -> bool:
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.fixture
def fake() -> Iterator[tuple[OpenAIBackend, Script]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.daemon_threads = True
    server.script = Script()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="k-123"), server.script
    server.shutdown()
    server.server_close()


def test_tokens_and_stats_come_from_the_stream(fake):
    backend, script = fake
    answer = backend.chat("smol", MESSAGES, {})
    assert list(answer) == ["Hel", "lo", " 🦙"]
    assert answer.stats["done_reason"] == "length"
    assert (answer.stats["prompt_eval_count"], answer.stats["eval_count"]) == (7, 3)
    sent = script.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["model"], sent["messages"]) == ("smol", MESSAGES)
    assert script.headers[0]["Authorization"] == "Bearer k-123"


def test_ollama_options_are_renamed_and_runner_settings_dropped(fake):
    backend, script = fake
    list(backend.chat("smol", MESSAGES, {"num_predict": 5, "temperature": 0.2, "top_p": 0.9, "seed": 42,
                                         "stop": "END", "num_ctx": 4096, "top_k": 20}))
    sent = script.requests[0]
    assert {k: sent[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "top_k")} == \
        {"max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "seed": 42, "stop": ["END"], "top_k": 20}
    assert "num_ctx" not in sent and "num_predict" not in sent


@pytest.mark.parametrize("options, expected", [
    ({"num_predict": -1}, {}),
    ({"num_predict": 0}, {}),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({"num_gpu": 1, "main_gpu": 0}, {}),
])
def test_openai_options_table(options, expected):
    assert openai_options(options) == expected


def test_models_lists_the_ids(fake):
    backend, _ = fake
    assert backend.models() == ["smol", "big"]


def test_finish_reason_without_done_marker_is_a_complete_answer(fake):
    backend, script = fake
    script.pieces = [chunk({"content": "ok"}), chunk({}, "stop")]
    answer = backend.chat("smol", MESSAGES, {})
    assert list(answer) == ["ok"]
    assert answer.stats["done_reason"] == "stop" and answer.stats["eval_count"] == 1


@pytest.mark.parametrize("pieces, message", [
    ([chunk({"content": "Hel"}), b"data: <html>oops</html>\n\n"], "not a JSON object"),
    ([chunk({"content": "Hel"}), b"Internal Server Error\n"], "not an event stream"),
    ([chunk({"content": "Hel"})], "lost after 1 tokens"),
    ([chunk({"content": "Hel"}), b'data: {"error": {"message": "out of memory"}}\n\n'], "out of memory"),
], ids=["non-json-event", "not-sse", "closed-early", "error-event"])
def test_a_broken_stream_raises_instead_of_ending_quietly(fake, pieces, message):
    backend, script = fake
    script.pieces = pieces
    answer = backend.chat("smol", MESSAGES, {})
    tokens = []
    with pytest.raises(BackendError, match=message):
        for token in answer:
            tokens.append(token)
    assert tokens == ["Hel"]
    assert answer.stats is None


def test_an_http_error_carries_the_servers_message(fake):
    backend, script = fake
    script.status = 404
    script.pieces = [b'{"error": {"message": "model smol-x not found", "type": "invalid_request_error"}}']
    with pytest.raises(BackendError, match="404: model smol-x not found"):
        list(backend.chat("smol-x", MESSAGES, {}))


def test_close_from_another_thread_stops_the_stream_and_hangs_up(fake):
    backend, script = fake
    script.hold = threading.Event()
    answer = backend.chat("smol", MESSAGES, {})
    tokens = iter(answer)
    assert next(tokens) == "Hel"
    threading.Timer(0.05, answer.close).start()
    assert list(tokens) == []                    # a quiet end, not an error
    assert answer.closed and answer.stats is None
    wait_until(script.hung_up.is_set, message="the server to see the hang-up")


def test_an_unreachable_server_is_a_backend_error():
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendError, match="not reachable"):
        backend.models()
    with pytest.raises(BackendError, match="not reachable"):
        list(backend.chat("smol", MESSAGES, {}))


def test_backend_openai_needs_a_url_and_builds_the_openai_backend():
    base = {"AGENT_ID": "agt_1", "AGENT_SECRET": "s"}
    with pytest.raises(ConfigError, match="BACKEND_URL"):
        load_config([], base | {"BACKEND": "openai"})
    backend = build_backend(load_config([], base | {"BACKEND": "OpenAI", "BACKEND_URL": "http://gpu:8080/v1",
                                                     "BACKEND_API_KEY": "k"}))
    assert isinstance(backend, OpenAIBackend) and (backend.url, backend.api_key) == ("http://gpu:8080", "k")
    assert build_backend(load_config([], base)).url == "http://127.0.0.1:11434"     # Ollama stays the default


# --- end to end: an agent with BACKEND=openai in front of the simulator's OpenAI routes ----------

@pytest.fixture(scope="module")
def openai_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-backend")
    server = LiveServer(tmp / "server.db", tmp / "server.log", {"ORCH_CANCEL_GRACE": "0"}).start()
    sim = start_simulator(tmp, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", str(TOKENS))
    agent = launch_agent(server, sim.url, tmp / "agent.log", "openai-backend", BACKEND="openai",
                         BACKEND_URL=sim.url + "/v1")
    yield server, sim, agent
    agent.stop(signal.SIGKILL)
    sim.stop()
    server.stop()


@pytest.fixture(scope="module")
def oai(openai_stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=openai_stack[0].url + "/v1", api_key="-", max_retries=0, timeout=30) as client:
        yield client


def expected(seed: int = 0, tokens: int = TOKENS) -> str:
    return expected_text(seed, tokens, "sim", chat_prompt(MESSAGES))


def test_the_agent_serves_an_openai_compatible_engine_through_both_front_doors(openai_stack, oai):
    server = openai_stack[0]
    chunks = list(oai.chat.completions.create(model="sim", messages=MESSAGES, seed=5, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected(seed=5)
    assert chunks[-1].usage.completion_tokens == TOKENS          # the engine's usage, carried as stats
    olla = ollama.Client(host=server.url, timeout=30)
    try:
        answer = olla.chat(model="sim", messages=MESSAGES, options={"num_predict": 7})
        assert [m.model for m in olla.list().models] == ["sim:latest"]     # Ollama's full name, once
    finally:
        olla.close()
    assert answer.message.content == expected(tokens=7) and answer.done_reason == "length"


def test_an_engine_that_closes_early_ends_the_users_stream_with_an_error(openai_stack, oai):
    stream = oai.chat.completions.create(model="sim", messages=MESSAGES, stream=True,
                                         extra_body={"options": {"sim_drop_after": 3}})
    text = ""
    with pytest.raises(openai.APIError, match="lost after 3 tokens"):
        for chunk_ in stream:
            text += chunk_.choices[0].delta.content or ""
    assert text == expected(tokens=3)


def test_a_user_who_leaves_closes_the_engines_stream(openai_stack, oai):
    _, sim, _ = openai_stack
    requests.post(sim.url + "/sim/reset", timeout=5)
    stream = oai.chat.completions.create(model="sim", messages=MESSAGES, stream=True,
                                         extra_body={"options": {"sim_tokens": 5000, "sim_interval_ms": 20}})
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()

    def engine_saw_the_hang_up() -> bool:
        return any(r["event"] == "client_gone" for r in sim.records())

    wait_until(engine_saw_the_hang_up, 15, 0.05, "the simulator to see the agent hang up")
