"""The app's Search panel on the demo family: candidates per second through its handler.

    python benchmarks/app_search.py [--budget 40] [--repeat 2]

Calls the Search tab's Start handler (dppa_ui.ui.search.start, the code behind the button: a
search thread on the session's memory-mapped weights, the plot and table rebuilt at each update)
on a dppa merge of 2 and of 4 demo fine-tunes, moving the weights (one per model) and the shared
density (NGOpt, `--budget` candidates, no test split), with the app's torch-thread setting (1 for
small models) and with torch's default, alternating for `--repeat` rounds. Prints, per run: the
search's wall time (the fine-tunes' reference scores included) and candidates per second over the
candidates' own time, with the load average beside them. The machine may be shared: compare
numbers within a run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dppa_ui.ui import models, search  # noqa: E402
from dppa_ui.ui.common import DEFAULT_UI, AppState, controls_from  # noqa: E402


def run(state: AppState, budget: int) -> dict:
    rows = search.default_rows(controls_from(DEFAULT_UI))
    v = {"state": state, "search_params": rows, "search_optimizer": "ngopt", "search_budget": budget,
         "search_objective": "geometric", "search_data": search.DEMO_DEV, "search_upload": None, "search_seed": 0,
         "search_test": False, **DEFAULT_UI}
    t0 = time.perf_counter()
    for out in search.start(v):
        pass
    res = out["search_best"]
    busy = sum(r["seconds"] for r in res.rows if r["phase"] == "search")
    return {"wall": time.perf_counter() - t0, "per_s": len(res.rows) / busy, "n": len(res.rows),
            "objective": res.objective}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for fts in (["demo:reverse", "demo:sort"], ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]):
        state = AppState()
        out = models.load_models({"state": state, "base": "demo:base", "fts": fts})
        assert out["models_status"].startswith("✓"), out["models_status"]
        state.ws.stats.wait(timeout=120)
        for rnd in range(args.repeat):
            for label, env in (("app (1 thread)", None), ("torch default", "0")):
                if env is None:
                    os.environ.pop("DPPA_UI_SEARCH_THREADS", None)
                else:
                    os.environ["DPPA_UI_SEARCH_THREADS"] = env
                r = run(state, args.budget)
                print(f"{len(fts)} fine-tunes, round {rnd + 1}, {label:15s}: {r['n']} candidates, wall {r['wall']:6.1f} s "
                      f", {r['per_s']:.2f} candidates/s, best {r['objective']:.4f} "
                      f"| load {os.getloadavg()[0]:.2f}", flush=True)
        os.environ.pop("DPPA_UI_SEARCH_THREADS", None)
        state.close()


if __name__ == "__main__":
    main()
