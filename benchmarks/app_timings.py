"""Measured app timings on the demo family (printed, never asserted):

  slider -> inspect   median server time of the inspect callback over prune-rate values (the
                      histogram + thresholds a slider move redraws), and the HTTP round trip
                      through gradio_client for the same call
  merge               the in-memory merge of base + 4 fine-tunes (dppa, density 0.1)
  scoring             scoring the merged model on the app's demo suite, base and fine-tune
                      scores already cached (what a user sees after the first score)
  page interactive    Chromium: from navigation start (server already accepting connections) to
                      the Load button being enabled, and to the models loaded + histogram drawn

Usage: python benchmarks/app_timings.py [--repeats 15] [--no-browser] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(k, v)

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

from dppa_ui.ui import callbacks as cb  # noqa: E402

FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]
NOP = lambda *a, **k: None  # noqa: E731


def method(**over) -> list:
    v = dict(cb.DEFAULTS)
    v.update(over)
    return [v[k] for k in cb.METHOD_KEYS]


def timed(fn, *a, **k) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t, out


def slider_rates(repeats: int) -> list[float]:
    """The prune-rate values the slider timings sweep: `repeats` steps from 0.5 to 0.95."""
    return [round(0.5 + 0.45 * i / max(repeats - 1, 1), 3) for i in range(repeats)]


def server_side(repeats: int) -> dict:
    st = cb.AppState()
    t_load, out = timed(cb.load_models, st, "demo:base", FTS)
    assert out[-1].startswith("✓"), out[-1]
    module = "mlp.down_proj"
    rates = slider_rates(repeats)
    cb.inspect(st, 0, module, *method(preset="dppa", prune_rate=0.3))            # first draw (sorts |δ| once)
    times = [timed(cb.inspect, st, 0, module, *method(preset="dppa", prune_rate=r))[0] for r in rates]
    mask_times = [timed(cb.masks, st, st.ws.tensor_name(0, module), *method(preset="ties", prune_rate=r))[0]
                  for r in rates[:5]]
    t_merge, out = timed(cb.merge, st, *method(preset="dppa", prune_rate=0.9), progress=NOP)
    assert out[-1].startswith("✓"), out[-1]
    t_first_score, out = timed(cb.score, st, cb.DEMO_SUITE, None, progress=NOP)    # scores base + fine-tunes too
    assert out[-1].startswith("✓"), out[-1]
    cb.merge(st, *method(preset="ties", prune_rate=0.8), progress=NOP)
    t_score, out = timed(cb.score, st, cb.DEMO_SUITE, None, progress=NOP)
    assert out[-1].startswith("✓"), out[-1]
    st.close()
    return {"load_s": t_load, "inspect_median_ms": 1000 * statistics.median(times),
            "inspect_max_ms": 1000 * max(times), "masks_median_ms": 1000 * statistics.median(mask_times),
            "merge_s": t_merge, "first_score_all_models_s": t_first_score, "score_merged_cached_others_s": t_score}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def over_http(repeats: int, browser: bool) -> dict:
    from dppa_ui.ui import build_app, launch_options
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    url = f"http://127.0.0.1:{port}/"
    out = {}
    try:
        if browser and Path("/usr/bin/chromium").is_file():
            out.update(page_timings(url))
        from gradio_client import Client
        c = Client(url, verbose=False)
        c.predict("demo:base", FTS, api_name="/load_models")
        c.predict(0, "mlp.down_proj", *method(prune_rate=0.3), api_name="/inspect")
        rts = []
        for r in slider_rates(repeats):
            rts.append(timed(c.predict, 0, "mlp.down_proj", *method(prune_rate=r), api_name="/inspect")[0])
        out["inspect_http_roundtrip_median_ms"] = 1000 * statistics.median(rts)
    finally:
        demo.close()
    return out


def page_timings(url: str) -> dict:
    from playwright.sync_api import expect, sync_playwright
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto("about:blank")
        t0 = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        expect(page.locator("#load-models-btn")).to_be_enabled(timeout=60_000)
        t_interactive = time.perf_counter() - t0
        expect(page.locator("#models-status")).to_contain_text("loaded", timeout=60_000)
        t_loaded = time.perf_counter() - t0
        page.locator("#histogram").scroll_into_view_if_needed()
        expect(page.locator("#histogram .js-plotly-plot")).to_have_count(1, timeout=60_000)
        t_hist = time.perf_counter() - t0
        b.close()
    return {"page_interactive_s": t_interactive, "page_models_loaded_s": t_loaded, "page_histogram_drawn_s": t_hist}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    import torch
    res = {"cpu_threads": torch.get_num_threads(), "score_items_per_domain": cb.SCORE_PER_DOMAIN}
    res.update(server_side(args.repeats))
    res.update(over_http(args.repeats, not args.no_browser))
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
