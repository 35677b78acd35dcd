"""Measured timings of the app's APL and SMILE views on the demo family, through the handlers
(printed, never asserted; one torch thread, as the app's tests run):

  APL map          Inspect's "Compute APL importance" per fine-tune with an empty importance cache
                   (exact intervention per module and per block, gradient), then the cached redraw
  APL config       a `prune: apl` config's background importance (4 fine-tunes) until the views
                   have APL's densities
  SMILE build      Merge's "Upscale (SMILE)" of the 4 fine-tunes into a run folder, rank 64 and full
  chat routing     a greedy reply of the SMILE model against the routing strip computed after it
                   (median over the demo's example prompts), and a plain merge's reply for scale
  routing accuracy Score's routing table on the app's demo suite (200 items)

Usage: python benchmarks/app_apl_smile.py
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(k, v)
os.environ["DPPA_UI_CACHE"] = tempfile.mkdtemp(prefix="dppa-ui-bench-apl-")     # a cold importance cache

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from _handlers import FTS, nop, timed  # noqa: E402
from dppa_ui.config import load_config  # noqa: E402
from dppa_ui.ui import chat, inspect, merge, models, score  # noqa: E402
from dppa_ui.ui.common import DEFAULT_UI, AppState  # noqa: E402

SMILE = {"smile_rank": 64, "smile_full": False, "smile_router": 8, "smile_k": 1, "smile_scope": "blocks (paper)"}


def chat_once(state, prompt: str) -> tuple[list, float]:
    t0 = time.perf_counter()
    outs = list(chat.chat({"state": state, "msg": prompt, "chat_merged": [], "chat_compare": [], "compare": "none",
                           "system": "", "temperature": 0.0, "top_p": 0.9, "max_new": 64}))
    return outs[-1]["chat_merged"], time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average: {os.getloadavg()[0]:.2f} (2 shared cores)")
    state = AppState()
    assert models.load_models({"state": state, "base": "demo:base", "fts": FTS})["models_status"].startswith("✓")
    state.ws.stats.wait(timeout=120)
    view = {"state": state, "block": 1, "module": "mlp.down_proj", "matrix": "model.layers.1.mlp.down_proj.weight",
            "heat_metric": "mean |δ|", "heat_model": 0, "progress": nop, **DEFAULT_UI}

    print("\nAPL importance map (16 dev examples), per fine-tune:")
    for i, ref in enumerate(FTS):
        out, cold = timed(inspect.apl_map, {**view, "heat_model": i})
        assert "apl_plot" in out, out
        _, warm = timed(inspect.apl_view, {**view, "heat_model": i})
        print(f"  {ref:16s} computed {cold:6.2f} s   redrawn from the cache {warm * 1000:6.1f} ms")

    cfg = load_config({"prune": "apl", "combine": "sum", "base_model": "demo:base",
                       "models": [{"model": f, "parameters": {"density": 0.2}} for f in FTS]})
    t0 = time.perf_counter()
    state.ws.apl.wait(cfg, state.ws.align(cfg))      # module / exact: already in the cache from the maps above
    print(f"\nprune: apl config (4 fine-tunes, module level, exact): densities after {time.perf_counter() - t0:.2f} s "
          f"(importance cached by the maps above)")

    print("\nSMILE build (4 fine-tunes, through Merge's button):")
    for label, over in (("rank 64", {}), ("full rank", {"smile_full": True})):
        out, secs = timed(merge.upscale, {"state": state, "progress": nop, **SMILE, **over})
        assert out["merge_status"].startswith("✓"), out
        print(f"  {label:10s} {secs:6.2f} s   {out['smile_size'].removeprefix('✓ ')}")
    merge.upscale({"state": state, "progress": nop, **SMILE})

    prompts = [r[1] for r in chat.example_rows()]
    replies, routes, tokens = [], [], []
    for p in prompts:
        hist, secs = chat_once(state, p)
        r, rsecs = timed(chat.routing, {"state": state, "chat_merged": hist, "system": ""})
        replies.append(secs)
        routes.append(rsecs)
        tokens.append(len(r["chat_routing"]["value"] or []))
    merge.merge({"state": state, "progress": nop, **DEFAULT_UI, "preset": "task_arithmetic"})
    plain = [chat_once(state, p)[1] for p in prompts]
    rep, rou, pl = statistics.median(replies), statistics.median(routes), statistics.median(plain)
    print(f"\nchat ({len(prompts)} example prompts, greedy, median; {statistics.median(tokens):.0f} tokens per reply):")
    print(f"  SMILE reply {rep * 1000:7.1f} ms   routing strip after it {rou * 1000:6.1f} ms "
          f"(+{100 * rou / rep:.0f} % of the reply)   plain merge's reply {pl * 1000:7.1f} ms")

    merge.upscale({"state": state, "progress": nop, **SMILE})
    score.score({"state": state, "progress": nop, "suite": score.DEMO_SUITE, "upload": None})
    out, secs = timed(score.score_routing, {"state": state, "suite": score.DEMO_SUITE, "upload": None})
    print(f"\nrouting accuracy on the demo suite ({len(score.demo_items())} items): {secs:.2f} s")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    state.close()


if __name__ == "__main__":
    main()
