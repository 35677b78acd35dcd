"""The real page in Debian Chromium (Playwright, never `playwright install`): the demo family loads
on its own, moving the prune-rate slider changes the histogram's keep thresholds, then merge,
chat and score by clicking, and a full-page screenshot lands in artifacts/ (git-ignored).
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("DPPA_UI_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from dppa_ui import zoo  # noqa: E402

try:
    zoo.demo_path("base")
except ValueError:
    pytest.skip("the demo family (assets/zoo) is not built", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def url():
    from dppa_ui.ui import build_app, launch_options
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(30_000)
        try:
            yield pg
        finally:
            browser.close()


def drawn_threshold(page, model: str = "reverse") -> float:
    """The keep threshold the histogram draws for `model` (its legend: 'reverse threshold 0.0042 ...')."""
    text = page.locator("#histogram").inner_text()
    m = re.search(rf"{model} threshold ([0-9.e+-]+)", text)
    assert m, text[:500]
    return float(m.group(1))


def test_select_inspect_merge_chat_score(url, page):
    expect = sync_api.expect
    page.goto(url, wait_until="domcontentloaded")
    # 1. the demo family is preselected and loads on page open
    expect(page.locator("#models-status")).to_contain_text("loaded demo:base", timeout=60_000)
    expect(page.locator("#finetunes")).to_contain_text("demo:reverse")
    # 3. histogram + thresholds drawn; a different preset and prune rate move the threshold
    page.locator("#histogram").scroll_into_view_if_needed()      # plots and tables render when visible
    expect(page.locator("#histogram .js-plotly-plot")).to_have_count(1, timeout=60_000)
    expect(page.locator("#thresholds")).to_contain_text("demo:brackets")
    page.locator("#preset label", has_text="ties").first.click()
    page.locator("#histogram").scroll_into_view_if_needed()
    expect(page.locator("#preset-info")).to_contain_text("elects a sign")
    expect(page.locator("#dp-lambda")).to_be_hidden()
    expect(page.locator("#histogram")).to_contain_text("— ties")
    expect(page.locator("#histogram")).to_contain_text("(density 0.200)")
    before = drawn_threshold(page)
    page.locator("#prune-rate input[type=range]").fill("0.95")           # move the slider
    expect(page.locator("#histogram")).to_contain_text("(density 0.050)")
    after = drawn_threshold(page)
    assert after > before > 0, (before, after)
    # 4. merge
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-summary")).to_contain_text("Run 1: ties", timeout=60_000)
    expect(page.locator("#leaderboard")).to_contain_text("density 0.05")
    # 5. chat with the merged model, the base answering beside it
    page.locator("#chat-input textarea").fill("reverse: buyoul")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-merged")).to_contain_text("reverse: buyoul", timeout=60_000)
    expect(page.locator("#chat-compare")).to_contain_text("reverse: buyoul", timeout=60_000)
    # 6. score
    page.locator("#score-btn").click()
    expect(page.locator("#score-status")).to_contain_text("scored", timeout=120_000)
    page.locator("#score-plot").scroll_into_view_if_needed()
    expect(page.locator("#score-plot .js-plotly-plot")).to_have_count(1)
    expect(page.locator("#objective")).to_contain_text("Objective")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui_full_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
