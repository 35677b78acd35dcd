"""TSV-M, Iso-C and Iso-CTS on the demo family, beside task arithmetic, TIES and DPPA.

    python benchmarks/svd_merge_table.py [--lambdas 0.5 0.75 1 1.5 2 3 4] [--densities 0.2 0.5] [--out t.md]

Prints markdown tables, every number measured now on the committed family (assets/zoo), for all
four fine-tunes and the six pairs:
  1. at lambda = 1 (FusionBench's default alpha / scaling_factor for the three, the sum itself for
     task arithmetic): test-split EM and the share of the smooth gain kept;
  2. with lambda chosen per method and group on the dev split (the papers pick alpha on held-out
     data): the lambda chosen, then test EM / gain kept;
  3. all four merged, per domain (EM / smooth) at the dev-chosen lambda.
TIES and DPPA run at each density; DPPA's amplification is the greedy alpha search on the dev
split (as benchmarks/zoo_table.py finds it). "gain kept" = (s - s_base) / (s_ft - s_base) on the
smooth score; a pair's gain is the worse of its two domains'.
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
from dppa_ui import zoo  # noqa: E402
from dppa_ui import modelbuild  # noqa: E402
from dppa_ui.evaluation import (alpha_objective, by_domain, load_suite, relative_gain,  # noqa: E402
                                score_model, score_state_dict)
from dppa_ui.io import read_state_dict  # noqa: E402
from zoo_table import config as zoo_config  # noqa: E402
from zoo_table import finish, search_alpha  # noqa: E402

NEW = ("tsv_m", "iso_c", "iso_cts")


def methods(densities) -> list[tuple[str, str, float | None]]:
    """(label, merge_method, density) rows, in table order."""
    rows = [("task_arithmetic", "task_arithmetic", None)]
    rows += [(f"ties d={d:g}", "ties", d) for d in densities]
    rows += [(f"dppa d={d:g}", "dppa", d) for d in densities]
    rows += [(m, m, None) for m in NEW]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    domains = zoo.domain_names()
    split_items = {s: load_suite("zoo", s) for s in ("dev", "test")}
    per = {s: by_domain(items) for s, items in split_items.items()}
    ref = {s: {n: score_model(*modelbuild.load(f"demo:{n}", placed=False), items) for n in ("base", *domains)}
           for s, items in split_items.items()}
    base_sd = read_state_dict(zoo.demo_path("base"))
    sds = {n: read_state_dict(zoo.demo_path(n)) for n in domains}

    amps = {}
    objectives = {n: alpha_objective(f"demo:{n}") for n in domains}
    for dens in args.densities:
        for n in domains:
            amps[(n, dens)] = search_alpha(n, dens, base_sd, sds[n], objectives[n]).alpha
    print(f"alpha searches done ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr)

    def config(method, group, dens, lam):
        if method in ("ties", "dppa"):
            c = zoo_config(method, group, dens, {n: amps[(n, dens)] for n in group} if method == "dppa" else None)
        else:
            c = {"merge_method": method, "base_model": "demo:base", "models": [{"model": f"demo:{n}"} for n in group]}
        c.setdefault("parameters", {})["lambda"] = lam
        return c

    def evaluate(split, group, merged):
        items = [i for d in group for i in per[split][d]]
        s = score_state_dict("demo:base", merged, items)
        r = ref[split]
        return {d: (s[d]["em"], s[d]["smooth"],
                    relative_gain(s[d]["smooth"], r["base"][d]["smooth"], r[d][d]["smooth"])) for d in group}

    groups = [tuple(domains)] + list(itertools.combinations(domains, 2))
    rows = methods(args.densities)
    at_one, tuned, chosen = {}, {}, {}
    for group in groups:
        for label, method, dens in rows:
            dev = {}
            for lam in args.lambdas:
                merged = dppa_ui.merge_in_memory(base_sd, [sds[n] for n in group], config(method, group, dens, lam))
                dev[lam] = (sum(g for _, _, g in evaluate("dev", group, merged).values()) / len(group), merged)
            best = max(args.lambdas, key=lambda x: dev[x][0])      # first of equals: the smaller lambda
            chosen[(group, label)] = best
            tuned[(group, label)] = evaluate("test", group, dev[best][1])
            at_one[(group, label)] = (evaluate("test", group, dev[1.0][1]) if 1.0 in dev else
                                      evaluate("test", group, dppa_ui.merge_in_memory(
                                          base_sd, [sds[n] for n in group], config(method, group, dens, 1.0))))
        print(f"{'+'.join(group)} done ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr)

    lines = []
    out = lines.append
    all4, pairs = groups[0], groups[1:]

    def all4_cell(res):
        return (f"{sum(v[0] for v in res.values()) / len(res):.2f} / "
                f"{sum(v[2] for v in res.values()) / len(res):.2f}")

    def pairs_cell(results):
        em = sum(v[0] for r in results for v in r.values()) / sum(len(r) for r in results)
        worst = [min(v[2] for v in r.values()) for r in results]
        return f"{em:.2f} / {sum(worst) / len(worst):.2f} / {sum(w >= 0.6 for w in worst)}"

    out("**All 4 fine-tunes merged** (test split): mean EM / mean share of the smooth gain kept; lambda "
        f"chosen on the dev split from {', '.join(f'{x:g}' for x in args.lambdas)}\n")
    out("| method | lambda = 1 | dev-chosen lambda | at it |")
    out("|---|---|---|---|")
    for label, _, _ in rows:
        out(f"| {label} | {all4_cell(at_one[(all4, label)])} | {chosen[(all4, label)]:g} | "
            f"{all4_cell(tuned[(all4, label)])} |")
    out("")
    out(f"**Pairs** ({len(pairs)}, test split): mean EM / mean of the worse domain's gain kept / pairs keeping "
        ">= 0.6 of both gains\n")
    out("| method | lambda = 1 | dev-chosen lambdas | at them |")
    out("|---|---|---|---|")
    for label, _, _ in rows:
        lams = ", ".join(f"{chosen[(p, label)]:g}" for p in pairs)
        out(f"| {label} | {pairs_cell([at_one[(p, label)] for p in pairs])} | {lams} | "
            f"{pairs_cell([tuned[(p, label)] for p in pairs])} |")
    out("")
    out("**All 4 merged, per domain** (test split, dev-chosen lambda): EM / smooth\n")
    out("| method | " + " | ".join(domains) + " |")
    out("|---|" + "---|" * len(domains))
    out("| fine-tune (own domain) | " + " | ".join(f"{ref['test'][d][d]['em']:.2f} / {ref['test'][d][d]['smooth']:.2f}"
                                                  for d in domains) + " |")
    for label, _, _ in rows:
        r = tuned[(all4, label)]
        out(f"| {label} | " + " | ".join(f"{r[d][0]:.2f} / {r[d][1]:.2f}" for d in domains) + " |")
    out("")
    finish(lines, args.out, t_all)


if __name__ == "__main__":
    main()
