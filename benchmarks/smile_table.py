"""SMILE on the demo family: the 4 fine-tunes upscaled into one mixture of low-rank experts (issue 9).

    python benchmarks/smile_table.py [--split test] [--ranks 4 8 16 32 64 full] [--router 8] [--out smile.md]

Prints markdown tables, every number measured now on the committed family (assets/zoo):
  1. per domain EM / smooth over rank_of_expert and num_experts_per_tok k = 1, 2, with the
     parameter count beside a plain merge's, for the paper's scope (the projections inside the
     blocks; embeddings, norms and lm_head the base's, the default `smile_others: base`, as
     FusionBench keeps them) and for `smile_scope: embeddings` (the input embeddings upscaled too;
     ours);
  2. routing accuracy per domain at full rank, k = 1: the share of (layer, token) top-1 picks that
     go to the domain's own fine-tune, and the share of items whose most picked expert it is;
  3. the same models with every token forced to the domain's own expert ("oracle" routing): what
     the experts hold, apart from the router;
  4. the issue's target: at full rank and k = 1, each domain's EM as a share of its fine-tune's.
The 4-way weight merge (task arithmetic) is scored here too, for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dppa_ui  # noqa: E402
from dppa_ui import smile, smile_model, zoo  # noqa: E402
from dppa_ui import modelbuild  # noqa: E402
from dppa_ui.evaluation import by_domain, load_suite, score_model, score_state_dict  # noqa: E402
from dppa_ui.io import read_state_dict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_table import finish, load_average  # noqa: E402

SCOPES = {"blocks": "paper scope: projections in the blocks", "embeddings": "+ input embeddings (ours)"}


def config(rank, k: int, scope: str, router: int) -> dict:
    return {"merge_method": "smile", "base_model": "demo:base",
            "models": [{"model": f"demo:{d}"} for d in zoo.domain_names()],
            "parameters": {"rank_of_expert": rank, "rank_of_router": router, "num_experts_per_tok": k,
                           "smile_scope": scope}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--ranks", nargs="+", default=["4", "8", "16", "32", "64", "full"])
    ap.add_argument("--router", type=int, default=8, help="rank_of_router")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    ranks = [r if r == "full" else int(r) for r in args.ranks]
    domains = zoo.domain_names()
    items = load_suite("zoo", args.split)
    per = by_domain(items)
    if args.split == "test":
        ref = json.loads((zoo.ZOO_DIR / "reference_scores.json").read_text())
    else:
        ref = {d: score_model(*modelbuild.load(f"demo:{d}", placed=False), per[d]) for d in domains}
    ft = {d: ref[d][d] for d in domains}
    base_sd = read_state_dict(zoo.demo_path("base"))
    ft_sds = [read_state_dict(zoo.demo_path(d)) for d in domains]
    lines = []
    out = lines.append
    cell = lambda s: f"{s['em']:.2f} / {s['smooth']:.2f}"  # noqa: E731

    ta = score_state_dict("demo:base", dppa_ui.merge_in_memory(base_sd, ft_sds, {
        "merge_method": "task_arithmetic", "base_model": "demo:base",
        "models": [{"model": f"demo:{d}"} for d in domains]}), items)
    plain = sum(t.numel() for t in base_sd.values())
    out(f"**SMILE, all {len(domains)} fine-tunes** ({args.split} split, EM / smooth per domain; rank_of_router "
        f"{args.router}; a plain merge has {plain:,} parameters)\n")
    out("| scope | rank_of_expert | k | " + " | ".join(domains) + " | parameters |")
    out("|---|---|---|" + "---|" * len(domains) + "---|")
    out("| fine-tunes (each on its own domain) | – | – | " + " | ".join(cell(ft[d]) for d in domains) + " | – |")
    out("| task arithmetic (weight merge) | – | – | " + " | ".join(cell(ta[d]) for d in domains)
        + f" | {plain:,} |")
    full = {}
    times = []
    for scope in SCOPES:
        for k in (1, 2):
            for rank in ranks:
                model, tok = smile.build(config(rank, k, scope, args.router), base_sd=base_sd, ft_sds=ft_sds)
                t0 = time.perf_counter()
                s = score_model(model, tok, items)
                times.append(time.perf_counter() - t0)
                n = smile_model.parameter_count(model)["total"]
                out(f"| {scope} | {rank} | {k} | " + " | ".join(cell(s[d]) for d in domains)
                    + f" | {n:,} ({n / plain:.1f}x) |")
                if rank == "full" and k == 1:
                    full[scope] = (model, tok, s)
            print(f"{scope} k={k} done", file=sys.stderr)
    out("")

    out("**Routing at full rank, k = 1**: share of (layer, token) top-1 picks that are the domain's own "
        "expert / share of items whose most picked expert it is (chance: 0.25), over every token of prompt "
        "and answer, and over the positions that predict the answer\n")
    out("| scope | tokens | " + " | ".join(domains) + " |")
    out("|---|---|" + "---|" * len(domains))
    for scope, (model, tok, _) in full.items():
        for positions in ("all", "answer"):
            acc = smile.routing_accuracy(model, tok, items, positions=positions)
            out(f"| {scope} | {positions} | " + " | ".join(f"{acc[d]['decisions']:.2f} / {acc[d]['items']:.2f}"
                                                         for d in domains) + " |")
    out("")

    out("**Oracle routing** (full rank, every token forced to the domain's own expert): EM / smooth\n")
    out("| scope | " + " | ".join(domains) + " |")
    out("|---|" + "---|" * len(domains))
    for scope, (model, tok, _) in full.items():
        row = []
        for e, d in enumerate(domains):
            with smile_model.forced(model, e):
                row.append(cell(score_model(model, tok, per[d])[d]))
        out(f"| {scope} | " + " | ".join(row) + " |")
    out("")

    out("**Target** (full rank, k = 1): each domain's EM as a share of its fine-tune's (target >= 0.8)\n")
    out("| scope | " + " | ".join(domains) + " |")
    out("|---|" + "---|" * len(domains))
    for scope, (_, _, s) in full.items():
        out(f"| {scope} | " + " | ".join(f"{s[d]['em'] / ft[d]['em']:.2f}" for d in domains) + " |")
    out("")
    plain_t = time.perf_counter()
    score_state_dict("demo:base", base_sd, items)
    plain_t = time.perf_counter() - plain_t
    out(f"Scoring the {len(items)} items took {min(times):.1f}–{max(times):.1f} s per SMILE model against "
        f"{plain_t:.1f} s for the plain model (one thread, load average {load_average()}).")
    finish(lines, args.out, t_all)


if __name__ == "__main__":
    main()
