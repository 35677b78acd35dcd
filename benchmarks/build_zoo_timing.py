"""Time the demo-family builds and the scoring of the whole test suite (prints measured numbers).

    python benchmarks/build_zoo_timing.py [--full] [--workers N]

--quick build always; --full also times the full build (minutes) into a temp dir and checks that it
reproduces the committed assets/zoo bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dppa_ui import zoo  # noqa: E402
from dppa_ui import modelbuild  # noqa: E402
from dppa_ui.evaluation import load_suite, score_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also time the full build (minutes)")
    ap.add_argument("--workers", type=int, default=None,
                    help="cores the full build trains on (default: the builder's, up to 2)")
    args = ap.parse_args()
    quiet = lambda s: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        zoo.build_zoo(Path(tmp) / "quick", quick=True, log=quiet)
        print(f"quick build: {time.perf_counter() - t0:.1f} s")
        if args.full:
            t0 = time.perf_counter()
            # as `python -m dppa_ui zoo build` does it, scoring (reference_scores.json) included
            out = zoo.build_zoo(Path(tmp) / "full", quick=False, log=print, workers=args.workers)
            print(f"full build: {time.perf_counter() - t0:.1f} s")
            same = all((out / n / "model.safetensors").read_bytes()
                       == (zoo.demo_path(n) / "model.safetensors").read_bytes() for n in zoo.demo_names())
            print(f"reproduces the committed assets/zoo bit for bit: {same}")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    items = load_suite("zoo", "test")
    for name in zoo.demo_names():
        model, tok = modelbuild.load(f"demo:{name}", placed=False)
        score_model(model, tok, items[:8])                        # warm-up (first-call setup)
        t0 = time.perf_counter()
        score_model(model, tok, items)
        print(f"scoring the whole test suite ({len(items)} items) on {name}: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
