"""Measured timings of the app's lm-eval section and its TSV-M / Iso view on the demo family,
through the handlers (printed, never asserted; one torch thread, as the app's tests run):

  lm-eval index    Score › "Search lm-eval's index": the first search (lm-eval imported, its index of
                   ~14,700 names built) and the next one
  lm-eval score    Score › "Score on lm-eval tasks" of a merge, the base and 4 fine-tunes on `zoo_mc`
                   (4 tasks) and `zoo_gen` (4), 50 documents each, 0-shot: the first press (every model
                   built and scored), a new merge (only it is scored: the others are cached for every
                   session), and the same press again (all cached)
  svd view         Inspect's masks handler (the singular-value view, its table and the merged delta) for
                   TSV-M, Iso-C and Iso-CTS on a block's MLP matrix and on the embedding, median of 5, beside
                   TIES's masks on the same matrix (first: nothing of the matrix cached; then: the
                   spectra and the merged delta's factors cached, as when another control moves)
  svd at 0.5 B     what the view computes for one 896 x 4864 MLP matrix of 4 fine-tunes (random deltas,
                   seeds 0 and 1): analysis.merged_svd, each delta's singular values and task
                   arithmetic's SVD; an SVD that does not converge is printed as such

Usage: python benchmarks/app_lm_eval_svd.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(k, v)

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from _handlers import FTS, nop, timed  # noqa: E402
from dppa_ui import analysis  # noqa: E402
from dppa_ui.ui import inspect, lm_eval, merge, models  # noqa: E402
from dppa_ui.ui.common import AppState, ui_values  # noqa: E402

MATRICES = ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight")


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    state = AppState()
    models.load_models({"state": state, "base": "demo:base", "fts": FTS})
    state.ws.stats.wait(timeout=120)

    for label in ("first search (index built)", "next search"):
        out, t = timed(lm_eval.find_tasks, {"lm_query": "arc_e", "lm_tasks": []})
        print(f"lm-eval index, {label}: {t:.2f} s ({out['lm_index_status'][:60]}…)")

    def press():
        v = {"state": state, "progress": nop, "lm_tasks": ["zoo_mc", "zoo_gen"], "lm_limit": 50, "lm_fewshot": 0}
        out, t = timed(lm_eval.score_lm_eval, v)
        assert out["lm_status"].startswith("✓"), out["lm_status"]
        return t
    merge.merge({"state": state, "progress": nop, **ui_values(preset="ties", density=0.5)})
    first = press()
    merge.merge({"state": state, "progress": nop, **ui_values(preset="tsv_m")})
    new_merge = press()
    again = press()
    n = 2 + len(FTS)
    print(f"lm-eval score, 8 tasks x {n} models, 50 documents each: first press {first:.2f} s "
          f"({first / (8 * n):.3f} s per model and task); a new merge {new_merge:.2f} s; again {again:.3f} s")

    for matrix in MATRICES:
        shape = list(state.ws.access.shape(matrix))
        for preset in ("ties", "tsv_m", "iso_c", "iso_cts"):
            v = {"state": state, "matrix": matrix, **ui_values(preset=preset)}
            first = timed(inspect.masks, v)[1]
            times = [timed(inspect.masks, v)[1] for _ in range(5)]
            print(f"masks handler, {preset:8s} {matrix} {shape}: first {1000 * first:.0f} ms, "
                  f"then {1000 * statistics.median(times):.0f} ms")
    state.close()

    for seed in (0, 1):
        deltas = torch.randn(4, 896, 4864, generator=torch.Generator().manual_seed(seed)) * 0.01
        for method in ("tsv_m", "iso_c", "iso_cts"):
            cfg = types.SimpleNamespace(combine=method, common_space_fraction=0.8)
            t0 = time.perf_counter()
            try:
                analysis.merged_svd(cfg, deltas)
                [torch.linalg.svdvals(d) for d in deltas]
                torch.linalg.svd(deltas.sum(0), full_matrices=False)
                took = f"{time.perf_counter() - t0:.2f} s"
            except torch.linalg.LinAlgError as e:
                took = f"SVD did not converge after {time.perf_counter() - t0:.2f} s ({str(e)[:40]}…)"
            print(f"svd view at 0.5 B, {method:8s} 896 x 4864, 4 fine-tunes, seed {seed}: {took}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
