"""The real page in Debian Chromium (Playwright, never `playwright install`): the demo family loads
on its own, a slider commit moves the histogram's keep thresholds, merge / chat / score by clicking;
a slider drag sends a bounded number of requests that stop; a typed hub token is stored nowhere in
the browser. Screenshots of the views land in artifacts/ (git-ignored)."""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("DPPA_UI_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
expect = sync_api.expect


@pytest.fixture(scope="module")
def app():
    from dppa_ui.ui import build_app
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    return demo


@pytest.fixture(scope="module")
def url(app):
    from dppa_ui.ui import launch_options
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url, size: tuple[int, int] = (1500, 1000)):
    """A fresh context (its own localStorage and session) on the page, the demo family loaded."""
    page = browser.new_context(viewport={"width": size[0], "height": size[1]}).new_page()
    page.set_default_timeout(30_000)
    joins: list[float] = []
    # The statistics timer's ticks (once a second while whole-model statistics run) are not requests
    # a control sent: they are left out, so the counts below do not move with the machine's load.
    cfg = page.context.request.get(url + "config").json()
    timers = {c["id"] for c in cfg["components"] if c.get("type") == "timer"}
    ticks = {d["id"] for d in cfg["dependencies"] if any(t[0] in timers for t in d["targets"])}

    def sent(r):
        if "/queue/join" in r.url and json.loads(r.post_data or "{}").get("fn_index") not in ticks:
            joins.append(time.time())
    page.on("request", sent)
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#models-status")).to_contain_text("loaded base", timeout=60_000)
    expect(page.locator("#histogram .js-plotly-plot")).to_have_count(1, timeout=60_000)
    return page, joins


def drawn_threshold(page, model: str = "reverse") -> float:
    """The keep threshold the histogram's legend states for `model` ('reverse: keep |δ| ≥ 0.0098, …')."""
    text = page.locator("#histogram").inner_text()
    m = re.search(rf"{model}: keep \|δ\| ≥ ([0-9.e+-]+)", text)
    assert m, text[:500]
    return float(m.group(1))


def shot(page, name: str, locator: str | None = None) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    (page.locator(locator) if locator else page).screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    return path


def settle(page, joins: list[float], quiet: float = 3.0, limit: float = 30.0) -> None:
    """Wait until no request has been sent for `quiet` seconds (fails after `limit`). Waits through
    Playwright, which delivers the page's request events only while it is called (not in a sleep)."""
    t0 = time.time()
    while time.time() - t0 < limit:
        page.wait_for_timeout(200)
        if not joins or time.time() - joins[-1] >= quiet:
            return
    raise AssertionError(f"requests kept coming for {limit} s: {len(joins)} so far")


def test_select_inspect_merge_chat_score(url, browser):
    page, joins = open_page(browser, url)
    expect(page.locator("#thresholds")).to_contain_text("brackets")
    expect(page.locator("#controls-col #preset")).to_be_visible()       # the controls sit beside the plots
    shot(page, "ui_inspect")
    page.locator("#preset input").click()
    page.get_by_role("option", name="TIES · prune → combine", exact=True).click()
    expect(page.locator("#preset-info")).to_contain_text("elects a sign")
    expect(page.locator("#dp-lambda")).to_be_hidden()
    expect(page.locator("#histogram")).to_contain_text("— ties")
    settle(page, joins)
    before = drawn_threshold(page)
    box = page.locator("#density input[type=range]").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.045, box["y"] + box["height"] / 2)   # a click is a release
    expect(page.locator("#histogram")).not_to_contain_text(f"≥ {before:.3g},")
    after = drawn_threshold(page)
    assert after > before > 0, (before, after)
    page.locator("#masks-accordion").scroll_into_view_if_needed()
    shot(page, "ui_masks", "#masks-accordion")
    page.locator("#tab-merge-button, button[role=tab]:has-text('Merge')").first.click()
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-summary")).to_contain_text("run 1: ties", timeout=60_000)
    page.locator("button[role=tab]:has-text('Chat')").first.click()
    page.locator("#chat-examples tr", has_text="reverse").first.click()
    expect(page.locator("#chat-status")).to_contain_text("expected answer")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-compare")).to_contain_text("reverse:", timeout=60_000)
    expect(page.locator("#chat-status")).to_contain_text("expected", timeout=60_000)
    shot(page, "ui_chat")
    page.locator("button[role=tab]:has-text('Score')").first.click()
    page.locator("#score-btn").click()
    expect(page.locator("#score-status")).to_contain_text("scored", timeout=120_000)
    expect(page.locator("#score-plot .js-plotly-plot")).to_have_count(1)
    expect(page.locator("#leaderboard")).to_contain_text("reverse, cipher, sort, brackets")
    shot(page, "ui_score")
    page.context.close()


