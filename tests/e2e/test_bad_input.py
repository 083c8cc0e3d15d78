"""Bad input is refused: every endpoint, against a real gunicorn server.

Each case gets a 4xx in its endpoint's own error shape (the native envelope,
OpenAI's error object or Ollama's ``{"error": "..."}``), stores nothing, and
leaves no traceback in the server's log.  Agent requests are validly signed,
so what is tested is validation, not authentication.  An agent is online and
serves the model ``m``, and it holds a running job: a request wrongly
accepted would show up as a new row or a changed job.
"""
from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from devtools.processes import LiveServer
from server.config import DEFAULTS
from server.storage import jobs, migrated
from tests.signed import sign
from tests.stack import stored_rows

NATIVE, OPENAI, OLLAMA = "native", "openai", "ollama"
JOB = "{job}"                      # replaced by the id of the job the agent holds
TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    shape: str
    valid: dict[str, Any] = field(default_factory=dict)   # a body that would be accepted
    signed: bool = False


HELLO = [{"role": "user", "content": "hi"}]
CHAT = Endpoint("POST", "/api/v1/chat/stream", NATIVE, {"model": "m", "messages": HELLO})
COMPLETIONS = Endpoint("POST", "/v1/chat/completions", OPENAI, {"model": "m", "messages": HELLO})
OLLAMA_CHAT = Endpoint("POST", "/api/chat", OLLAMA, {"model": "m", "messages": HELLO})
GENERATE = Endpoint("POST", "/api/generate", OLLAMA, {"model": "m", "prompt": "hi"})
EMBED = Endpoint("POST", "/api/embed", OLLAMA, {"model": "m", "input": "hi"})
EMBEDDINGS = Endpoint("POST", "/v1/embeddings", OPENAI, {"model": "m", "input": "hi"})
STREAM = Endpoint("POST", "/api/v1/inference/stream", NATIVE, {"id": JOB, "chunks": ["hi"], "seq": 1}, signed=True)
REPORT = Endpoint("POST", "/api/v1/inference/models", NATIVE, {"models": [{"name": "hi"}]}, signed=True)
POLL = Endpoint("GET", "/api/v1/inference/poll", NATIVE, signed=True)
BODY_ENDPOINTS = (CHAT, COMPLETIONS, OLLAMA_CHAT, GENERATE, EMBED, EMBEDDINGS, STREAM, REPORT)
CHAT_DOORS = (CHAT, COMPLETIONS, OLLAMA_CHAT)


@dataclass(frozen=True)
class Case:
    endpoint: Endpoint
    body: bytes | dict | Callable[[], bytes] | None = None     # a callable is built when sent (10 MB)
    status: int = 400
    path: str | None = None
    content_type: str | None = "application/json"
    chunked: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    def payload(self, job: str) -> bytes | None:
        body = self.body() if callable(self.body) else self.body
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        return None if raw is None else raw.replace(JOB.encode(), job.encode())


