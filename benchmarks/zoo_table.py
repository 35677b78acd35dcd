"""The demo family's score matrix, as the README shows it (the papers' tables in miniature).

    python benchmarks/zoo_table.py [--split test] [--densities 0.1 0.2 0.5] [--out table.md]
    python benchmarks/zoo_table.py --methods pcb      # some methods' rows only

Prints markdown tables, every number measured now on the committed family (assets/zoo):
  1. base and each fine-tune on every domain (EM, smooth score), and the scoring time;
  2. the complex fine-tune pruned alone: DARE vs magnitude (TIES trim) vs DP, EM on its domain;
  3. merges of all fine-tunes and of every pair by task_arithmetic, ties, dare_ties, dp, dppa and
     pcb at each density: mean EM over the merged domains and the share of the fine-tunes' smooth
     gain over the base kept (mean, and the worse of a pair's two domains).
dppa's amplification is searched per fine-tune and density by DPPA's greedy alpha search on the dev
split (the fine-tune pruned alone, objective = smooth score / the unpruned fine-tune's); pcb's
`density` is its pcb_ratio (the fraction it keeps).
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

import torch  # noqa: E402

import dppa_ui  # noqa: E402
from dppa_ui import zoo  # noqa: E402
from dppa_ui import modelbuild  # noqa: E402
from dppa_ui.evaluation import (alpha_objective, by_domain, load_suite,  # noqa: E402
                                relative_gain, score_model, score_state_dict)
from dppa_ui.io import read_state_dict  # noqa: E402
from dppa_ui.methods.dpa import greedy_alpha_search  # noqa: E402
from dppa_ui.zoo.builder import COMPLEX_DOMAIN  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties", "dp", "dppa", "pcb")


def config(method, names, density, amps=None):
    models = []
    for n in names:
        p = {"density": density}
        if method.startswith("dare"):       # the DARE paper's 1/density, as the tables below were measured
            p["rescale"] = "paper"
        if method == "dppa":
            p.update(partitions=[round(density / 2, 6), density], amplification=list(amps[n]))
        models.append({"model": f"demo:{n}", "parameters": p})
    params = {"pcb_ratio": density} if method == "pcb" else {}
    return {"merge_method": method, "base_model": "demo:base", "models": models, "parameters": params, "seed": 0}


def search_alpha(name, density, base_sd, ft_sd, objective):
    """DPPA's greedy alpha search for one fine-tune at one density, on its dev split. `objective` is
    the fine-tune's `alpha_objective`, built once per fine-tune (its reference needs no density)."""

    def score(alpha):
        merged = dppa_ui.merge_in_memory(base_sd, [ft_sd], config("dppa", [name], density, {name: alpha}))
        return objective(merged)

    return greedy_alpha_search(score, n_bands=2, max_evals=15)


