"""The Ollama simulator, driven as a real subprocess over real sockets."""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from devtools.processes import Simulator, start_simulator
from sim.tokens import SPECIAL_TOKENS, chat_prompt, expected_text, generate_tokens

STARTUP_DEADLINE = 15.0
POLL_DEADLINE = 10.0
CLOCK_TOLERANCE = 0.001  # time.time() against time.monotonic() deadlines
FAST = {"sim_first_token_ms": 5, "sim_interval_ms": 5}
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
FINAL_STATS = (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
)
MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]
LISTENING = re.compile(r"simulator listening on (http://\S+)\n")


def start(workdir: Path, *args: str, emit_log: Path | None = None) -> Simulator:
    """`python -m sim --port 0 ...` through the harness; its one stdout line is exactly the documented one."""
    simulator = start_simulator(workdir, *args, emit_log=emit_log, timeout=STARTUP_DEADLINE)
    assert LISTENING.fullmatch(simulator.listening_line), simulator.listening_line
    return simulator


def records_of(sim: Simulator, req: int) -> list[dict]:
    """This request's records from `GET /sim/log`."""
    return [record for record in sim.records() if record["req"] == req]


def wait_for_records(sim: Simulator, req: int, done: Callable[[list[dict]], bool]) -> list[dict]:
    """Poll `/sim/log` until `done(records)` holds, failing after a deadline."""
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        found = records_of(sim, req)
        if done(found):
            return found
        time.sleep(0.01)
    pytest.fail(f"request {req} never reached the expected state: {records_of(sim, req)}")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    workdir = tmp_path_factory.mktemp("simulator")
    simulator = start(workdir, "--models", "sim,llama3:8b", "--first-token-ms", "5", "--interval-ms", "5",
                      "--tokens", "12", emit_log=workdir / "emit.jsonl")
    yield simulator
    simulator.stop()


def post(sim: Simulator, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{sim.url}{path}", json=body, timeout=10, **kwargs)


def ndjson(response: requests.Response) -> list[dict]:
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.content.endswith(b"\n")
    return [json.loads(line) for line in response.content.split(b"\n")[:-1]]


def test_tokens_are_deterministic_words_with_regular_multibyte_and_escaped_specials():
    tokens = generate_tokens(7, 60, "sim", "hello")
    assert tokens == generate_tokens(7, 60, "sim:latest", "hello")
    assert tokens[:10] == generate_tokens(7, 10, "sim", "hello")
    assert tokens != generate_tokens(8, 60, "sim", "hello")
    assert tokens != generate_tokens(7, 60, "sim", "goodbye")
    assert all(tokens)
    assert sum(token in SPECIAL_TOKENS for token in tokens) == 12
    text = "".join(tokens)
    assert any(ord(char) > 0xFFFF for char in text), "a 4-byte UTF-8 character"
    assert "\u200d" in text and "\u0301" in text and "日本語" in text
    assert '"' in text and "\\" in text and "\n" in text
    assert expected_text(7, 60, "sim", "hello") == text


def test_streamed_chat_is_ndjson_with_ollamas_fields_and_the_expected_text(sim):
    response = post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "options": {**FAST, "sim_tokens": 25}})
    assert response.status_code == 200
    lines = ndjson(response)
    *tokens, final = lines
    assert len(tokens) == 25
    for line in lines:
        assert line["model"] == "sim"
        assert RFC3339_NANO.match(line["created_at"])
        assert line["message"]["role"] == "assistant"
    assert all(line["done"] is False and line["message"]["content"] for line in tokens)
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert all(isinstance(final[key], int) for key in FINAL_STATS)
    assert final["eval_count"] == 25
    text = "".join(line["message"]["content"] for line in tokens)
    assert text.encode() == expected_text(0, 25, "sim", chat_prompt(MESSAGES)).encode()
    wire = response.content.decode("utf-8")
    assert all(char in wire for char in text if ord(char) > 0x7F), "multi-byte characters travel as raw UTF-8"


