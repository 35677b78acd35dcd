"""The merge-parameter search on the demo family: what it finds, and how fast.

    python benchmarks/search_demo.py [--part quality|timing|all] [--budget 100] [--pairs N]

quality: for every pair of the four fine-tunes, the TEST-split scores (never seen by any search)
  of: dppa at its defaults (density 0.2, amplification [1.8, 1.0]); dppa with `amplification:
  auto` (DPPA's official greedy walk per fine-tune on its dev split); pcb (pcb_ratio 0.2) at
  lambda 1 and with `lambda: auto` (PCB's NGOpt search: init 1.0, bounds [0.8, 1.3], budget 100);
  and the full search over the weights and densities of the 2-fine-tune dppa merge (NGOpt,
  `--budget` candidates). Objective = geometric mean over the two domains of the smooth score / the
  fine-tune's own (the searches' objective), and EM per domain.
timing: one search of `--budget` candidates (reverse + sort, weights and densities, rounds of 2
  candidates so every run scores the same candidates) in-process with 1 torch thread (and 2 with
  --two-threads), in 2 worker processes, and on 2 local Ray actors, alternating for `--repeat`
  rounds; wall time, with the load average beside it.
Every number is measured in this run; the machine may be shared, so compare ratios within a run.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dppa_ui import search  # noqa: E402
from dppa_ui.config import load_config  # noqa: E402
from dppa_ui.evaluation import geometric_objective, load_suite, score_state_dict  # noqa: E402
from dppa_ui.io import read_state_dict  # noqa: E402
from dppa_ui.refs import resolve_model  # noqa: E402
from dppa_ui.inmemory import merge_state_dicts  # noqa: E402

FINE_TUNES = ("reverse", "cipher", "sort", "brackets")


def load() -> tuple[dict, dict]:
    return read_state_dict(resolve_model("demo:base")), {n: read_state_dict(resolve_model(f"demo:{n}"))
                                                         for n in FINE_TUNES}


def load_avg() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def dppa(pair, **extra) -> dict:
    return {"merge_method": "dppa", "base_model": "demo:base", "seed": 0, **extra,
            "models": [{"model": f"demo:{n}", "parameters": {"density": 0.2}} for n in pair]}


def pcb(pair) -> dict:
    return {"merge_method": "pcb", "base_model": "demo:base", "seed": 0, "parameters": {"pcb_ratio": 0.2},
            "models": [{"model": f"demo:{n}"} for n in pair]}


class TestScorer:
    """Test-split EM and smooth score of a merged config, and the objective against the fine-tunes'
    own test scores (each scored once)."""

    def __init__(self, base, fts):
        self.base, self.fts, self.refs = base, fts, {}
        self.items = {n: load_suite("zoo", "test", domains=[n]) for n in FINE_TUNES}

    def ref(self, n):
        if n not in self.refs:
            self.refs[n] = score_state_dict("demo:base", self.fts[n], self.items[n], generate=False)[n]
        return self.refs[n]

    def __call__(self, cfg, pair):
        cfg = load_config(cfg) if isinstance(cfg, dict) else cfg
        merged = merge_state_dicts(self.base, [self.fts[n] for n in pair], cfg)
        scores = score_state_dict("demo:base", merged, self.items[pair[0]] + self.items[pair[1]], generate=True)
        obj = geometric_objective(scores, {n: self.ref(n) for n in pair})
        return obj, [scores[n]["em"] for n in pair]


def quality(budget: int, n_pairs: int) -> None:
    torch.set_num_threads(1)
    base, fts = load()
    test = TestScorer(base, fts)
    dirs = {n: resolve_model(f"demo:{n}") for n in FINE_TUNES}
    base_dir = resolve_model("demo:base")
    rows, t0 = [], time.perf_counter()
    print(f"quality: {load_avg()}", flush=True)
    for pair in list(itertools.combinations(FINE_TUNES, 2))[:n_pairs]:
        loaded = (base, [fts[n] for n in pair])
        mdirs = [dirs[n] for n in pair]
        out = {}
        out["dppa defaults"] = test(dppa(pair), pair)
        cfg = load_config(dppa(pair, parameters={"amplification": "auto"}))
        search.search_amplification(cfg, base_dir, mdirs, log=lambda s: None, loaded=loaded)
        out["dppa alpha auto"] = test(cfg, pair)
        alphas = [m.get("amplification") for m in cfg.models]
        out["pcb lambda 1"] = test(pcb(pair), pair)
        cfg = load_config({**pcb(pair), "parameters": {"pcb_ratio": 0.2, "lambda": "auto"}})
        lam = search.search_lambda(cfg, base_dir, mdirs, log=lambda s: None, loaded=loaded)
        out["pcb lambda auto"] = test(cfg, pair)
        full = dppa(pair, search={"parameters": {"models[*].weight": [0.5, 1.5], "models[*].density": [0.05, 0.6]},
                                  "budget": budget, "seed": 0})
        res = search.run_search(full, base_dir=base_dir, ft_dirs=mdirs, loaded=loaded, test=False)
        out["dppa full search"] = test(res.config, pair)
        rows.append((pair, out, alphas, lam["weights"], res.values))
        print(f"  {' + '.join(pair)}: " + "; ".join(f"{k} {v[0]:.3f}" for k, v in out.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    methods = list(rows[0][1])
    print(f"\nTest split: objective (geometric mean of smooth / the fine-tune's) and EM of each domain; {load_avg()}\n")
    print("| pair | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for pair, out, *_ in rows:
        print(f"| {' + '.join(pair)} | " + " | ".join(
            f"{o:.3f} ({e[0]:.2f} / {e[1]:.2f})" for o, e in (out[m] for m in methods)) + " |")
    means = {m: sum(out[m][0] for _, out, *_ in rows) / len(rows) for m in methods}
    print("| mean objective | " + " | ".join(f"{means[m]:.3f}" for m in methods) + " |")
    wins = sum(out["dppa full search"][0] > out["dppa defaults"][0] for _, out, *_ in rows)
    print(f"\nfull search beats dppa defaults on the test split for {wins} of {len(rows)} pairs")
    print("\nchosen: pair | alpha auto (per model) | pcb lambda auto | full search weights, densities")
    for pair, _, alphas, lam, values in rows:
        v = [round(x, 3) for x in values.values()]
        print(f"  {' + '.join(pair)} | {alphas} | {[round(x, 3) for x in lam]} | {v}")
    print(f"quality part: {time.perf_counter() - t0:.0f} s")


def timing(budget: int, repeat: int, two_threads: bool) -> None:
    pair = ("reverse", "sort")
    cfg = dppa(pair, search={"parameters": {"models[*].weight": [0.5, 1.5], "models[*].density": [0.05, 0.6]},
                             "budget": budget, "seed": 0})
    try:
        import ray
    except ImportError:
        ray = None
        print("  ray: not installed, skipped")
    if ray is not None:
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"  ray.init (local, 2 CPUs): {time.perf_counter() - t:.1f} s, not counted below", flush=True)
    kinds = [("1 process, 1 thread", dict(batch=2, threads=1)),
             ("2 worker processes, 1 thread each", dict(workers=2)),
             ("2 Ray actors (local), 1 thread each", dict(workers=2, ray="auto"))][:3 if ray else 2]
    if two_threads:
        kinds.insert(1, ("1 process, 2 threads", dict(batch=2, threads=2)))
    walls: dict[str, list] = {k: [] for k, _ in kinds}
    objectives = set()
    print(f"timing: {budget} candidates, rounds of 2 (every run scores the same candidates); the runs "
          f"alternate, {repeat} round(s), so a change in the machine's load hits each kind alike", flush=True)
    for rnd in range(repeat):
        for label, kw in kinds:
            la = os.getloadavg()[0]
            t = time.perf_counter()
            res = search.run_search(copy.deepcopy(cfg), test=False, **kw)
            wall = time.perf_counter() - t
            walls[label].append((wall, la))
            objectives.add(round(res.objective, 12))
            per = sum(r["seconds"] for r in res.rows) / len(res.rows)
            print(f"  [{rnd + 1}] {label}: {wall:.1f} s wall ({per:.3f} s merge+score per candidate in its "
                  f"worker); load average {la:.2f} at start", flush=True)
    if ray is not None:
        ray.shutdown()
    first = kinds[0][0]
    print("\n| run | wall s (each round) | vs 1 process, 1 thread (same round) | load average at start |")
    print("|---|---|---|---|")
    for label, _ in kinds:
        ws = walls[label]
        ratios = " / ".join(f"{w / walls[first][r][0]:.2f}x" for r, (w, _) in enumerate(ws))
        print(f"| {label} | {' / '.join(f'{w:.1f}' for w, _ in ws)} | {ratios} | "
              f"{' / '.join(f'{la:.1f}' for _, la in ws)} |")
    print(f"same result in every run: {len(objectives) == 1}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("quality", "timing", "all"), default="all")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2, help="timing: rounds of alternating runs")
    ap.add_argument("--two-threads", action="store_true", help="timing: also 1 process with 2 torch threads")
    args = ap.parse_args()
    if args.part in ("timing", "all"):
        timing(args.budget, args.repeat, args.two_threads)
    if args.part in ("quality", "all"):
        quality(args.budget, args.pairs)


if __name__ == "__main__":
    main()
