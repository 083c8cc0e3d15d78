"""The chat page in Chromium: answers as Markdown (and hostile answers inert), conversations kept across
reloads with their history, stored data it cannot read dropped with a notice, and the phone layout.

Answers come from the real network where the test is about the conversation, and from a routed stream
where the test needs an exact answer (Markdown, hostile markup) that the simulator would not write.
"""
from __future__ import annotations

import json

import pytest

from sim.tokens import chat_prompt, expected_text
from tests.e2e.browser_harness import (
    PHONE,
    ask,
    box,
    current_messages,
    expect,
    fake_models,
    fake_stream,
    requires_browser,
    screenshot,
    stored_conversations,
)

pytestmark = requires_browser

CODE = "<script>window.pwned = 1</script>\n<b>not bold</b> & x < y"
MARKDOWN = f"## Installing\n\nRun this, then **restart**:\n\n```html\n{CODE}\n```\n\nDone.\n"

# Every answer below is something a model could write; none of it may act on the page.
ELSEWHERE = "http://images.elsewhere.example"
HOSTILE_MARKDOWN = (
    f'Raw HTML: <img src="{ELSEWHERE}/pixel.png" onerror="window.pwned = 2"> and <b>bold?</b>\n\n'
    "[click me](javascript:window.pwned=3) · [mixed case](JaVaScRiPt:window.pwned=4) · <javascript:window.pwned=5>"
    " · [entity](&#106;avascript:window.pwned=7)\n\n"
    f"![a cat]({ELSEWHERE}/cat.png) and [the docs](https://docs.example.org/guide)\n\n"
    '<a href="javascript:window.pwned=6">raw link</a>\n'
)


def send_routed(page, deltas: list[str], prompt: str = "hi", **stream):
    """Send ``prompt`` and answer it with ``deltas`` through a routed stream; returns the answer once finished."""
    fake_stream(page, deltas, **stream)
    answer = ask(page, prompt)
    expect(answer).not_to_have_attribute("data-state", "waiting")
    expect(answer).not_to_have_attribute("data-state", "streaming")
    return answer