def test_generate_streams_response_tokens_with_the_expected_text(sim):
    options = {**FAST, "sim_tokens": 15, "sim_seed": 3}
    response = post(sim, "/api/generate", {"model": "llama3:8b", "prompt": "Why?", "options": options})
    *tokens, final = ndjson(response)
    assert all(line["done"] is False and "message" not in line for line in tokens)
    assert "".join(line["response"] for line in tokens) == expected_text(3, 15, "llama3:8b", "Why?")
    assert final["done"] is True and final["response"] == "" and final["eval_count"] == 15


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/chat", {"messages": MESSAGES}, lambda obj: obj["message"]["content"]),
    ("/api/generate", {"prompt": MESSAGES[0]["content"]}, lambda obj: obj["response"]),
])
def test_stream_false_answers_one_object_with_the_whole_text(sim, path, body, field):
    response = post(sim, path, {"model": "sim", "stream": False, "options": FAST, **body})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    assert answer["done"] is True and answer["done_reason"] == "stop" and answer["eval_count"] == 12
    assert field(answer) == expected_text(0, 12, "sim", MESSAGES[0]["content"])


def test_num_predict_caps_the_answer_with_done_reason_length(sim):
    response = post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "options": {**FAST, "num_predict": 4}})
    *tokens, final = ndjson(response)
    assert len(tokens) == 4 and final["done_reason"] == "length" and final["eval_count"] == 4
    assert "".join(t["message"]["content"] for t in tokens) == expected_text(0, 4, "sim", chat_prompt(MESSAGES))


def test_empty_messages_only_load_the_model(sim):
    response = post(sim, "/api/chat", {"model": "sim", "messages": []})
    assert response.json()["done_reason"] == "load"
    assert response.json()["message"] == {"role": "assistant", "content": ""}


def test_tags_lists_the_configured_models(sim):
    models = requests.get(f"{sim.url}/api/tags", timeout=5).json()["models"]
    assert [model["name"] for model in models] == ["sim:latest", "llama3:8b"]
    for model in models:
        assert {"name", "model", "modified_at", "size", "digest", "details"} <= model.keys()
        assert RFC3339_NANO.match(model["modified_at"])


def test_root_and_version_answer_like_ollama(sim):
    root = requests.get(sim.url, timeout=5)
    assert root.text == "Ollama is running" and root.headers["Content-Type"].startswith("text/plain")
    assert requests.get(f"{sim.url}/api/version", timeout=5).json()["version"]


def test_keep_alive_serves_several_requests_on_one_connection(sim):
    chat = json.dumps({"model": "sim", "messages": MESSAGES, "options": FAST})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    local_ports = set()
    try:
        for method, path, body in [("GET", "/api/version", None), ("POST", "/api/chat", chat),
                                   ("GET", "/api/tags", None)]:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            local_ports.add(conn.sock.getsockname()[1])
    finally:
        conn.close()
    assert len(local_ports) == 1


def test_unknown_model_is_404_with_ollamas_error(sim):
    response = post(sim, "/api/chat", {"model": "nope", "messages": MESSAGES})
    assert response.status_code == 404
    assert response.json() == {"error": 'model "nope" not found, try pulling it first'}


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"messages": []}', b'{"model": 3}'])
def test_malformed_or_modelless_body_is_400_with_an_error(sim, body):
    response = requests.post(f"{sim.url}/api/generate", data=body, timeout=5)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


def test_sim_error_after_ends_the_stream_with_an_error_line(sim):
    response = post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "options": {**FAST, "sim_error_after": 3}})
    assert response.status_code == 200
    lines = ndjson(response)
    assert len(lines) == 4 and all(line["done"] is False for line in lines[:3])
    assert lines[-1] == {"error": "simulated failure"}


def test_sim_status_answers_that_status_at_once(sim):
    response = post(sim, "/api/generate", {"model": "sim", "prompt": "hi", "options": {"sim_status": 500}})
    assert response.status_code == 500
    assert response.json() == {"error": "simulated status 500"}


