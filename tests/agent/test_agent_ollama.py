"""The Ollama backend: what it makes of Ollama's NDJSON, good and bad, and closing a stream from another thread."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from agent.backend import BackendError
from agent.ollama import OllamaBackend
from devtools.processes import start_simulator, wait_until
from sim.tokens import chat_prompt, expected_text

MESSAGES = [{"role": "user", "content": "Hello"}]


class Canned(ThreadingHTTPServer):
    """Answers every request with `body` as one chunked NDJSON response."""

    daemon_threads = True

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), CannedHandler)
        self.body, self.status = body, status


class CannedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Canned

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.do_POST()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        body = self.server.body
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


@pytest.fixture
def canned():
    servers: list[Canned] = []

    def serve(body: bytes, status: int = 200) -> OllamaBackend:
        server = Canned(body, status)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        return OllamaBackend(f"http://127.0.0.1:{server.server_address[1]}")

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = start_simulator(tmp_path_factory.mktemp("sim"), "--first-token-ms", "20", "--interval-ms", "5")
    yield simulator
    simulator.stop()


@pytest.fixture
def simulator(sim):
    """The module's simulator with an empty log."""
    requests.post(sim.url + "/sim/reset", timeout=5)
    return sim


def line(content: str, done: bool = False, **extra) -> bytes:
    return json.dumps({"model": "m", "message": {"role": "assistant", "content": content}, "done": done,
                       **extra}).encode() + b"\n"


def test_tokens_then_the_final_lines_statistics(canned):
    backend = canned(line("Hel") + line("lo") + b"\n" + line("", True, done_reason="stop", eval_count=2))
    stream = backend.chat("m", MESSAGES, {})
    assert list(stream) == ["Hel", "lo"]
    assert stream.stats == {"done_reason": "stop", "eval_count": 2}


@pytest.mark.parametrize(("body", "status", "message"), [
    (line("a") + b"<html>oops</html>\n", 200, "Ollama sent a line that is not a JSON object: '<html>oops</html>'"),
    (line("a") + b"[1, 2]\n", 200, "Ollama sent a line that is not a JSON object"),
    (line("a") + b'{"error": "CUDA out of memory"}\n', 200, "Ollama: CUDA out of memory"),
    (line("a"), 200, "the connection to Ollama was lost after 1 tokens"),
    # Ollama refusing the request (4xx) is passed through in its own words, for the user to read.
    (b'{"error": "model \\"x\\" not found, try pulling it first"}', 404,
     'model "x" not found, try pulling it first'),
    (b'{"error": "registry.ollama.ai/library/gemma:2b does not support tools"}', 400,
     "registry.ollama.ai/library/gemma:2b does not support tools"),
    (b"upstream down", 502, "Ollama answered 502: upstream down"),
])
def test_bad_answers_are_one_clear_error(canned, body, status, message):
    stream = canned(body, status).chat("m", MESSAGES, {})
    with pytest.raises(BackendError) as info:
        list(stream)
    assert str(info.value).startswith(message)


def test_models_offer_latest_tags_under_their_plain_name_too(canned):
    backend = canned(b'{"models": [{"name": "llama3:latest"}, {"name": "qwen2:7b"}]}')
    assert backend.models() == ["llama3:latest", "llama3", "qwen2:7b"]


def test_an_unreachable_ollama_is_a_backend_error():
    with pytest.raises(BackendError, match="Ollama at http://127.0.0.1:9 is not reachable"):
        OllamaBackend("http://127.0.0.1:9").models()
    with pytest.raises(BackendError, match="not reachable"):
        list(OllamaBackend("http://127.0.0.1:9").chat("m", MESSAGES, {}))


def test_the_simulators_text_arrives_exactly(simulator):
    stream = OllamaBackend(simulator.url).chat("sim", MESSAGES, {"sim_tokens": 12})
    assert "".join(stream) == expected_text(0, 12, "sim", chat_prompt(MESSAGES))
    assert stream.stats["eval_count"] == 12 and stream.stats["done_reason"] == "stop"


@pytest.mark.parametrize("options", [{"sim_first_token_ms": 60_000}, {"sim_tokens": 5000}],
                         ids=["while-loading", "mid-stream"])
def test_close_from_another_thread_ends_the_stream_and_ollama_sees_the_client_go(simulator, options):
    stream = OllamaBackend(simulator.url).chat("sim", MESSAGES, options)
    tokens: list[str] = []
    reader = threading.Thread(target=lambda: tokens.extend(stream))
    reader.start()
    req = wait_until(lambda: next((r["req"] for r in simulator.records() if r["event"] == "start"), None))
    if "sim_tokens" in options:
        wait_until(lambda: tokens, message="a first token")
    stream.close()
    reader.join(5)
    assert not reader.is_alive() and stream.stats is None
    wait_until(lambda: any(r["event"] == "client_gone" and r["req"] == req for r in simulator.records()),
               message="the simulator's client_gone")


def test_close_before_iterating_never_connects(simulator):
    stream = OllamaBackend(simulator.url).chat("sim", MESSAGES, {})
    stream.close()
    assert list(stream) == []
    assert requests.get(simulator.url + "/sim/log", timeout=5).json() == []