def chunks(text: str, size: int = 7) -> list[str]:
    """``text`` in small deltas, as a model streams it (Markdown arrives half-written)."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def record_csp_violations(page) -> None:
    page.add_init_script("addEventListener('securitypolicyviolation', e =>"
                         " (window.cspViolations = window.cspViolations || []).push(e.blockedURI))")


# --- Markdown --------------------------------------------------------------------------------------

def test_markdown_renders_with_a_code_block_whose_html_shows_as_text_and_copies(live_server, new_page, tmp_path):
    page = new_page(permissions=["clipboard-read", "clipboard-write"])
    fake_models(page, "m")
    page.goto(live_server.url + "/")

    answer = send_routed(page, chunks(MARKDOWN))

    expect(answer).to_have_attribute("data-state", "done")
    body = answer.locator(".text")
    expect(body).to_have_attribute("data-rendered", "markdown")
    expect(body.locator("h2")).to_have_text("Installing")
    expect(body.locator("strong")).to_have_text("restart")
    assert body.locator("pre code").text_content() == CODE + "\n"  # the model's characters, all of them
    assert body.locator("script, b").count() == 0
    assert page.evaluate("window.pwned") is None
    body.locator(".copy-code").click()
    expect(body.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE + "\n"
    screenshot(page, tmp_path, "chat-markdown")


def test_raw_html_javascript_links_and_remote_images_in_an_answer_are_inert(live_server, page, tmp_path):
    record_csp_violations(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    fake_models(page, "m")
    page.goto(live_server.url + "/")

    answer = send_routed(page, chunks(HOSTILE_MARKDOWN))

    body = answer.locator(".text")
    expect(body).to_have_attribute("data-rendered", "markdown")
    # Raw HTML is shown as the model wrote it: escaped, neither run nor removed.
    text = body.text_content()
    assert f'<img src="{ELSEWHERE}/pixel.png" onerror="window.pwned = 2">' in text
    assert "<b>bold?</b>" in text
    assert '<a href="javascript:window.pwned=6">raw link</a>' in text
    assert body.locator("img, b, script, iframe").count() == 0
    # javascript: links are inert text; http(s) links and images stay plain links, nothing is fetched.
    links = body.locator("a")
    assert [link.get_attribute("href") for link in links.all()] == [f"{ELSEWHERE}/cat.png",
                                                                     "https://docs.example.org/guide"]
    expect(links.first).to_have_text("[image: a cat]")
    for inert in body.locator(".inert-link").all():
        inert.click()
    assert body.locator(".inert-link").count() == 4
    assert page.evaluate("window.pwned") is None
    # Nothing even tried to load from elsewhere: no request, and nothing the CSP had to block.
    assert [url for url in requested if not url.startswith(live_server.url)] == []
    assert page.evaluate("window.cspViolations || []") == []
    screenshot(page, tmp_path, "chat-hostile-markdown")


# --- conversations kept across reloads --------------------------------------------------------------

def test_reload_keeps_the_conversation_and_the_history_switches_starts_and_deletes(start_network, page, tmp_path):
    network = start_network()
    page.goto(network.url + "/")
    first = ask(page, "Tell me about llamas", {"sim_tokens": 20, "sim_interval_ms": 5})
    expect(first).to_have_attribute("data-state", "done")
    model = page.input_value("#model")
    llamas = expected_text(0, 20, model, "Tell me about llamas")
    screenshot(page, tmp_path, "chat-before-reload")

    page.reload()

    answer = page.locator(".msg.assistant")
    expect(answer).to_have_count(1)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".count")).to_have_text("20 tokens")
    expect(page.locator(".msg.user .text")).to_have_text("Tell me about llamas")
    assert answer.locator(".text").inner_text().split() == llamas.split()
    expect(page.locator("#chat-title")).to_have_text("Tell me about llamas")
    screenshot(page, tmp_path, "chat-after-reload")

    # The conversation goes on where it was: the model sees the kept messages.
    follow_up = ask(page, "And alpacas?", {"sim_tokens": 8, "sim_interval_ms": 5})
    expect(follow_up).to_have_attribute("data-state", "done")
    sent = [{"role": "user", "content": "Tell me about llamas"}, {"role": "assistant", "content": llamas},
            {"role": "user", "content": "And alpacas?"}]
    assert current_messages(page)[-1]["content"] == expected_text(0, 8, model, chat_prompt(sent))

    # A second conversation, then back to the first, then the second deleted.
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(ask(page, "Something else", {"sim_tokens": 5, "sim_interval_ms": 5})).to_have_attribute("data-state", "done")
    items = page.locator("#history-list li")
    expect(items).to_have_count(2)
    expect(items.first.locator(".history-title")).to_have_text("Something else")
    items.nth(1).locator(".history-open").click()
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator("#chat-title")).to_have_text("Tell me about llamas")
    page.locator("#history-list li", has_text="Something else").locator(".history-delete").click()
    expect(items).to_have_count(1)

    page.reload()
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator("#history-list li")).to_have_count(1)
    assert [c["title"] for c in stored_conversations(page)["conversations"]] == ["Tell me about llamas"]


VALID = {"id": "c1", "title": "Kept", "updated": 1, "messages": [{"role": "user", "content": "kept question"},
                                                                  {"role": "assistant", "content": "kept *answer*",
                                                                   "model": "m", "state": "done"}]}


@pytest.mark.parametrize("stored, notice, kept", [
    ("{not json", "corrupt", 0),
    ("null", "corrupt", 0),
    (json.dumps([VALID]), "corrupt", 0),
    (json.dumps({"version": 1, "conversations": "all of them"}), "corrupt", 0),
    (json.dumps({"conversations": [VALID]}), "another version of this page", 0),
    (json.dumps({"version": 0, "current": "c1", "conversations": [VALID]}), "another version of this page", 0),
    (json.dumps({"version": 2, "current": "c1", "conversations": [VALID]}), "another version of this page", 0),
    (json.dumps({"version": 1, "current": "c1", "conversations": [VALID, {"id": "c2", "title": 5, "messages": []},
                                                                   {"id": "c3", "title": "x", "updated": 2,
                                                                    "messages": [{"role": "system"}]}]}),
     "2 saved conversations were corrupt", 1),
], ids=["not-json", "null", "a-list", "no-list", "unversioned", "older-version", "newer-version", "two-bad-of-three"])
def test_a_stored_conversation_it_cannot_read_is_dropped_with_a_notice_not_a_blank_page(
        live_server, page, tmp_path, request, stored, notice, kept):
    fake_models(page, "m")
    page.goto(live_server.url + "/")
    page.evaluate("value => localStorage.setItem('orchestrator.conversations', value)", stored)

    page.reload()

    expect(page.locator("#notice")).to_be_visible()
    expect(page.locator("#notice")).to_contain_text(notice)
    expect(page.locator("#history-list li[data-id]")).to_have_count(kept)
    if kept:
        expect(page.locator(".msg.assistant .text em")).to_have_text("answer")
    else:
        expect(page.locator("#intro")).to_be_visible()
    screenshot(page, tmp_path, f"chat-dropped-{request.node.callspec.id}")
    # The page works on: the next answer is stored in the current format.
    expect(send_routed(page, ["fine"])).to_have_attribute("data-state", "done")
    assert stored_conversations(page)["version"] == 1
    page.click("#notice-close")
    expect(page.locator("#notice")).to_be_hidden()


# --- layout ----------------------------------------------------------------------------------------

def test_the_advanced_panel_is_an_overlay_that_leaves_the_conversation_its_room(live_server, page, tmp_path):
    fake_models(page, "m")
    page.goto(live_server.url + "/")
    send_routed(page, chunks(MARKDOWN))
    before = box(page.locator("#log"))

    page.click("#advanced-open")

    expect(page.locator("#advanced")).to_be_visible()
    assert box(page.locator("#log")) == before
    dialog = box(page.locator("#advanced"))
    assert dialog["y"] > 0 and dialog["y"] + dialog["height"] < 800
    screenshot(page, tmp_path, "chat-advanced-open")
    page.keyboard.press("Escape")
    expect(page.locator("#advanced")).to_be_hidden()


def test_on_a_phone_the_composer_stays_small_and_an_error_shows_above_it(live_server, new_page, tmp_path):
    page = new_page(viewport=PHONE)
    fake_models(page, "a-model-with-a-long-name:latest")
    page.goto(live_server.url + "/")
    composer = box(page.locator("#composer"))
    # The issue: the composer took 40% of a 375 x 667 screen.
    assert composer["height"] <= 0.25 * PHONE["height"], composer
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= PHONE["width"]
    assert composer["y"] + composer["height"] <= PHONE["height"] + 0.5
    send_routed(page, chunks(MARKDOWN * 3))  # a long answer: the next one starts below the fold
    screenshot(page, tmp_path, "phone-chat-before-error")

    failed = send_routed(page, [], prompt="And then?",
                         error={"code": "agent_lost", "message": "the agent serving this request stopped mid-answer"})

    expect(failed).to_have_attribute("data-state", "error")
    error = failed.locator(".error")
    expect(error).to_be_visible()
    error_box, composer = box(error), box(page.locator("#composer"))
    assert error_box["y"] >= box(page.locator("#log"))["y"]
    assert error_box["y"] + error_box["height"] <= composer["y"], (error_box, composer)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, tmp_path, "phone-chat-after-error")

    # The history opens over the conversation, and closes again.
    page.click("#history-toggle")
    expect(page.locator("#history")).to_be_in_viewport(ratio=1)
    history = box(page.locator("#history"))
    assert history["x"] == 0 and history["width"] <= PHONE["width"]
    expect(page.locator("#history-list li[data-id]")).to_have_count(1)
    screenshot(page, tmp_path, "phone-chat-history")
    page.click("#history-close")
    expect(page.locator("#history")).not_to_be_in_viewport()