def fmt(x, p=2):
    return "-" if x is None else f"{x:.{p}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="the methods of the merge tables (default: all)")
    args = ap.parse_args()
    methods = [m for m in METHODS if m in args.methods]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_all = time.perf_counter()
    domains = zoo.domain_names()
    items = load_suite("zoo", args.split)
    by_dom = by_domain(items)
    complex_name = f"{COMPLEX_DOMAIN}_complex"
    lines = []
    out = lines.append

    # 1. base and fine-tunes on every domain.
    ref, times = {}, {}
    for name in zoo.demo_names():
        model, tok = modelbuild.load(f"demo:{name}", placed=False)
        t0 = time.perf_counter()
        ref[name] = score_model(model, tok, items)
        times[name] = time.perf_counter() - t0
    out(f"**Base and fine-tunes** ({args.split} split, {len(by_dom[domains[0]])} items per domain; "
        "EM / smooth score)\n")
    out("| model | " + " | ".join(domains) + " |")
    out("|---|" + "---|" * len(domains))
    for name, s in ref.items():
        out(f"| {name} | " + " | ".join(f"{s[d]['em']:.3f} / {s[d]['smooth']:.3f}" for d in domains) + " |")
    out("")
    print(f"scoring the whole {args.split} suite ({len(items)} items): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), file=sys.stderr)

    base_sd = read_state_dict(zoo.demo_path("base"))
    sds = {n: read_state_dict(zoo.demo_path(n)) for n in [*domains, complex_name]}

    def gains(s, d):
        return relative_gain(s[d]["smooth"], ref["base"][d]["smooth"], ref[d][d]["smooth"])

    # 2. complex fine-tune pruned alone.
    out(f"**The DPPA effect**: a fine-tune pruned alone (one-model merge), EM on its domain ({COMPLEX_DOMAIN})\n")
    out("| fine-tune | delta / base | method | " + " | ".join(f"d={d:g}" for d in args.densities) + " |")
    out("|---|---|---|" + "---|" * len(args.densities))
    for name in (COMPLEX_DOMAIN, complex_name):
        ratio = zoo.model_info(name).get("delta_ratio")
        for label, method in (("DARE (random)", "dare_linear"), ("magnitude", "ties"), ("DP", "dp")):
            row = []
            for dens in args.densities:
                merged = dppa_ui.merge_in_memory(base_sd, [sds[name]], config(method, [name], dens))
                row.append(score_state_dict("demo:base", merged, by_dom[COMPLEX_DOMAIN])[COMPLEX_DOMAIN]["em"])
            out(f"| {name} | {fmt(ratio, 3)} | {label} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    out("")

    # 3. merges.
    t0 = time.perf_counter()
    objectives = {n: alpha_objective(f"demo:{n}") for n in domains}
    amps = {}
    for dens in args.densities if "dppa" in methods else []:
        for n in domains:
            res = search_alpha(n, dens, base_sd, sds[n], objectives[n])
            amps[(n, dens)] = res.alpha
            print(f"alpha search {n} d={dens}: alpha {res.alpha} score {res.score:.3f} "
                  f"({len(res.path)} evals)", file=sys.stderr)
    print(f"alpha searches: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    groups = [tuple(domains)] + list(itertools.combinations(domains, 2))
    results = {}
    for group in groups:
        its = [i for i in items if i["domain"] in group]
        for method in methods:
            for dens in args.densities:
                cfg = config(method, group, dens, {n: amps.get((n, dens)) for n in group})
                merged = dppa_ui.merge_in_memory(base_sd, [sds[n] for n in group], cfg)
                s = score_state_dict("demo:base", merged, its)
                results[(group, method, dens)] = {d: (s[d]["em"], gains(s, d)) for d in group}
        print(f"merged {'+'.join(group)}", file=sys.stderr)

    head = "| method | " + " | ".join(f"d={d:g}" for d in args.densities) + " |"
    rule = "|---|" + "---|" * len(args.densities)
    all4 = groups[0]
    out(f"**All {len(all4)} fine-tunes merged**: mean EM over the domains / mean share of the smooth gain kept\n")
    out(head)
    out(rule)
    for method in methods:
        cells = []
        for dens in args.densities:
            r = results[(all4, method, dens)]
            cells.append(f"{sum(v[0] for v in r.values()) / len(r):.2f} / {sum(v[1] for v in r.values()) / len(r):.2f}")
        out(f"| {method} | " + " | ".join(cells) + " |")
    out("")
    pairs = groups[1:]
    out(f"**Pairs** ({len(pairs)}): mean EM / mean of the worse domain's smooth gain kept / "
        "pairs keeping >= 0.6 of both gains\n")
    out(head)
    out(rule)
    for method in methods:
        cells = []
        for dens in args.densities:
            rs = [results[(p, method, dens)] for p in pairs]
            em = sum(v[0] for r in rs for v in r.values()) / (2 * len(rs))
            worst = [min(v[1] for v in r.values()) for r in rs]
            cells.append(f"{em:.2f} / {sum(worst) / len(worst):.2f} / {sum(w >= 0.6 for w in worst)}")
        out(f"| {method} | " + " | ".join(cells) + " |")
    out("")
    out("**Pairs at density 0.2, EM of each domain** (first / second of the pair)\n")
    if 0.2 in args.densities:
        out("| pair | " + " | ".join(methods) + " |")
        out("|---|" + "---|" * len(methods))
        for p in pairs:
            out(f"| {' + '.join(p)} | " + " | ".join(
                " / ".join(f"{results[(p, m, 0.2)][d][0]:.2f}" for d in p) for m in methods) + " |")
        out("")
    finish(lines, args.out, t_all)


def finish(lines: list[str], out: str | None, t_start: float) -> None:
    """Print the markdown (stdout) and the total time (stderr); also write the markdown to `out`."""
    text = "\n".join(lines)
    print(text)
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if out:
        Path(out).write_text(text + "\n")


def load_average() -> str:
    """The 1/5/15-minute load averages, for printing beside timings."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
