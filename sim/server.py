"""The simulator's HTTP server: Ollama's routes answered from a plan, with its timing and faults (see `sim`)."""
from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from protocol.models import canonical_model
from sim import features
from sim.log import EmitLog
from sim.models import ModelRoutes
from sim.openai import OpenAIRoutes
from sim.plan import (
    Plan,
    SimConfig,
    SimError,
    build_plan,
)
from sim.tokens import chat_prompt
from sim.wire import Turn, chunk, dumps, model_entry, rfc3339

log = logging.getLogger(__name__)

VERSION = "0.0.0-simulator"
NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"


class SimulatorServer(ThreadingHTTPServer):
    """The HTTP server: configured models, the emission log and which models are loaded."""

    daemon_threads = True
    request_queue_size = 1024  # the benchmark opens hundreds of connections at once

    def __init__(self, address: tuple[str, int], config: SimConfig, emit_log: EmitLog) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, SimulatorHandler)
        self.config = config
        self.emit_log = emit_log
        self.models = [canonical_model(name) for name in config.models]
        self.modified_at = rfc3339(time.time_ns())
        self._ready_at: dict[str, float] = {}
        self._ready_lock = threading.Lock()

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """Log a failed connection instead of printing a traceback; the connection is dropped."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away between requests", client_address)
        else:
            log.error("request from %s failed; dropping the connection", client_address, exc_info=True)

    def ready_at(self, model: str, now: float) -> float:
        """The `time.monotonic()` at which `model` is loaded; the first request for it, at `now`, starts the load."""
        with self._ready_lock:
            return self._ready_at.setdefault(model, now + self.config.load_ms / 1000)

    def loaded(self) -> list[str]:
        """The models that were asked for (what `/api/ps` lists)."""
        with self._ready_lock:
            return sorted(self._ready_at)


class SimulatorHandler(OpenAIRoutes, ModelRoutes, BaseHTTPRequestHandler):
    """Answers one connection's requests the way Ollama would."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # latency is measured per token: no 40 ms Nagle stalls
    server_version = "ollama-simulator/" + VERSION
    server: SimulatorServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/": self._root, "/api/version": self._version, "/api/tags": self._tags,
                        "/api/ps": self._ps, "/v1/models": self._openai_models,
                        "/sim/log": self._log})

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/api/chat": self._chat, "/api/generate": self._generate, "/sim/reset": self._reset,
                        "/api/show": self._show, "/api/embed": self._embed, "/api/embeddings": self._embeddings,
                        "/v1/chat/completions": self._openai_chat})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, routes: dict) -> None:
        self._req = None
        route = routes.get(urlsplit(self.path).path)
        try:
            # Read the body even when unrouted, so the next request on this connection parses.
            self._body = self._read_body()
            if route is None:
                return self._send(404, b"404 page not found", "text/plain")
            route()
        except SimError as exc:
            self._send(exc.status, dumps({"error": exc.message}), JSON)

    def _read_body(self) -> bytes:
        if "Content-Length" not in self.headers and self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise SimError(400, "chunked request bodies are not supported by the simulator")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise SimError(400, "invalid Content-Length") from None
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> dict:
        if not self._body.strip():
            raise SimError(400, "missing request body")
        try:
            body = json.loads(self._body)
        except ValueError as exc:
            raise SimError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise SimError(400, "request body must be a JSON object")
        return body

    def _send(self, status: int, body: bytes, content_type: str = JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self._req is not None:
            self.send_header("X-Sim-Request", str(self._req))
        self.end_headers()
        self._write(b"" if self.command == "HEAD" else body)

    def _write(self, data: bytes) -> bool:
        """Write and flush `data`; False when the client has gone."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def _root(self) -> None:
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self) -> None:
        self._send(200, dumps({"version": VERSION}))

    def _tags(self) -> None:
        self._send(200, dumps({"models": [model_entry(m, self.server.modified_at) for m in self.server.models]}))

    def _log(self) -> None:
        self._send(200, dumps(self.server.emit_log.snapshot()))

    def _reset(self) -> None:
        self.server.emit_log.clear()
        self._send(200, dumps({"status": "ok"}))

    def _chat(self) -> None:
        body = self._json_body()
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise SimError(400, "messages must be a list of objects")
        self._answer("chat", body, chat_prompt(messages), loading=not messages, messages=messages)

    def _generate(self) -> None:
        body = self._json_body()
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise SimError(400, "prompt must be a string")
        self._answer("generate", body, prompt, loading=not prompt)

    def _answer(self, kind: str, body: dict, prompt: str, loading: bool, messages: list[dict] = ()) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise SimError(400, "model is required")
        name = canonical_model(model)
        if name not in self.server.models:
            raise SimError(404, f'model "{model}" not found, try pulling it first')
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise SimError(400, "options must be an object")
        prompt += features.check(body, name, list(messages))
        plan = features.shape(build_plan(self.server.config, name, prompt, options), body, list(messages))
        stream = body.get("stream") is not False
        turn = self._start(kind, model, prompt, plan, stream, options.get("sim_tag"))
        if loading:
            self._answer_load(turn, body.get("keep_alive") == 0)
        elif stream:
            self._stream(turn)
        else:
            self._answer_whole(turn)

    def _start(self, kind: str, model: str, prompt: str, plan: Plan, stream: bool, tag: object) -> Turn:
        """Log a request's start and return its turn; raises `SimError` for the plan's simulated status."""
        # One instant for every clock, so a token's logged `t` is never before start `t` + its offset.
        started_ns, now, started_t = time.perf_counter_ns(), time.monotonic(), time.time()
        ready = max(now, self.server.ready_at(canonical_model(model), now))
        turn = Turn(self.server.emit_log.next_request(), kind, model, prompt, plan, ready,
                    int((ready - now) * 1e9), started_ns)
        self._req = turn.req
        self.server.emit_log.record("start", turn.req, t=started_t, model=model, endpoint=kind, stream=stream,
                                    **({"tag": tag} if isinstance(tag, str) else {}))
        if plan.status is not None:
            self.server.emit_log.record("error", turn.req, kind="status", status=plan.status)
            raise SimError(plan.status, f"simulated status {plan.status}")
        return turn

    def _answer_load(self, turn: Turn, unload: bool) -> None:
        # Ollama's documented "load a model" request: no tokens, one object, even when streaming.
        if not self._await_client(turn.ready):
            return self._client_gone(turn, 0)
        reason = "unload" if unload else "load"
        self._send(200, turn.line("", done_reason=reason, done=True).rstrip(b"\n"))
        self.server.emit_log.record("done", turn.req, done_reason=reason)

    def _stream(self, turn: Turn) -> None:
        # HTTP/1.0 has no chunks: there the body is the bytes sent until the connection closes.
        frame = bytes if self.request_version == "HTTP/1.0" else chunk
        self.send_response(200)
        self.send_header("Content-Type", NDJSON)
        if frame is chunk:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.send_header("X-Sim-Request", str(turn.req))
        self.end_headers()
        plan, emit_log = turn.plan, self.server.emit_log
        for i, token in enumerate(plan.tokens):
            if not self._await_client(turn.ready + plan.offsets[i]):
                return self._client_gone(turn, i)
            if plan.fault_at == i:
                return self._stream_fault(turn, i, frame)
            data = frame(turn.line(token, done=False))
            t = time.time()
            if not self._write(data):
                return self._client_gone(turn, i)
            emit_log.record("token", turn.req, t=t, i=i, text=token)
        count = len(plan.tokens)
        if plan.fault_at == count:
            return self._stream_fault(turn, count, frame)
        if not self._write(frame(turn.final()) + frame(b"")):
            return self._client_gone(turn, count)
        emit_log.record("done", turn.req, done_reason=plan.done_reason)

    def _stream_fault(self, turn: Turn, i: int, frame: Callable[[bytes], bytes]) -> None:
        self.server.emit_log.record("error", turn.req, kind=turn.plan.fault, i=i)
        if turn.plan.fault == "error":
            self._write(frame(dumps({"error": "simulated failure"}) + b"\n") + frame(b""))
        else:
            self._drop()

    def _answer_whole(self, turn: Turn) -> None:
        if self._await_whole(turn):
            self._send(200, turn.final(turn.plan.tokens).rstrip(b"\n"))
            self.server.emit_log.record("done", turn.req, done_reason=turn.plan.done_reason)

    def _await_whole(self, turn: Turn) -> bool:
        """Wait until a non-streamed answer is complete; False when there is nothing to send.

        A planned fault drops the connection or raises `SimError` 500.
        """
        plan = turn.plan
        stop = len(plan.tokens) if plan.fault_at is None else plan.fault_at
        if not self._await_client(turn.ready + plan.offsets[stop]):
            self._client_gone(turn, stop)
            return False
        if plan.fault is not None:
            self.server.emit_log.record("error", turn.req, kind=plan.fault, i=stop)
            if plan.fault == "drop":
                self._drop()
                return False
            raise SimError(500, "simulated failure")
        return True

    def _client_gone(self, turn: Turn, i: int) -> None:
        self.close_connection = True
        self.server.emit_log.record("client_gone", turn.req, i=i)

    def _drop(self) -> None:
        # Like a crashed Ollama: the connection ends with no final line and no closing chunk.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _await_client(self, deadline: float) -> bool:
        """Wait until the monotonic `deadline`; False as soon as the client hangs up."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        while (remaining := deadline - time.monotonic()) >= 0.001:
            if poller.poll(int(remaining * 1000)):  # whole ms rounded down, so never late
                if self._hung_up():
                    return False
                break  # bytes from a pipelining client: polling would spin, so just sleep
        time.sleep(max(0.0, deadline - time.monotonic()))  # poll(2) cannot wait under 1 ms
        return not self._hung_up()

    def _hung_up(self) -> bool:
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
