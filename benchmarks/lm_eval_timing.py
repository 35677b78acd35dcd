"""Time per lm-eval task on the demo family and at 0.5 B (printed, never asserted).

    python benchmarks/lm_eval_timing.py                          # demo and 0.5 B, --limit 50
    python benchmarks/lm_eval_timing.py --families demo --limit 200

For each family one model is built the way `score --lm-eval` builds it (modelbuild.load), then
each of the demo domain's lm-eval tasks (assets/lm_eval: generate_until and multiple choice) runs
alone through `harness.run` (lm-eval's simple_evaluate) on the first --limit documents, beside our
own `score_model` (EM + smooth) on the same items. Also printed: lm-eval's import, the task folder's
index and data, lm-eval's index of all its tasks, the whole CLI command in its own process and a
search's seconds per candidate (demo).

0.5 B: a Llama-shaped random bf16 base from benchmarks/_models.py (cached under bench-models/)
given the demo family's character tokenizer; untrained, so only the times mean anything (it never
stops at <eos>: every generation runs the task's max_gen_toks, 32, the worst case).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_scale import REPO, add_tokenizer  # noqa: E402  (importing it sets the offline environment)

TASKS = REPO / "assets" / "lm_eval"


def model_ref(family: str, cache_dir: str) -> tuple[str, str]:
    """(label, model folder or ref) of the family's model scored."""
    if family == "demo":
        return "demo (0.9 M), demo:reverse", "demo:reverse"
    from _models import build_models, shape_for
    shape = shape_for(0.5e9)
    base, _ = build_models(shape, 0, "bfloat16", cache_dir)
    add_tokenizer(base)
    return f"0.5 B ({shape.n_params() / 1e9:.2f} B, {shape.layers} layers, bf16 on disk)", str(base)


def search_timing(limit: int, budget: int = 10) -> None:
    """Seconds per candidate of a search on the demo family (dppa of reverse + sort, both weights
    moving, one process): the lm-eval objective (both domains' multiple-choice tasks, `limit`
    validation documents each) against our default objective (smooth score on the dev split)."""
    from dppa_ui import search
    cfg = {"merge_method": "dppa", "base_model": "demo:base",
           "models": [{"model": "demo:reverse", "parameters": {"density": 0.2}},
                      {"model": "demo:sort", "parameters": {"density": 0.2}}],
           "search": {"parameters": {"models[*].weight": [0.5, 1.5]}, "budget": budget}}
    lm = {**cfg, "search": {**cfg["search"], "objective": {
        "lm_eval": ["zoo_reverse_mc", "zoo_sort_mc"], "metric": "acc_norm", "limit": limit,
        "include_path": str(TASKS), "batch_size": 64}}}
    for label, c in (("ours (smooth, dev: 100 items per domain)", cfg),
                     (f"lm-eval (zoo_reverse_mc + zoo_sort_mc, {limit} validation documents each)", lm)):
        t = time.perf_counter()
        res = search.run_search(c, test=False, threads=1)
        per = sum(r["seconds"] for r in res.rows) / len(res.rows)
        print(f"search, {label}: {per:.2f} s per candidate ({budget} in {time.perf_counter() - t:.1f} s with "
              f"set-up)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="demo,0.5b")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--domain", default="reverse")
    ap.add_argument("--cache-dir", default=str(REPO / "bench-models"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the CLI's process (on "
                    "shared cores one thread is the fast setting: torch's OpenMP threads spin-wait for each other)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    import lm_eval.evaluator  # noqa: F401
    print(f"import lm_eval: {time.perf_counter() - t:.2f} s")

    from dppa_ui import harness, modelbuild
    from dppa_ui.evaluation import load_suite, score_model
    names = [f"zoo_{args.domain}_gen", f"zoo_{args.domain}_mc"]
    t = time.perf_counter()
    tasks = {n: harness.load_tasks(n, TASKS) for n in names}
    print(f"task index + data of {', '.join(names)}: {time.perf_counter() - t:.2f} s")
    items = load_suite("zoo", "test", [args.domain])[:args.limit]
    rows = []
    for family in args.families.split(","):
        label, ref = model_ref(family, args.cache_dir)
        t = time.perf_counter()
        model, tok = modelbuild.load(ref)
        build = time.perf_counter() - t
        lm = harness.wrap(model, tok, args.batch_size)
        times = {}
        for n in names:
            t = time.perf_counter()
            res = harness.run(lm, tasks[n], limit=args.limit)
            times[n] = (time.perf_counter() - t, harness.metrics(res)[n])
        t = time.perf_counter()
        ours = score_model(model, tok, items, batch_size=args.batch_size or 256)[args.domain]
        ours_s = time.perf_counter() - t
        rows.append((label, build, times, ours_s, ours))
        print(f"{label}: built in {build:.1f} s ({model.placement.describe()}); "
              + "; ".join(f"{n} {s:.1f} s {m}" for n, (s, m) in times.items())
              + f"; ours (EM + smooth) {ours_s:.1f} s {ours}", flush=True)
        del lm, model
        if family != "demo":
            continue
        cli = [sys.executable, "-m", "dppa_ui", "score", ref, "--lm-eval", names[1], "--include-path", str(TASKS),
               "--limit", str(args.limit), "--json"] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        t = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)})
        print(f"  CLI `score {ref} --lm-eval {names[1]} --limit {args.limit}` in its own process: "
              f"{time.perf_counter() - t:.1f} s wall", flush=True)
    t = time.perf_counter()
    harness.task_manager(["arc_easy"])
    print(f"lm-eval's index of all its tasks: {time.perf_counter() - t:.1f} s")
    if "demo" in args.families.split(","):
        search_timing(args.limit)
    print(f"\n| model | {' | '.join(names)} | ours on the same {args.limit} items (EM + smooth) |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, build, times, ours_s, _ in rows:
        print(f"| {label} | " + " | ".join(f"{s:.1f} s" for s, _ in times.values()) + f" | {ours_s:.2f} s |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