def test_a_slider_drag_sends_a_bounded_number_of_requests_that_stop(url, browser):
    page, joins = open_page(browser, url)
    settle(page, joins)
    n0 = len(joins)
    box = page.locator("#density input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    for k in range(40):                                   # a 2-second drag across the slider
        page.mouse.move(box["x"] + box["width"] * (0.2 + 0.015 * k), y)
        time.sleep(0.05)
    page.mouse.up()
    settle(page, joins)
    drag = len(joins) - n0
    assert 1 <= drag <= 6, drag                           # one commit: inspect, heatmap, masks
    n1 = len(joins)
    page.locator("#density input[type=range]").focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    settle(page, joins)
    assert 1 <= len(joins) - n1 <= 12, len(joins) - n1    # two key presses: two commits at most
    n2 = len(joins)
    page.wait_for_timeout(5000)
    assert len(joins) == n2                               # and then nothing
    page.context.close()


def test_a_typed_hub_token_is_stored_nowhere_in_the_browser(url, browser):
    page, joins = open_page(browser, url)
    token = "hf_secretTOKEN1234567890"
    page.locator("button[role=tab]:has-text('Merge')").first.click()
    page.locator("#push-accordion").click()
    box = page.locator("#hub-token input")
    if box.is_editable():
        box.fill(token)
        page.locator("#hub-repo input").fill("someone/model")
        page.locator("#push-btn").click()
        expect(page.locator("#push-status")).to_contain_text("⚠", timeout=30_000)
    settle(page, joins)
    storage = page.evaluate("() => JSON.stringify(Object.entries(localStorage)) + JSON.stringify(Object.entries(sessionStorage))")
    assert token not in storage
    runs = page.context.request.get(url + "gradio_api/runs")
    assert token not in runs.text()
    page.context.close()


@pytest.fixture(scope="module", autouse=True)
def apl_cache(tmp_path_factory):
    """APL's importance cache in a folder of this module's own (never ~/.cache)."""
    from dppa_ui import apl
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(apl.CACHE_ENV, str(tmp_path_factory.mktemp("apl-cache")))
        yield


def test_a_tiny_search_streams_its_plot_then_stops_asking(url, browser):
    """Search tab: Start a 6-candidate search; the plot grows while it runs (a point per candidate),
    the table and the test-split line follow, and once it ends the page sends nothing more; the
    best loads into the controls."""
    page, joins = open_page(browser, url)
    page.locator("button[role=tab]:has-text('Search')").first.click()
    expect(page.locator("#search-params")).to_contain_text("density")
    page.locator("#search-budget input").fill("6")
    settle(page, joins)
    page.locator("#search-btn").click()
    points = "() => { const p = document.querySelector('#search-plot .js-plotly-plot');" \
             " return p && p.data && p.data.length === 2 ? p.data[0].x.length : 0 }"
    seen: list[int] = []
    t0 = time.time()
    while time.time() - t0 < 120 and "searched 6" not in page.locator("#search-status").inner_text():
        seen.append(page.evaluate(points))
        page.wait_for_timeout(200)
    expect(page.locator("#search-status")).to_contain_text("test split")
    assert page.evaluate(points) == 6
    assert any(0 < n < 6 for n in seen), seen                    # it was drawn while the search ran
    expect(page.locator("#search-rows")).to_contain_text("weight brackets")
    shot(page, "ui_search", "#views-col")
    n = len(joins)
    page.wait_for_timeout(4000)
    assert len(joins) == n                                        # no request loop once it ended
    page.locator("#search-load-btn").click()
    expect(page.locator("#search-status")).to_contain_text("in the method controls")
    assert page.locator("#weights textarea").input_value() != ""
    page.context.close()


# ------------------------------------------------------------------------------------ every button (issue 16)

def in_view(page, selector: str) -> bool:
    """The element is inside the viewport as it is now (nobody scrolled to it)."""
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    return box is not None and box["y"] >= 0 and box["y"] + min(box["height"], 40) <= size["height"] \
        and box["x"] >= 0 and box["x"] + 10 <= size["width"]


BROKEN_WORDS = """(selector) => { const bad = [];
  for (const th of document.querySelectorAll(selector + ' th')) {
    const walk = document.createTreeWalker(th, NodeFilter.SHOW_TEXT); let node;
    while ((node = walk.nextNode())) { const words = /\\S+/g; let m;
      while ((m = words.exec(node.data))) { const r = document.createRange();
        r.setStart(node, m.index); r.setEnd(node, m.index + m[0].length);
        const lines = new Set(Array.from(r.getClientRects()).filter(x => x.width > 0).map(x => Math.round(x.top)));
        if (lines.size > 1) bad.push(m[0]); } } }
  return bad; }"""


OVERLAPS = """(selector) => { const svg = document.querySelector(selector);
  const boxes = [...svg.querySelectorAll('.g-xtitle, .g-gtitle, .legend, .annotation')].map(e => [e.getAttribute('class'),
    e.getBoundingClientRect()]).filter(([_, r]) => r.width > 0 && r.height > 0);
  const out = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [n1, a] = boxes[i], [n2, b] = boxes[j];
    if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1) out.push(n1 + ' / ' + n2); }
  return out; }"""


def test_every_button_works_and_its_outcome_is_beside_it(app, url, browser):
    """A teacher's session at 1366x768: every button of the page is clicked at least once (the
    registry's buttons; Push only shows that it is off while the server runs offline), each ends
    without an error badge, a toast or a console error, and its outcome is in view of it."""
    import gradio as gr
    page, joins = open_page(browser, url, (1366, 768))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    clicked: set[str] = set()

    def click(elem_id: str):
        page.locator(f"#{elem_id}").click()
        clicked.add(elem_id)

    def calm(where: str):
        bad = page.locator("span.error").count() + page.locator(".toast-body").count()
        assert bad == 0 and not errors, (where, bad, errors)

    def tab(name: str):
        page.locator(f"button[role=tab]:has-text('{name}')").first.click()

    # five fine-tunes: no title or legend of the views lies on another
    page.locator("#sec-models").first.click()
    page.locator("#add-model-box input, #add-model-box textarea").first.fill("demo:reverse_complex")
    click("add-model-btn")
    click("load-models-btn")
    expect(page.locator("#models-status")).to_contain_text("5 fine-tune(s)", timeout=60_000)
    expect(page.locator("#histogram")).to_contain_text("reverse_complex after α", timeout=60_000)
    expect(page.locator("#mask-plot")).to_contain_text("reverse_complex", timeout=60_000)
    assert page.evaluate(OVERLAPS, "#histogram") == [] and page.evaluate(OVERLAPS, "#mask-plot") == []
    # TSV-M and Iso-CTS: each fine-tune's singular values of the matrix on screen, the share kept defined under them
    for title, method, said in (("TSV-M", "tsv_m", "each task's top k"), ("Iso-CTS", "iso_cts", "common subspace")):
        page.locator("#preset input").click()
        page.get_by_role("option", name=f"{title} · prune → combine", exact=True).click()
        expect(page.locator("#method-view")).to_contain_text(f"{method}: singular values", timeout=60_000)
        expect(page.locator("#method-view")).to_contain_text("reverse_complex: σ of its")
        expect(page.locator("#mask-numbers")).to_contain_text(said)
        expect(page.locator("#mask-plot")).to_be_hidden()                  # they mask no entry
        assert page.evaluate(OVERLAPS, "#method-view") == []
        calm(title)
    page.locator("#method-view").scroll_into_view_if_needed()
    shot(page, "ui_svd_view", "#masks-accordion")
    # 8 · Lessons: each one's result beside its button
    tab("Lessons")
    for key in ("dare-vs-dp", "ties-conflicts", "pcb-balance", "dpa-top-band", "slerp-vs-linear"):
        click(f"lesson-{key}")
        expect(page.locator(f"#lesson-note-{key}")).to_contain_text("done", timeout=180_000)
        assert in_view(page, f"#lesson-note-{key}"), key
        calm(key)
    expect(page.locator("#lesson-note-dare-vs-dp")).to_contain_text("run 1 (DP)")
    expect(page.locator("#lesson-note-slerp-vs-linear")).to_contain_text("run 9 (linear)")
    expect(page.locator("#sec-models")).to_contain_text("+ 1 fine-tune")       # the last lesson's models
    assert page.evaluate(BROKEN_WORDS, ".lesson-runs") == []
    # 1 · Models: add a fine-tune, load both
    page.locator("#sec-models").first.click()
    page.locator("#add-model-box input, #add-model-box textarea").first.fill("demo:sort")
    click("add-model-btn")
    expect(page.locator("#models-status")).to_contain_text("added sort")
    assert in_view(page, "#models-status")
    click("load-models-btn")
    expect(page.locator("#models-status")).to_contain_text("2 fine-tune(s)", timeout=60_000)
    calm("load")
    # 2 · Method: auto α (dppa), auto λ (PCB), each result beside its button
    for method, button, status, done in (("DPPA · prune → combine", "auto-alpha-btn", "#alpha-status", "α per fine-tune"),
                                         ("PCB · prune → combine", "auto-lambda-btn", "#lambda-status", "λ per model")):
        page.locator("#preset input").click()
        page.get_by_role("option", name=method, exact=True).click()
        click(button)
        if button == "auto-lambda-btn":       # PCB's budget is 100: the Search tab's Stop ends it early
            expect(page.locator(status)).to_contain_text("candidates", timeout=60_000)
            tab("Search")
            click("search-stop-btn")
            expect(page.locator("#search-status")).to_contain_text("stop requested: the auto λ")
            done = "stopped early"
        expect(page.locator(status)).to_contain_text(done, timeout=180_000)
        assert in_view(page, status), status
        calm(button)
    # 4 · Merge: merge, cancel after it finished, save, SMILE; push is off offline
    tab("Merge")
    # A lesson's merge may have said "run N merged in" already, and that text stays under the
    # progress bar while this merge runs: wait for this merge's own run number.
    last = re.findall(r"run (\d+)", page.locator("#merge-status").inner_text())
    click("merge-btn")
    want = f"run {int(last[-1]) + 1} merged in" if last else "merged in"
    expect(page.locator("#merge-status")).to_contain_text(want, timeout=60_000)
    assert in_view(page, "#merge-status")
    click("cancel-btn")
    expect(page.locator("#merge-status")).to_contain_text("nothing to cancel")
    click("save-btn")
    expect(page.locator("#merge-status")).to_contain_text("saved", timeout=60_000)
    expect(page.locator("#download")).to_be_visible()
    page.locator("#push-accordion").click()
    expect(page.locator("#push-note")).to_contain_text("HF_HUB_OFFLINE=1")
    expect(page.locator("#push-btn")).to_be_disabled()
    clicked.add("push-btn")                    # offline: it cannot be pressed, and says why
    click("smile-btn")
    expect(page.locator("#smile-size")).to_contain_text("a plain merge's 879,232", timeout=180_000)
    expect(page.locator("#merge-summary")).to_contain_text("smile of reverse, sort")
    assert in_view(page, "#smile-size")
    calm("merge")
    # 5 · Chat: an example, send, clear
    tab("Chat")
    page.locator("#chat-examples tr", has_text="cipher").first.click()
    click("chat-send")
    expect(page.locator("#chat-status")).to_contain_text("expected", timeout=120_000)
    assert in_view(page, "#chat-status")
    expect(page.locator("#routing-note")).to_contain_text("tokens", timeout=120_000)    # the SMILE model answered
    expect(page.locator("#chat-routing")).to_be_visible()
    font = page.evaluate("() => getComputedStyle(document.querySelector('#chat-input textarea')).fontFamily")
    assert "mono" in font.lower(), font                     # prompts read letter by letter
    click("chat-clear")
    calm("chat")
    # 6 · Score: score, then the run and YAML buttons, each status beside its buttons
    tab("Score")
    click("score-btn")
    expect(page.locator("#score-status")).to_contain_text("scored", timeout=180_000)
    assert in_view(page, "#score-status")
    assert page.evaluate(BROKEN_WORDS, "#leaderboard") == []          # headers break between words: no "objecti/ve"
    expect(page.locator("#routing-status")).to_contain_text("chance 0.5", timeout=180_000)
    expect(page.locator("#routing-table")).to_contain_text("sort")
    # lm-eval tasks: search lm-eval's own index, then score the picked demo tasks (the SMILE model is the merged one)
    page.locator("#lm-eval-search input, #lm-eval-search textarea").first.fill("arc_e")
    click("lm-eval-find-btn")
    expect(page.locator("#lm-eval-index-status")).to_contain_text("task, group and tag names match", timeout=180_000)
    assert in_view(page, "#lm-eval-index-status")
    page.locator("#lm-eval-limit input").fill("10")
    click("lm-eval-btn")
    expect(page.locator("#lm-eval-status")).to_contain_text("lm-eval task(s)", timeout=180_000)
    expect(page.locator("#lm-eval-status")).to_contain_text("✓ scored 4 models")
    assert in_view(page, "#lm-eval-status")
    expect(page.locator("#lm-eval-plot .js-plotly-plot")).to_have_count(1)
    expect(page.locator("#leaderboard")).to_contain_text("10 docs, 0-shot: zoo_brackets_mc acc")
    shot(page, "ui_lm_eval", "#lm-eval-group >> nth=0")        # gradio gives a Group its id twice
    for button, status, text in (("reload-run-btn", "#runs-status", "settings are back"),
                                 ("export-yaml-btn", "#runs-status", "YAML ready"),
                                 ("load-yaml-btn", "#yaml-status", "config loaded"),
                                 ("plan-yaml-btn", "#yaml-status", "planned"),
                                 ("merge-yaml-btn", "#yaml-status", "merged as written")):
        click(button)
        expect(page.locator(status)).to_contain_text(text, timeout=120_000)
        assert in_view(page, status), button
    name = page.locator("#yaml-file").get_by_role("cell", name="dppa_merge.yaml")
    expect(name).to_be_visible()
    assert name.evaluate("e => e.scrollWidth <= e.clientWidth + 1")              # the whole name, not ".y"
    calm("score")
    # 7 · Search: the plot streams in view of Start; load the best; Stop when none runs
    tab("Search")
    page.locator("#search-budget input").fill("3")
    click("search-btn")
    expect(page.locator("#search-status")).to_contain_text("searched 3", timeout=180_000)
    assert in_view(page, "#search-plot") and in_view(page, "#search-status")
    assert page.evaluate(BROKEN_WORDS, "#search-params") == [] and page.evaluate(BROKEN_WORDS, "#search-rows") == []
    click("search-load-btn")
    expect(page.locator("#search-status")).to_contain_text("in the method controls")
    click("search-stop-btn")
    expect(page.locator("#search-status")).to_contain_text("nothing to stop")
    calm("search")
    # 3 · Inspect: the APL importance map
    tab("Inspect")
    click("apl-btn")
    expect(page.locator("#apl-note")).to_contain_text("loss of the fine-tune", timeout=180_000)
    expect(page.locator("#apl-map .js-plotly-plot")).to_have_count(1)
    expect(page.locator("#apl-map")).to_contain_text("APL importance — reverse")
    calm("apl")
    assert page.evaluate(BROKEN_WORDS, "#thresholds") == []
    buttons = {c.elem_id for c in app.page.c.values() if isinstance(c, gr.Button)}
    assert buttons - clicked == set(), buttons - clicked
    page.context.close()
