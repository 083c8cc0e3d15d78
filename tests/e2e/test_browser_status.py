"""The status page in Chromium against a real network: charts drawn from live data after chats, each
agent's current tokens/s while it streams, and numbers that stay readable on a 375 px screen."""
from __future__ import annotations

import re
import threading

import requests

from devtools.processes import wait_until
from tests.e2e.browser_harness import (
    BROWSER_AGENT,
    PHONE,
    box,
    expect,
    requires_browser,
    screenshot,
)

pytestmark = requires_browser

TOKEN = "operator-token"

# Where a chart's line reaches: the highest row of canvas pixels drawn in the series' own colour, as a
# fraction of the canvas height (0 = top), or null when the series drew nothing.
HIGHEST_LINE_JS = """([selector, variable]) => {
  const canvas = document.querySelector(`${selector} canvas`);
  const hex = getComputedStyle(document.documentElement).getPropertyValue(variable).trim();
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const { data, width, height } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 4;
      if (data[i + 3] > 200 && Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60) {
        return y / height;
      }
    }
  }
  return null;
}"""


def highest_line(page, chart: str, variable: str = "--accent") -> float | None:
    return page.evaluate(HIGHEST_LINE_JS, [chart, variable])


def chat(url: str, tokens: int, interval_ms: int = 10) -> str:
    # Connection: close, because an idle keep-alive connection would hold up the server's graceful stop.
    answer = requests.post(url + "/api/v1/chat/stream", headers={"Connection": "close"}, timeout=60, json={
        "model": "sim", "messages": [{"role": "user", "content": "count"}],
        "options": {"sim_tokens": tokens, "sim_interval_ms": interval_ms}})
    return answer.text


def open_status(page, url: str) -> None:
    page.goto(url + "/status")
    page.fill("#admin-token", TOKEN)
    page.click("#token-form button")
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")


def test_charts_and_current_rates_draw_from_live_data_after_a_chat(start_network, page, tmp_path):
    network = start_network(ORCH_ADMIN_TOKEN=TOKEN)
    open_status(page, network.url)
    expect(page.locator("#tokens-summary")).to_have_text("No tokens delivered in the last 15 min.")
    expect(page.locator("#latency-summary")).to_have_text("No first token in the last 15 min.")
    expect(page.locator("#tokens-chart")).to_have_attribute("data-points", "60")
    idle_line = highest_line(page, "#tokens-chart")
    assert idle_line is not None and idle_line > 0.6, "an idle network is a flat line at the bottom"
    assert highest_line(page, "#latency-chart") is None
    screenshot(page, tmp_path, "status-before-chat")

    # About 4 s of streaming at 100 tokens/s: the agent's current rate must show it while it lasts.
    streaming = threading.Thread(target=chat, args=(network.url, 400))
    streaming.start()
    try:
        rate_label = "Tokens/s (last 5 s)"
        expect(page.locator("#rate-head")).to_have_text(rate_label)
        expect(page.locator("#tile-rate-label")).to_have_text(rate_label)
        row = page.locator("#agents tbody tr", has_text=BROWSER_AGENT)
        rate = row.locator("td.rate")
        expect(rate).to_have_text(re.compile(r"^[1-9]\d*(\.\d)?$"))
        # Tokens per second, not tokens: the simulator sends at most 100 a second.
        assert 1 <= float(rate.text_content()) <= 150
        screenshot(page, tmp_path, "status-while-streaming")
    finally:
        streaming.join()

    expect(page.locator("#tile-active")).to_have_text("0")  # a refresh after the chat finished
    expect(page.locator("#tokens-summary")).to_contain_text("Peak ")
    expect(page.locator("#latency-summary")).to_contain_text("Latest (")
    expect(page.locator("#latency-summary")).to_contain_text("p95")
    # uPlot draws on its own schedule after new data: poll the canvas with a deadline.
    wait_until(lambda: (highest_line(page, "#tokens-chart") or 1) < 0.3, 10, 0.1, "the tokens/s line to rise")
    # One chat: its p95 point is drawn over its p50 point.
    assert highest_line(page, "#latency-chart", "--warn") is not None
    screenshot(page, tmp_path, "status-after-chat")


def test_status_numbers_stay_readable_on_a_phone(start_network, new_page, tmp_path):
    network = start_network(ORCH_ADMIN_TOKEN=TOKEN)
    assert chat(network.url, 60).endswith("data: [DONE]\n\n")
    page = new_page(viewport=PHONE)

    open_status(page, network.url)
    expect(page.locator("#latency-summary")).to_contain_text("Latest (")

    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "no sideways scrolling"
    values = page.locator(".tile-value, #agents td.num, #outcomes dd")
    assert values.count() >= 6 + 5 + 3
    for value in values.all():
        found = box(value)
        assert 0 <= found["x"] and found["x"] + found["width"] <= PHONE["width"], value.text_content()
        # Nothing cut off inside its box, and large enough to read.
        assert value.evaluate("e => e.scrollWidth <= e.clientWidth || getComputedStyle(e).display === 'inline'")
        assert value.evaluate("e => parseFloat(getComputedStyle(e).fontSize)") >= 14
    for chart in ("#tokens-chart", "#latency-chart"):
        canvas = box(page.locator(f"{chart} canvas"))
        assert canvas["x"] >= 0 and canvas["x"] + canvas["width"] <= PHONE["width"]
        legend = box(page.locator(f"{chart} .u-legend"))
        assert legend["x"] + legend["width"] <= PHONE["width"]
    page.screenshot(path=tmp_path / "status-phone-full.png", full_page=True)
    screenshot(page, tmp_path, "status-phone")
