"""A user's side of the native chat API for end-to-end suites: start a chat, read its SSE events."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from devtools.nginx import Nginx
from devtools.processes import LiveServer
from sim.tokens import chat_prompt, expected_text

SEED = 0  # the simulator's default


def messages(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def expected(content: str, tokens: int, model: str = "sim") -> str:
    return expected_text(SEED, tokens, model, chat_prompt(messages(content)))


@dataclass
class Answer:
    request_id: str
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: dict | None = None


class EventStream:
    """One SSE response, read in steps (an abandoned `iter_lines` would close the connection)."""

    def __init__(self, response: requests.Response, answer: Answer | None = None) -> None:
        self.response = response
        self.answer = answer or Answer(response.headers["X-Request-Id"])
        self._lines = response.iter_lines(chunk_size=1)

    def read(self, stop_after: int | None = None) -> Answer:
        """Events until [DONE], an error, `stop_after` chunks in all, or a lost connection."""
        answer, event = self.answer, {}
        try:
            for raw in self._lines:
                line = raw.decode("utf-8")
                if line:
                    name, _, value = line.partition(": ")
                    event[name] = value
                    continue
                if event.get("data") == "[DONE]":
                    answer.done = True
                    break
                if event.get("event") == "error":
                    answer.error = json.loads(event["data"])["error"]
                    break
                if "id" in event:
                    answer.ids.append(int(event["id"]))
                    answer.text += json.loads(event["data"])["delta"]
                    if stop_after is not None and len(answer.ids) >= stop_after:
                        break
                event = {}
        except requests.ConnectionError:
            pass  # the server went away mid-stream
        return answer


def resume(front: LiveServer | Nginx, answer: Answer) -> Answer:
    """Reconnect to the answer's stream after its last chunk (``Last-Event-ID``), as an EventSource does."""
    headers = {"Last-Event-ID": str(answer.ids[-1])} if answer.ids else {}
    with requests.get(f"{front.url}/api/v1/chat/stream/{answer.request_id}", headers=headers, stream=True,
                      timeout=(5, 60)) as response:
        assert response.status_code == 200, response.text
        return EventStream(response, answer).read()


def start_chat(server: LiveServer | Nginx, content: str, model: str = "sim", **options) -> requests.Response:
    response = requests.post(server.url + "/api/v1/chat/stream", stream=True, timeout=(5, 60),
                             json={"model": model, "messages": messages(content), "options": options})
    assert response.status_code == 200, response.text
    return response


def chat(server: LiveServer | Nginx, content: str, model: str = "sim", **options) -> Answer:
    with start_chat(server, content, model, **options) as response:
        return EventStream(response).read()


def chats_at_once(server: LiveServer | Nginx, contents: list[str], model: str = "sim", **options) -> list[Answer]:
    """One chat per content, all sent at once; their answers, in the order of ``contents``."""
    with ThreadPoolExecutor(len(contents)) as pool:
        return list(pool.map(lambda content: chat(server, content, model, **options), contents))
