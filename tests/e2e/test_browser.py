"""The chat and status pages in Debian's Chromium (headless, through Playwright), against a real
server (gunicorn with the gevent worker), a real agent (`python -m agent`) and the Ollama simulator:
streaming, stopping, resuming, errors, and hostile API answers shown as text.

Markdown, kept conversations and the phone layout are in test_browser_chat.py, the status page's charts
in test_browser_status.py; the harness they share is browser_harness.py. Each test writes screenshots
under its temporary folder so a person can look at the page.
"""
from __future__ import annotations

import json
import socket
import threading

import requests

from devtools.processes import wait_until
from sim.tokens import chat_prompt, expected_text
from tests.e2e.browser_harness import (
    BROWSER_AGENT,
    ask,
    current_messages,
    expect,
    requires_browser,
    screenshot,
)

pytestmark = requires_browser


def words(text: str) -> str:
    """Text with its whitespace runs as single spaces: Markdown turns line breaks into layout."""
    return " ".join(text.split())


# --- a network you can cut -------------------------------------------------------------------------

class CuttableProxy:
    """A TCP proxy in front of the server; ``cut()`` drops every open connection, like a network failure."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._sent: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def sent(self) -> bytes:
        """Everything the browser sent upstream so far."""
        with self._lock:
            return b"".join(self._sent)

    def cut(self) -> int:
        """Close every open connection at once; new ones still get through. Returns how many were cut."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(sockets) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    with self._lock:
                        self._sent.append(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --- the tests -------------------------------------------------------------------------------------

def test_chat_page_streams_the_simulators_exact_text(start_network, page, tmp_path):
    network = start_network()
    page.goto(network.url + "/")
    prompt = "Tell me about llamas"

    answer = ask(page, prompt, {"sim_tokens": 40, "sim_interval_ms": 10})

    expect(answer).to_have_attribute("data-state", "done")
    model = page.input_value("#model")
    text = expected_text(0, 40, model, prompt)
    assert current_messages(page)[-1]["content"] == text  # kept exactly, and sent back with the next question
    assert words(answer.locator(".text").inner_text()) == words(text)
    expect(answer.locator(".ttft")).to_contain_text("first token")
    expect(answer.locator(".rate")).to_contain_text("tokens/s")
    expect(answer.locator(".count")).to_have_text("40 tokens")
    expect(answer.locator(".error")).to_be_hidden()
    record = requests.get(f"{network.url}/api/v1/chat/{answer.get_attribute('data-request-id')}", timeout=5).json()
    assert record["status"] == "done"
    screenshot(page, tmp_path, "chat")

    # The follow-up carries the whole conversation: the simulator's answer depends on every message.
    follow_up = ask(page, "And alpacas?", {"sim_tokens": 12, "sim_interval_ms": 5})
    expect(follow_up).to_have_attribute("data-state", "done")
    sent = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text},
            {"role": "user", "content": "And alpacas?"}]
    assert current_messages(page)[-1]["content"] == expected_text(0, 12, model, chat_prompt(sent))


def test_stop_aborts_the_stream_and_cancels_the_job(start_network, page, tmp_path):
    # A grace far beyond the deadline below: the Stop button's DELETE must cancel, not the disconnect.
    network = start_network(ORCH_CANCEL_GRACE="120")
    page.goto(network.url + "/")

    answer = ask(page, "Talk for a long time", {"sim_tokens": 5000, "sim_interval_ms": 20})
    expect(answer).to_have_attribute("data-state", "streaming")
    page.click("#stop")

    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.locator("#send")).to_be_enabled()
    wait_until(lambda: any(r["event"] == "client_gone" for r in network.simulator.records()), 20, 0.1,
               "the simulator to see its client go away")
    record = requests.get(f"{network.url}/api/v1/chat/{answer.get_attribute('data-request-id')}", timeout=5).json()
    assert record["status"] == "cancelled"
    assert answer.locator(".text").text_content() != ""
    assert current_messages(page)[-1]["state"] == "stopped"
    screenshot(page, tmp_path, "chat-stopped")


def test_a_dropped_connection_resumes_without_gap_or_repeat(start_network, page, tmp_path):
    network = start_network()
    proxy = CuttableProxy(network.server.port)
    try:
        page.goto(proxy.url + "/")
        prompt = "Keep going through the outage"
        answer = ask(page, prompt, {"sim_tokens": 300, "sim_interval_ms": 20})
        expect(answer).to_have_attribute("data-state", "streaming")  # mid-answer: about 6 s to go

        assert proxy.cut() >= 1

        expect(answer).to_have_attribute("data-state", "done")
        model = page.input_value("#model")
        assert current_messages(page)[-1]["content"] == expected_text(0, 300, model, prompt)
        assert int(answer.get_attribute("data-resumes")) >= 1
        expect(answer.locator(".resumes")).to_contain_text("resumed after")
        request_id = answer.get_attribute("data-request-id")
        sent = proxy.sent().lower()
        assert f"get /api/v1/chat/stream/{request_id}".encode() in sent
        assert b"\r\nlast-event-id: " in sent
    finally:
        proxy.close()
    screenshot(page, tmp_path, "chat-resumed")


def test_an_error_event_shows_as_an_error_not_as_text(start_network, page):
    network = start_network()
    page.goto(network.url + "/")
    prompt = "Fail after three tokens"

    answer = ask(page, prompt, {"sim_tokens": 10, "sim_error_after": 3, "sim_interval_ms": 5})

    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_be_visible()
    assert answer.locator(".error").get_attribute("data-code") == "agent_error"
    model = page.input_value("#model")
    assert current_messages(page)[-1]["content"] == expected_text(0, 3, model, prompt)
    assert words(answer.locator(".text").inner_text()) == words(expected_text(0, 3, model, prompt))


def test_status_page_lists_the_agent_behind_the_admin_token(start_network, page, tmp_path):
    network = start_network(ORCH_ADMIN_TOKEN="operator-token")
    # One finished chat, so the page has outcomes and latencies to show. Connection: close, because
    # an idle keep-alive connection would hold up the server's graceful stop for 10 s.
    answer = requests.post(network.url + "/api/v1/chat/stream", headers={"Connection": "close"}, timeout=30,
                           json={"model": "sim", "messages": [{"role": "user", "content": "warm up"}]})
    assert answer.text.endswith("data: [DONE]\n\n")

    page.goto(network.url + "/status")
    expect(page.locator("#banner")).to_contain_text("admin token")
    page.fill("#admin-token", "operator-token")
    page.click("#token-form button")

    row = page.locator("#agents tbody tr", has_text=BROWSER_AGENT)
    expect(row).to_be_visible()
    expect(row.locator(".chip", has_text="sim:latest")).to_be_visible()
    expect(page.locator("#tile-agents")).to_have_text("1")
    expect(page.locator("#outcomes .outcome-done + dd")).to_have_text("1")
    assert network.agent.creds.secret not in page.content()
    screenshot(page, tmp_path, "status")


# --- escaping: the page's own rendering, fed hostile API answers -------------------------------------

HOSTILE = ["<script>window.pwned = 1</script>", ' <img src=x onerror="window.pwned = 2">', " & <b>bold</b>"]


def test_answers_and_errors_containing_markup_show_as_text(live_server, page, tmp_path):
    chunks = "".join(f"id: {i}\ndata: {json.dumps({'delta': text})}\n\n" for i, text in enumerate(HOSTILE))
    replies = iter([
        chunks + "data: [DONE]\n\n",
        'event: error\ndata: {"error": {"code": "agent_error", "message": "<img src=x onerror=\\"window.pwned = 3\\">"}}\n\n',
    ])
    page.route("**/api/v1/models", lambda route: route.fulfill(
        json={"models": [{"name": "<b>m</b>", "agents": 1, "slots": 1}]}))
    page.route("**/api/v1/chat/stream", lambda route: route.fulfill(
        status=200, body=next(replies), headers={"Content-Type": "text/event-stream", "X-Request-Id": "r1"}))
    page.goto(live_server.url + "/")

    answer = ask(page, "<i>hello</i>")
    expect(answer).to_have_attribute("data-state", "done")
    failed = ask(page, "again")
    expect(failed).to_have_attribute("data-state", "error")

    assert answer.locator(".text").text_content().strip() == "".join(HOSTILE)
    assert page.locator(".msg.user .text").first.text_content() == "<i>hello</i>"
    assert failed.locator(".error").text_content() == '<img src=x onerror="window.pwned = 3">'
    assert page.input_value("#model") == "<b>m</b>"
    assert page.locator("#log img, #log b, #log i, #log script").count() == 0
    assert page.evaluate("window.pwned") is None
    screenshot(page, tmp_path, "chat-escaping")


def test_status_page_shows_agent_names_and_models_as_text(live_server, page):
    hostile = '<img src=x onerror="window.pwned = 4">'
    page.route("**/api/v1/status*", lambda route: route.fulfill(json={
        "now": 1000.0, "window_seconds": 300, "current_rate_seconds": 5,
        "agents": [{"id": "agt_1", "name": hostile, "models": [hostile], "slots": 1, "last_seen": 999.0,
                    "jobs_done": 0, "tokens_streamed": 0, "tokens_per_second": None,
                    "current_tokens_per_second": None}],
        "queue": [{"model": hostile, "queued": 1, "active": 0}],
        "requests": {"by_status": {"done": 0, "failed": 1, "cancelled": 0}, "errors": {hostile: 1}},
        "first_token_latency": {"samples": 0, "p50": None, "p95": None},
    }))
    page.goto(live_server.url + "/status")

    expect(page.locator("#agents tbody tr")).to_have_count(1)
    assert page.locator("#agents .agent-name").text_content().startswith(hostile)
    assert page.locator("#agents .chip").text_content() == hostile
    assert page.locator("#queue td").first.text_content() == hostile
    expect(page.locator("#errors")).to_contain_text(hostile)
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.pwned") is None