def with_(endpoint: Endpoint, **changes: Any) -> dict:
    """The endpoint's valid body with some fields changed (a value of ... removes the field)."""
    body = {**endpoint.valid, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def raw_with(endpoint: Endpoint, hi: bytes) -> bytes:
    """The valid body, serialised, with the string "hi" replaced by ``hi`` (invalid bytes, escapes...)."""
    return json.dumps(endpoint.valid).encode().replace(b'"hi"', hi, 1)


def body_cases(e: Endpoint) -> dict[str, Case]:
    valid = json.dumps(e.valid).encode()
    nested = valid[:-1] + b', "deep": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"

    def huge() -> bytes:
        return valid[:-1] + b', "padding": "' + b"x" * TEN_MB + b'"}'
    # Ollama reads any body as JSON whatever its Content-Type (litellm and `curl -d` send none):
    # on its paths a JSON body without the header is accepted, and a form is refused as not JSON.
    by_type = {"text/plain": Case(e, valid, 415, content_type="text/plain"),
               "no content type": Case(e, valid, 415, content_type=None),
               "a form": Case(e, b"model=m", 415, content_type="application/x-www-form-urlencoded")}
    if e.shape == OLLAMA:
        by_type = {"a form": Case(e, b"model=m", 400, content_type="application/x-www-form-urlencoded"),
                   "not JSON, no content type": Case(e, b"model=m", 400, content_type=None)}
    return by_type | {
        "not JSON": Case(e, b"{not json"),
        "trailing garbage": Case(e, valid + b" garbage"),
        "empty body": Case(e, b""),
        "a JSON array": Case(e, b"[1, 2]"),
        "a JSON string": Case(e, b'"hello"'),
        "JSON null": Case(e, b"null"),
        "invalid UTF-8": Case(e, raw_with(e, b'"h\xff\xfei"')),
        "a lone surrogate": Case(e, raw_with(e, b'"\\ud800"')),
        "NaN": Case(e, valid[:-1] + b', "options": {"temperature": NaN}}'),
        "deeply nested JSON": Case(e, nested),
        "10 MB": Case(e, huge, 413),
        "10 MB chunked": Case(e, huge, 413, chunked=True),
    }


def hostile_cases(e: Endpoint) -> dict[str, Case]:
    """Issue 14: inputs that once gave a 500 (a lone surrogate in options) or queued a 10 KB model name."""
    valid = json.dumps(e.valid).encode()
    cases = {
        "options holding a lone surrogate": valid[:-1] + b', "options": {"stop": ["\\ud800"]}}',
        "an options key holding a lone surrogate": valid[:-1] + b', "options": {"\\udfff": 1}}',
        "a 10 KB model name with newlines": with_(e, model=("x" * 99 + "\n") * 100),
        "a model name of 201 characters": with_(e, model="m" * 201),
        "a model name with a tab": with_(e, model="m\tm"),
    }
    if e is COMPLETIONS:
        cases["stop holding a lone surrogate"] = valid[:-1] + b', "stop": "a\\ud800"}'
    return {name: Case(e, body) for name, body in cases.items()}


def chat_cases(e: Endpoint) -> dict[str, Case]:
    def message(**changes: Any) -> dict:
        return with_(e, messages=[{k: v for k, v in {**HELLO[0], **changes}.items() if v is not ...}])

    cases = {
        "no model": with_(e, model=...), "model not a string": with_(e, model=123), "empty model": with_(e, model=""),
        "blank model": with_(e, model="   "), "messages not a list": with_(e, messages="hi"),
        "a message not an object": with_(e, messages=["hi"]), "unknown role": message(role="wizard"),
        "no role": message(role=...), "role a list": message(role=["user"]), "role an object": message(role={}),
        "content a number": message(content=5), "no content": message(content=...),
        "options a list": with_(e, options=[1]),
    }
    if e.shape != OLLAMA:      # Ollama's chat without messages loads the model: not an error
        cases |= {"no messages": with_(e, messages=...), "empty messages": with_(e, messages=[])}
    cases |= {"status_events not a boolean": with_(e, status_events="yes")} if e is CHAT else {
        "stream not a boolean": with_(e, stream="yes")}
    return {name: Case(e, body) for name, body in cases.items()}


OPENAI_CASES = {
    "temperature out of range": {"temperature": 3}, "temperature a string": {"temperature": "hot"},
    "max_tokens 0": {"max_tokens": 0}, "n 2": {"n": 2}, "stop a number": {"stop": 5},
    "seed past 64 bits": {"seed": 2**70}, "tools": {"tools": [{"type": "function"}]},
    "stream_options without stream": {"stream_options": {"include_usage": True}},
    "an image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "a part not an object": {"messages": [{"role": "user", "content": [5]}]},
}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}
OPENAI_CASES |= {
    "tools not a list": {"tools": {"type": "function"}}, "a tool without a name": {"tools": [{"type": "function",
                                                                                          "function": {}}]},
    "tool_choice required": {"tool_choice": "required"}, "an image not base64": {"messages": [
        {"role": "user", "content": [IMAGE_PART]}]},
    "an image by URL": {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                   "image_url": {"url": "https://x.test/a.png"}}]}]},
    "a schema not an object": {"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
}
OLLAMA_CASES = {
    "images not base64": {"messages": [{**HELLO[0], "images": ["not base64!"]}]},
    "images not a list": {"messages": [{**HELLO[0], "images": "aGk="}]},
    "too many images": {"messages": [{**HELLO[0], "images": ["aGk="] * 17}]},
    "format a number": {"format": 5}, "format a list": {"format": ["json"]},
    "tools not a list": {"tools": "all"}, "a tool not a function": {"tools": [{"type": "retrieval"}]},
    "a tool without a name": {"tools": [{"type": "function", "function": {"name": ""}}]},
    "too many tools": {"tools": [{"type": "function", "function": {"name": "f"}}] * 257},
    "think a word": {"think": "hard"}, "keep_alive forever": {"keep_alive": "forever"},
    "tool call arguments a string": {"messages": [{"role": "assistant", "content": "",
                                                   "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}]},
}
EMBED_CASES = {
    "input a number": {"input": 5}, "input of numbers": {"input": [1, 2]}, "input empty": {"input": []},
    "input with a null": {"input": ["a", None]}, "too many inputs": {"input": ["a"] * 513}, "no input": {"input": ...},
    "no model": {"model": ...},
}
GENERATE_CASES = {
    "no model": {"model": ...}, "model not a string": {"model": 123}, "prompt a number": {"prompt": 5},
    "system a list": {"system": ["x"]}, "options a list": {"options": [1]}, "stream not a boolean": {"stream": "yes"},
    "images not base64": {"images": ["%%%"]}, "suffix": {"suffix": "x"}, "raw": {"raw": True},
    "a schema not an object": {"format": [1]},
}
STREAM_CASES = {
    "no id": {"id": ...}, "null id": {"id": None}, "id a number": {"id": 5}, "empty id": {"id": ""},
    "chunks a string": {"chunks": "hi"}, "chunks of numbers": {"chunks": [1]}, "chunks without seq": {"seq": ...},
    "negative seq": {"seq": -1}, "huge seq": {"seq": 2**40}, "fractional seq": {"seq": 1.5},
    "seq a string": {"seq": "1"}, "seq a boolean": {"seq": True}, "done a string": {"done": "yes"},
    "error without done": {"error": "boom"}, "error a number": {"error": 5, "done": True},
    "stats a list": {"stats": [1], "done": True}, "negative eval_count": {"stats": {"eval_count": -1}, "done": True},
    "eval_count a string": {"stats": {"eval_count": "many"}, "done": True},
    "chunk and chunks": {"chunk": "x"}, "chunk a number": {"chunks": ..., "seq": ..., "chunk": 5},
    "a chunk with an unknown key": {"chunks": [{"txt": "x"}]}, "a chunk's thinking a number": {"chunks": [{"thinking": 5}]},
    "a tool call without a name": {"chunks": [{"tool_calls": [{"function": {}}]}]},
    "an embedding of strings": {"chunks": [{"embedding": ["x"]}]},
}
REPORT_CASES = {
    "models not a list": {"models": {"name": "x"}}, "a model without a name": {"models": [{"size": 1}]},
    "a negative size": {"models": [{"name": "x", "size": -1}]}, "running not a list": {"running": "x"},
    "show not an object": {"models": [{"name": "x", "show": []}]}, "version a number": {"version": 5},
    "too many models": {"models": [{"name": "x"}] * 101},
}


def table() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for e in BODY_ENDPOINTS:
        cases |= {f"{e.path} {name}": case for name, case in body_cases(e).items()}
    for e in CHAT_DOORS:
        cases |= {f"{e.path} {name}": case for name, case in chat_cases(e).items()}
    for e in (*CHAT_DOORS, GENERATE):
        cases |= {f"{e.path} {name}": case for name, case in hostile_cases(e).items()}
    for e, named in ((COMPLETIONS, OPENAI_CASES), (OLLAMA_CHAT, OLLAMA_CASES), (GENERATE, GENERATE_CASES),
                     (STREAM, STREAM_CASES), (EMBED, EMBED_CASES), (EMBEDDINGS, EMBED_CASES), (REPORT, REPORT_CASES)):
        cases |= {f"{e.path} {name}": Case(e, with_(e, **changes)) for name, changes in named.items()}
    stream = STREAM.path
    cases |= {
        f"{stream} seq of 5,000 digits": Case(STREAM, raw_with(STREAM, b'"hi"').replace(b'"seq": 1', b'"seq": ' + b"9" * 5000)),
        f"{stream} seq infinite": Case(STREAM, raw_with(STREAM, b'"hi"').replace(b'"seq": 1', b'"seq": 1e400')),
        f"{stream} seq past the stored chunks": Case(STREAM, with_(STREAM, seq=2**31 - 1), 409),
        f"{stream} unknown job": Case(STREAM, with_(STREAM, id="no-such-job"), 404),
        f"{stream} 200,000 one-character chunks": Case(STREAM, with_(STREAM, chunks=["x"] * 200_000), 413),
    }
    for query in ("wait=-1", "wait=nan", "wait=inf", "wait=1e999", "wait=soon", "wait=%FF", "slots=-1", "slots=1001",
                  "slots=1.5", "slots=x", "models=%01", "models=" + "x" * 201, "models=" + ",".join(map(str, range(101)))):
        cases[f"{POLL.path} {query[:24]}"] = Case(POLL, path=f"{POLL.path}?{query}", content_type=None)
    for shape, path, status, headers in (
            (NATIVE, f"/api/v1/chat/stream/{JOB}?after=abc", 400, ()),
            (NATIVE, f"/api/v1/chat/stream/{JOB}?after=-5", 400, ()),
            (NATIVE, f"/api/v1/chat/stream/{JOB}", 400, (("Last-Event-ID", "x"),)),
            (NATIVE, f"/api/v1/chat/stream/{JOB}", 400, (("Last-Event-ID", "9223372036854775808"),)),
            (NATIVE, f"/api/v1/chat/stream/{JOB}?after=18446744073709551616", 400, ()),
            (NATIVE, "/api/v1/status?minutes=%C2%B2", 400, ()),
            (NATIVE, "/api/v1/chat/stream/no-such-request", 404, ()),
            (NATIVE, "/api/v1/chat/%FF", 404, ()),
            (NATIVE, "/api/v1/status?minutes=0", 400, ()),
            (NATIVE, "/api/v1/status?minutes=abc", 400, ()),
            (NATIVE, "/api/v1/status?minutes=%C2%B2", 400, ()),  # "²": str.isdigit() says yes, int() no
            (NATIVE, "/api/v1/status/series?minutes=%C2%B2", 400, ()),
            (NATIVE, "/api/v1/status/series?minutes=" + "9" * 40, 400, ()),
            (NATIVE, "/api/v1/status/series?minutes=61", 400, ()),
            (OPENAI, "/v1/models/no-such-model", 404, ()),
            (OPENAI, "/v1/models/line%0Afeed", 404, ()),
            (OPENAI, "/v1/no-such-route", 404, ())):
        name = f"GET {path}" + "".join(f" {k}: {v}" for k, v in headers)
        cases[name] = Case(Endpoint("GET", path, shape), status=status, content_type=None, headers=headers)
    return cases


TABLE = table()


# --- the server -------------------------------------------------------------

@dataclass
class Stack:
    server: LiveServer
    creds: Any
    job: str

    def send(self, case: Case) -> tuple[int, str, bytes]:
        method, path = case.endpoint.method, (case.path or case.endpoint.path).replace(JOB, self.job)
        body = case.payload(self.job)
        headers = dict(case.headers)
        if case.content_type:
            headers["Content-Type"] = case.content_type
        if case.endpoint.signed:
            headers |= sign(self.creds, method, path, body or b"")
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            if case.chunked:
                pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
                conn.request(method, path, body=pieces, headers=headers, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    def stored(self) -> dict[str, list]:
        return stored_rows(self.server.database)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    # Long leases and presence: the sweeper changes no row between two snapshots.  A chat wrongly
    # accepted fails its test anyway; the short queue timeout just ends its stream quickly.
    server = LiveServer(tmp / "server.db", tmp / "server.log", {
        "ORCH_AGENT_ONLINE_SECONDS": 3600, "ORCH_LEASE_SECONDS": 3600, "ORCH_DELIVERY_LEASE_SECONDS": 3600,
        "ORCH_QUEUE_TIMEOUT": 2}).start()
    try:
        creds = server.add_agent("validator")
        ready = Stack(server, creds, "")
        with migrated(server.database) as db:
            jobs.create_job(db, "m", HELLO, {}, 0.0)
        poll = Case(POLL, path=f"{POLL.path}?models=m", content_type=None)
        status, _, job = ready.send(poll)
        assert status == 200, job
        ready.job = json.loads(job)["id"]
        ack = Case(STREAM, {"id": ready.job, "chunks": ["Hel"], "seq": 0})
        assert ready.send(ack)[0] == 200
        yield ready
    finally:
        server.stop()


def assert_error_shape(shape: str, content_type: str, body: bytes) -> None:
    assert content_type.startswith("application/json"), content_type
    error = json.loads(body)["error"]
    if shape == OLLAMA:
        assert isinstance(error, str) and error
    elif shape == OPENAI:
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
    else:
        assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str)


@pytest.mark.parametrize("case", TABLE.values(), ids=TABLE.keys())
def test_bad_input_gets_a_4xx_in_the_endpoints_shape_stores_nothing_and_logs_no_traceback(stack, case):
    before, log_start = stack.stored(), len(stack.server.log())
    status, content_type, body = stack.send(case)
    assert status == case.status, body[:300]
    assert_error_shape(case.endpoint.shape, content_type, body)
    if status == 413:   # the limit and the setting that sets it, whatever the door and however the body came
        error = json.loads(body)["error"]
        message = error if isinstance(error, str) else error["message"]
        named = [f"{DEFAULTS['MAX_BODY_BYTES']} bytes", "ORCH_MAX_BODY_BYTES"]
        if "chunks in one POST" in message:
            named = [f"{DEFAULTS['MAX_CHUNKS_PER_POST']} ", "ORCH_MAX_CHUNKS_PER_POST"]
        assert all(part in message for part in named), message
    assert stack.stored() == before
    assert "Traceback" not in stack.server.log()[log_start:]
