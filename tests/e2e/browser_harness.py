"""What the browser tests share: Debian's Chromium through Playwright, and a network (a real gunicorn
server, `python -m agent` and the Ollama simulator) for the pages to talk to.

conftest.py loads this module as a plugin, so its fixtures (browser, page, new_page, start_network) are
there for every test; a browser test module imports the helpers it uses and sets ``pytestmark =
requires_browser``: where Chromium or the playwright package is missing the tests are skipped with
the reason (`.ci/install-browser` installs Chromium where it can).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.processes import AgentProcess, LiveServer, Simulator, launch_agent

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's
# services, and this machine's closed network refuses its connections.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000
DESKTOP = {"width": 1100, "height": 800}
PHONE = {"width": 375, "height": 667}  # an iPhone SE's CSS pixels, the narrowest common phone
# Screenshots go under each test's tmp_path; set this to collect a copy of them all in one folder.
SCREENSHOT_COPY_ENV = "BROWSER_SCREENSHOTS"


def _skip_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install -e '.[dev]'"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: .ci/install-browser installs it (needs root and apt-get)"
    return None


requires_browser = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


# --- the network: server, simulator, agent ---------------------------------------------------------

BROWSER_AGENT = "browser-agent"


@dataclass
class Network:
    server: LiveServer
    simulator: Simulator
    agent: AgentProcess

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def start_network(live_server_factory, simulator, tmp_path) -> Iterator:
    """``start_network(**server_env)``: a live server with one agent (`python -m agent`) in front of the
    simulator, online when it returns."""
    agents: list[AgentProcess] = []

    def start(**server_env: str) -> Network:
        server = live_server_factory(**server_env)
        agents.append(launch_agent(server, simulator.url, tmp_path / f"agent-{len(agents)}.log", BROWSER_AGENT,
                                   MAX_JOBS=2, SHUTDOWN_TIMEOUT=2))
        return Network(server, simulator, agents[-1])

    yield start
    for agent in agents:
        agent.stop(timeout=15)


# --- the browser -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser):
    """``new_page(viewport=DESKTOP, **context_options)``: a fresh page; an uncaught JavaScript error fails the test."""
    contexts, errors = [], []

    def new(viewport: dict = DESKTOP, **options):
        context = browser.new_context(viewport=viewport, **options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        tab = context.new_page()
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        return tab

    yield new
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(new_page):
    """A fresh desktop-sized page; an uncaught JavaScript error fails the test."""
    return new_page()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(locator)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Save the page (as a person sees it) under ``tmp_path``, and a copy where $BROWSER_SCREENSHOTS says."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path)
    if os.environ.get(SCREENSHOT_COPY_ENV):
        Path(os.environ[SCREENSHOT_COPY_ENV]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ[SCREENSHOT_COPY_ENV]) / path.name)
    return path


# --- the chat page ---------------------------------------------------------------------------------

def ask(page, prompt: str, options: dict | None = None):
    """Type ``prompt`` (with ``options`` in the Advanced dialog) and send it; returns the answer's element."""
    expect(page.locator("#model")).not_to_have_value("")
    if options is not None:
        page.click("#advanced-open")
        page.fill("#options", json.dumps(options))
        page.click("#advanced-done")
        expect(page.locator("#advanced")).to_be_hidden()
    answers = page.locator(".msg.assistant")
    count = answers.count()
    page.fill("#prompt", prompt)
    page.click("#send")
    return answers.nth(count)


def stored_conversations(page) -> dict:
    """What the chat page keeps in localStorage: ``{"version", "current", "conversations"}``."""
    raw = page.evaluate("localStorage.getItem('orchestrator.conversations')")
    return json.loads(raw) if raw else {}


def current_messages(page) -> list[dict]:
    """The stored messages of the conversation on screen."""
    stored = stored_conversations(page)
    return next(c["messages"] for c in stored["conversations"] if c["id"] == stored["current"])


def fake_stream(page, deltas: list[str], *, error: dict | None = None, request_id: str = "r1") -> None:
    """Answer the page's next chats with these deltas (then [DONE], or an error event), without a network."""
    body = "".join(f"id: {i}\ndata: {json.dumps({'delta': text})}\n\n" for i, text in enumerate(deltas))
    body += f"event: error\ndata: {json.dumps({'error': error})}\n\n" if error else "data: [DONE]\n\n"
    page.unroute("**/api/v1/chat/stream")
    page.route("**/api/v1/chat/stream", lambda route: route.fulfill(
        status=200, body=body, headers={"Content-Type": "text/event-stream", "X-Request-Id": request_id}))


def fake_models(page, *names: str) -> None:
    page.route("**/api/v1/models", lambda route: route.fulfill(
        json={"models": [{"name": name, "agents": 1, "slots": 1} for name in names]}))


def box(locator) -> dict:
    """The element's bounding box in CSS pixels, relative to the viewport."""
    found = locator.bounding_box()
    assert found is not None, f"{locator} is not rendered"
    return found