def test_sim_drop_after_cuts_the_connection_without_a_done_line(sim):
    options = {**FAST, "sim_drop_after": 2}
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as conn:
        conn.sendall(raw_request("/api/chat", {"model": "sim", "messages": MESSAGES, "options": options}))
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b'"done":false') == 2
    assert b'"done":true' not in received
    assert not received.endswith(b"0\r\n\r\n"), "no closing chunk"
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "options": options})


def test_client_going_away_stops_generation_and_is_recorded(sim):
    options = {"sim_first_token_ms": 5, "sim_interval_ms": 5, "sim_tokens": 400}
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as conn:
        conn.sendall(raw_request("/api/chat", {"model": "sim", "messages": MESSAGES, "options": options}))
        received = b""
        while received.count(b'"done":false') < 2:
            data = conn.recv(65536)
            assert data, "the simulator closed the connection first"
            received += data
    req = int(re.search(rb"X-Sim-Request: (\d+)", received).group(1))
    records = wait_for_records(sim, req, lambda records: any(r["event"] == "client_gone" for r in records))
    assert records[-1]["event"] == "client_gone", "no token after the client went away"
    assert records[-1]["i"] >= 2
    assert [r["i"] for r in records if r["event"] == "token"] == list(range(records[-1]["i"]))


def test_emit_log_file_has_one_token_record_per_token(sim):
    response = post(sim, "/api/generate", {"model": "sim", "prompt": "count", "options": {**FAST, "sim_tokens": 9}})
    req = int(response.headers["X-Sim-Request"])
    tokens = [line["response"] for line in ndjson(response)[:-1]]
    wait_for_records(sim, req, lambda records: records and records[-1]["event"] == "done")
    lines = [json.loads(line) for line in sim.emit_log.read_text(encoding="utf-8").splitlines()]
    mine = [record for record in lines if record["req"] == req]
    assert [r["event"] for r in mine] == ["start"] + ["token"] * 9 + ["done"]
    assert [(r["i"], r["text"]) for r in mine if r["event"] == "token"] == list(enumerate(tokens))


def test_tokens_are_never_emitted_before_they_are_due(sim):
    options = {"sim_first_token_ms": 30, "sim_interval_ms": 10, "sim_tokens": 4}
    for _ in range(2):  # the second request finds the model loaded: it must wait all the same
        response = post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "options": options})
        req = int(response.headers["X-Sim-Request"])
        records = wait_for_records(sim, req, lambda records: records and records[-1]["event"] == "done")
        start = records[0]["t"]
        due = [start + (30 + 10 * i) / 1000 for i in range(4)]
        assert all(r["t"] >= due[r["i"]] - CLOCK_TOLERANCE for r in records if r["event"] == "token")


def test_sim_reset_clears_the_log(sim):
    post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES, "stream": False, "options": FAST})
    assert requests.get(f"{sim.url}/sim/log", timeout=5).json()
    assert requests.post(f"{sim.url}/sim/reset", timeout=5).status_code == 200
    assert requests.get(f"{sim.url}/sim/log", timeout=5).json() == []


def test_first_request_for_a_model_waits_for_load_ms_and_reports_it(tmp_path):
    sim = start(tmp_path, "--load-ms", "50", "--first-token-ms", "1", "--interval-ms", "1", "--tokens", "2")
    try:
        first, second = (post(sim, "/api/generate", {"model": "sim", "prompt": "hi", "stream": False}).json()
                         for _ in range(2))
    finally:
        sim.stop()
    assert first["load_duration"] == pytest.approx(50_000_000, abs=1_000)
    assert second["load_duration"] == 0


def test_sigterm_mid_stream_exits_cleanly_with_code_zero(tmp_path):
    sim = start(tmp_path, "--first-token-ms", "1", "--interval-ms", "5", "--tokens", "10000")
    with post(sim, "/api/chat", {"model": "sim", "messages": MESSAGES}, stream=True) as response:
        assert json.loads(next(response.iter_lines()))["done"] is False
        assert sim.stop() == 0


def raw_request(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload
