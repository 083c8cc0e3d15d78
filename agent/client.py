"""The server's agent protocol: signed polls and chunk POSTs, HTTP statuses mapped to `agent.exceptions`.

Sessions: `requests.Session` is not documented as thread-safe, and here the
poll loop and one batcher thread per job talk to the server at once. Each
request borrows a Session from a small pool and gives it back, so no two
threads ever share one while every connection is still reused: the pool
holds at most one Session per thread that was ever busy at once (MAX_JOBS
batchers + the poll loop). Per-thread Sessions would not do: batcher
threads live for one job, so every job would open, and leak, a connection.

Proxies: the environment's HTTP(S)_PROXY, ALL_PROXY and NO_PROXY apply as
`requests` applies them, but are resolved once for `api_base` (every request
goes there) and passed to each send: resolving them per request cost
0.65-1.6 ms of every POST (`requests.utils.resolve_proxies`). Nothing else
changes: `Session.send`, unlike `Session.request`, never read `.netrc` or
`REQUESTS_CA_BUNDLE`, and `trust_env` stays at its default.
"""
from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlencode, urlsplit

import requests

from agent.batcher import ChunkBatch, SendReply
from agent.exceptions import (
    AgentError,
    JobGone,
    MalformedJob,
    ProtocolError,
    SeqConflict,
    TransportError,
    rejection,
)
from agent.job import Job
from protocol.signing import signed_headers
from protocol.wire import LEAVE_PATH, MODELS_PATH, POLL_PATH, STREAM_PATH

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0  # a chunk POST is one short transaction; beyond this the server is in trouble
# The goodbye at a warm stop is one UPDATE; a server slower than this must not hold up the stop.
LEAVE_TIMEOUT = 5.0
USER_AGENT = "ollama-orchestrator-agent/0.1"


