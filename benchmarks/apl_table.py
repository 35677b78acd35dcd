"""APL on the demo family, against magnitude, DARE and DP pruning (issue 9).

    python benchmarks/apl_table.py [--split test] [--densities 0.1 0.2 0.5] [--examples 16] [--out apl.md]

Prints markdown tables, every number measured now on the committed family (assets/zoo):
  1. how well the gradient approximation tracks the exact intervention, per fine-tune (module
     level, Pearson and Spearman over the 28 matrices) at each point the gradient can be taken;
  2. each fine-tune pruned alone (one-model merge): EM / smooth on its own domain;
  3. the 6 pairs: mean EM, mean of the worse domain's smooth gain kept, pairs keeping >= 0.6 of both;
  4. the cost of importance (seconds per fine-tune, exact vs gradient) beside the load average.
Every method prunes and then sums (task arithmetic, weight 1 each), so only the prune differs:
magnitude (TIES trim), DARE (random, 1/density), DP (DPPA's dynamic densities), and APL with its
defaults (module level, exact importance, λ = 0.5, random drop with DARE's rescaling, equal merge
weights) and one change each: magnitude drop; λ = 0, importance switched off (every matrix at the
target density, so the difference to it is what importance itself adds); APL's importance merge
weights (only pairs can show them); the gradient approximation at the midpoint (default) or at the
fine-tune. DP and APL keep the deltas outside the blocks (embeddings, norms, lm_head) whole, as DP's
official code does; magnitude and DARE prune them too.
APL's importance is measured on the first `--examples` items of each fine-tune's dev split.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dppa_ui  # noqa: E402
from dppa_ui import apl, zoo  # noqa: E402
from dppa_ui.config import load_config  # noqa: E402
from dppa_ui import modelbuild  # noqa: E402
from dppa_ui.evaluation import by_domain, load_suite, relative_gain, score_state_dict  # noqa: E402
from dppa_ui.io import read_state_dict  # noqa: E402
from dppa_ui.zoo.domains import COMPLEX_DOMAIN  # noqa: E402
from zoo_table import config as preset_config  # noqa: E402
from zoo_table import finish, fmt, load_average  # noqa: E402

METHODS = {          # label -> (stages and parameters) over a sum combine
    "magnitude": {"prune": "magnitude"},
    "DARE": {"prune": "random"},
    "DP": {"prune": "dp"},
    "APL": {"prune": "apl"},
    "APL, magnitude drop": {"prune": "apl", "apl_drop": "magnitude"},
    "APL λ=0": {"prune": "apl", "apl_lambda": 0.0},
    "APL, merge weights": {"prune": "apl", "apl_weights": True},
    "APL, gradient (α=0.5)": {"prune": "apl", "apl_importance": "gradient"},
    "APL, gradient (α=1)": {"prune": "apl", "apl_importance": "gradient", "apl_gradient_at": "finetune"},
}


def config(method: str, names, density: float, examples: int) -> dict:
    spec = dict(METHODS[method])
    if spec["prune"] == "dp":
        return preset_config("dp", names, density)
    prune = spec.pop("prune")
    params = {"apl_examples": examples, **spec} if prune == "apl" else {}
    return {"prune": prune, "combine": "sum", "base_model": "demo:base", "seed": 0,
            "models": [{"model": f"demo:{n}", "parameters": {"density": density}} for n in names],
            "parameters": params}


def _rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    domains = zoo.domain_names()
    complex_name = f"{COMPLEX_DOMAIN}_complex"
    singles = [*domains, complex_name]
    domain_of = {n: zoo.model_info(n)["domain"] for n in singles}
    items = by_domain(load_suite("zoo", args.split))
    ref = __import__("json").loads((zoo.ZOO_DIR / "reference_scores.json").read_text()) if args.split == "test" else None
    base_sd = read_state_dict(zoo.demo_path("base"))
    sds = {n: read_state_dict(zoo.demo_path(n)) for n in singles}
    lines = []
    out = lines.append

    # 1. exact vs gradient, and 4. cost.
    cost = {}
    out(f"**Gradient approximation vs exact intervention** (module level, {args.examples} dev examples; "
        "Pearson / Spearman over the 28 matrices)\n")
    out("| fine-tune | α=1 (at the fine-tune) | α=0.5 (midpoint) | α=0 (at the base) |")
    out("|---|---|---|---|")
    for n in singles:
        cells = []
        cfg = load_config(config("APL", [n], 0.2, args.examples))
        base_dir, (ft_dir,) = apl.folders(cfg)
        td = apl.check_data(cfg, [ft_dir])[0]
        t0 = time.perf_counter()
        exact = apl.importance(base_dir, ft_dir, td, "module", "exact", use_cache=False)
        cost.setdefault("exact", []).append(time.perf_counter() - t0)
        names = list(exact.values)
        e = torch.tensor([exact.values[k] for k in names])
        for at in ("finetune", "midpoint", "base"):
            t0 = time.perf_counter()
            g = apl.importance(base_dir, ft_dir, td, "module", "gradient", at, use_cache=False)
            cost.setdefault(at, []).append(time.perf_counter() - t0)
            gv = torch.tensor([g.values[k] for k in names])
            cells.append(f"{_corr(e, gv):.2f} / {_corr(_rank(e), _rank(gv)):.2f}")
        out(f"| {n} | " + " | ".join(cells) + " |")
    out("")

    def score(names, method, density):
        merged = dppa_ui.merge_in_memory(base_sd, [sds[n] for n in names],
                                         config(method, names, density, args.examples))
        doms = [domain_of[n] for n in names]
        return score_state_dict("demo:base", merged, [it for d in doms for it in items[d]])

    # 2. single fine-tunes.
    head = "| fine-tune | method | " + " | ".join(f"d={d:g}" for d in args.densities) + " |"
    rule = "|---|---|" + "---|" * len(args.densities)
    out(f"**One fine-tune pruned alone**: EM / smooth on its own domain ({args.split} split)\n")
    out(head)
    out(rule)
    for n in singles:
        d = domain_of[n]
        for method in METHODS:
            cells = []
            for dens in args.densities:
                s = score([n], method, dens)[d]
                cells.append(f"{s['em']:.3f} / {s['smooth']:.3f}")
            out(f"| {n} | {method} | " + " | ".join(cells) + " |")
        print(f"singles: {n} done", file=sys.stderr)
    out("")

    # 3. pairs.
    if ref is None:          # dev split: the references are scored here
        from dppa_ui.evaluation import score_model
        ref = {"base": score_model(*modelbuild.load("demo:base", placed=False), [i for d in domains for i in items[d]])}
        for d in domains:
            ref[d] = score_model(*modelbuild.load(f"demo:{d}", placed=False), items[d])

    def gain(s, d):
        return relative_gain(s[d]["smooth"], ref["base"][d]["smooth"], ref[d][d]["smooth"])

    pairs = list(itertools.combinations(domains, 2))
    out(f"**Pairs** ({len(pairs)}): mean EM / mean of the worse domain's smooth gain kept / pairs keeping "
        ">= 0.6 of both gains\n")
    out("| method | " + " | ".join(f"d={d:g}" for d in args.densities) + " |")
    out("|---|" + "---|" * len(args.densities))
    per_pair = {}
    for method in METHODS:
        cells = []
        for dens in args.densities:
            ems, worst = [], []
            for p in pairs:
                s = score(list(p), method, dens)
                ems += [s[d]["em"] for d in p]
                worst.append(min(gain(s, d) for d in p))
                per_pair[(p, method, dens)] = [s[d]["em"] for d in p]
            cells.append(f"{sum(ems) / len(ems):.2f} / {sum(worst) / len(worst):.2f} / {sum(w >= 0.6 for w in worst)}")
        out(f"| {method} | " + " | ".join(cells) + " |")
        print(f"pairs: {method} done", file=sys.stderr)
    out("")
    if 0.2 in args.densities:
        out("**Pairs at density 0.2, EM of each domain** (first / second of the pair)\n")
        out("| pair | " + " | ".join(METHODS) + " |")
        out("|---|" + "---|" * len(METHODS))
        for p in pairs:
            out(f"| {' + '.join(p)} | " + " | ".join(
                " / ".join(f"{v:.2f}" for v in per_pair[(p, m, 0.2)]) for m in METHODS) + " |")
        out("")
    out(f"Importance cost per fine-tune (one thread, load average {load_average()}): exact module level "
        f"{fmt(sum(cost['exact']) / len(cost['exact']))} s (30 forward passes), gradient "
        f"{fmt(sum(cost['midpoint']) / len(cost['midpoint']))} s (three forwards and one backward), "
        "model load included; cached afterwards.")
    finish(lines, args.out, t_all)


if __name__ == "__main__":
    main()