class ServerClient:
    """Talks to the orchestrator as agent `agent_id`; `keep_alive=False` opens a connection per request."""

    def __init__(self, api_base: str, agent_id: str, secret: str, *, keep_alive: bool = True,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.api_base = api_base.rstrip("/")
        self.agent_id = agent_id
        self._secret = secret
        self.keep_alive = keep_alive
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._sessions: queue.LifoQueue[requests.Session] = queue.LifoQueue()
        self._proxies = environ_proxies(self.api_base)

    def poll(self, models: Sequence[str], slots: int, wait: float = 0,
             kinds: Sequence[str] | None = None) -> Job | None:
        """Ask for one job of `models` and `kinds` (None: plain chats, as older agents); None when there is none."""
        params = {"models": ",".join(models), "slots": slots}
        if wait > 0:
            params["wait"] = f"{wait:g}"
        if kinds is not None:
            params["kinds"] = ",".join(kinds)
        query = urlencode(params, safe=",:/")
        response = self._request("GET", f"{POLL_PATH}?{query}", None, self.read_timeout + wait)
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise self._error(response)
        try:
            data = response.json()
        except ValueError:
            raise MalformedJob(f"the poll answer is not JSON: {response.text[:80]!r}") from None
        return Job.from_json(data)

    def send(self, batch: ChunkBatch) -> SendReply:
        """POST one batch: the `TokenBatcher`'s `send`."""
        response = self._post_stream(batch.to_json())
        # A 200 whose body we cannot read: the batch was stored, but the next seq is unknown.
        try:
            data = response.json()
            return SendReply(bool(data.get("cancelled")), int(data.get("next_seq", batch.end_seq)))
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError(f"unreadable answer to POST seq {batch.seq}: {response.text[:80]!r}",
                                status=response.status_code) from None

    def report(self, report: dict) -> None:
        """POST what the engine says of its models (`protocol.models`); raises an `AgentError` on failure."""
        data = json.dumps(report, ensure_ascii=False).encode()
        response = self._request("POST", MODELS_PATH, data, self.read_timeout)
        if response.status_code != 200:
            raise self._error(response)

    def send_legacy(self, job_id: str, chunk: str, done: bool, error: str | None = None) -> bool:
        """The old agent's POST: one `chunk`, no seq. Returns `cancelled`."""
        body: dict = {"id": job_id, "chunk": chunk, "done": done}
        if error is not None:
            body["error"] = error
        response = self._post_stream(body)
        try:
            return bool(response.json().get("cancelled"))
        except (ValueError, AttributeError):
            return False

    def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Tell the server this agent stops taking jobs (a warm stop): one attempt, no retry; raises AgentError."""
        response = self._request("POST", LEAVE_PATH, None, timeout)
        if response.status_code != 200:
            raise self._error(response)

    def close(self) -> None:
        """Close every pooled connection."""
        while True:
            try:
                self._sessions.get_nowait().close()
            except queue.Empty:
                return

    def _post_stream(self, body: dict) -> requests.Response:
        data = json.dumps(body, ensure_ascii=False).encode()
        response = self._request("POST", STREAM_PATH, data, self.read_timeout)
        if response.status_code != 200:
            raise self._error(response)
        return response

    def _request(self, method: str, path: str, body: bytes | None, read_timeout: float) -> requests.Response:
        headers = {"User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        prepared = requests.Request(method, self.api_base + path, data=body, headers=headers).prepare()
        # Sign exactly what goes on the wire: the encoded path and query, the body bytes.
        prepared.headers.update(signed_headers(self.agent_id, self._secret, method, prepared.path_url,
                                               body or b"", int(time.time())))
        with self._session() as session:
            try:
                return session.send(prepared, timeout=(self.connect_timeout, read_timeout), proxies=self._proxies)
            except requests.RequestException as exc:
                raise TransportError(f"{method} {path.split('?')[0]}: {_describe(exc)}") from None

    @contextmanager
    def _session(self) -> Iterator[requests.Session]:
        if not self.keep_alive:
            with requests.Session() as session:  # what the old agent's requests.post() did
                yield session
            return
        try:
            session = self._sessions.get_nowait()
        except queue.Empty:
            session = requests.Session()
        try:
            yield session
        except BaseException:
            # Interrupted mid-response (a stop signal) or failed: its connection state is unknown.
            session.close()
            raise
        self._sessions.put(session)

    def _error(self, response: requests.Response) -> AgentError:
        status = response.status_code
        message = _server_message(response)
        if status == 409:
            try:
                return SeqConflict(int(response.json()["error"]["expected_seq"]))
            except (ValueError, KeyError, TypeError):
                return ProtocolError(f"409 without expected_seq: {message}", status=status)
        if status in (403, 404, 410):
            return JobGone(message, status=status)
        if status == 401:
            return rejection(message, _error_field(response, "code"), _error_field(response, "server_time"))
        if status >= 500 or status == 429:
            # 503 storage_unavailable, 429 too_many_requests: the server's trouble or its pace; retry later.
            return TransportError(f"server error {status}: {message}", status=status)
        return ProtocolError(f"unexpected {status}: {message}", status=status)


def environ_proxies(url: str) -> dict[str, str]:
    """The proxy the environment names for `url`, as `requests` picks it per request: `{scheme: proxy}` or `{}`."""
    scheme = urlsplit(url).scheme
    found = requests.utils.get_environ_proxies(url)  # {} when NO_PROXY covers the host
    proxy = found.get(scheme, found.get("all"))
    return {scheme: proxy} if proxy else {}


def _error_field(response: requests.Response, name: str) -> object:
    """A field of the server's error envelope, or None."""
    try:
        error = response.json()["error"]
        return error.get(name) if isinstance(error, dict) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _server_message(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("message") or error.get("code")) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:200].strip() or response.reason or str(response.status_code)


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection refused or lost"
    if isinstance(exc, requests.Timeout):
        return "timed out waiting for the answer"
    return f"{type(exc).__name__}: {exc}"
