"""CLI commands of the demo family and scoring, registered into `python -m dppa_ui`:

  zoo build [--dir DIR] [--quick] [--seed N] [--workers N]
                                                   rebuild the demo family (deterministic)
  zoo list                                         names, roles and domains of the demo models
  score MODEL [--suite zoo|FILE.jsonl] [--split test|dev] [--json] [--relative] [--perplexity TEXT]

MODEL is a model directory or `demo:NAME`. Errors are raised: `dppa_ui.cli.main` prints them as one
`error: ...` line and exits 1.
"""
from __future__ import annotations

import json
import time


def register(subparsers) -> None:
    """Add the `zoo` and `score` commands to an argparse subparsers object."""
    zoo = subparsers.add_parser("zoo", help="build or list the demo model family",
                                description="The demo model family (a tiny Llama base and fine-tunes).")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="{build,list}")
    zsub.required = True
    b = zsub.add_parser("build", help="(re)build the demo family deterministically")
    b.add_argument("--dir", default=None, help="output directory (default: the packaged assets/zoo); "
                   "an existing directory is replaced only if it is empty or a previous zoo build")
    b.add_argument("--quick", action="store_true", help="seconds-scale build (tiny, for tests)")
    b.add_argument("--seed", type=int, default=0, help="seed (default 0: the committed family)")
    b.add_argument("--workers", type=int, default=None, help="CPU cores to train on (default: up to 2; "
                   "--quick: 1); the weights do not depend on it")
    b.set_defaults(func=cmd_zoo_build)
    lst = zsub.add_parser("list", help="list the demo models")
    lst.set_defaults(func=cmd_zoo_list)

    s = subparsers.add_parser("score", help="score a model on the demo suite or a JSONL file",
                              description="Per domain: exact match (greedy), smooth score (teacher-forced "
                                          "answer token accuracy) and mean answer log-likelihood.")
    s.add_argument("model", help="model directory or demo:NAME")
    s.add_argument("--suite", default="zoo", help='"zoo" (default) or a JSONL file of {"prompt", "answer", "domain"}')
    s.add_argument("--split", default="test", choices=["test", "dev"], help="zoo split (default test)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--relative", action="store_true",
                   help="zoo suite: also show the share of the demo fine-tunes' gain over the base kept")
    s.add_argument("--perplexity", metavar="TEXT", default=None,
                   help="instead: perplexity of TEXT (or of a file's contents, written @FILE)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_score)


def cmd_zoo_build(args) -> int:
    from .zoo import build_zoo

    build_zoo(args.dir, quick=args.quick, seed=args.seed, workers=args.workers)
    return 0


def cmd_zoo_list(args) -> int:
    from .zoo import demo_names, demo_path, model_info

    for name in demo_names():
        try:
            info = model_info(demo_path(name))
            print(f"demo:{name:<18} role={info.get('role')!s:<9} domain={info.get('domain')}")
        except ValueError as e:
            print(f"demo:{name:<18} ({e})")
    return 0


def _reference_scores(split: str, domains) -> tuple[dict, dict]:
    """(base scores, {domain: that domain's fine-tune scores}) of the demo family on the zoo suite."""
    from .evaluation import load_model, load_suite, score_model
    from .zoo import ZOO_DIR

    ref_file = ZOO_DIR / "reference_scores.json"
    if split == "test" and ref_file.is_file():
        ref = json.loads(ref_file.read_text())
        return ref["base"], {d: ref[d] for d in domains if d in ref}
    items = load_suite("zoo", split)
    base = score_model(*load_model("demo:base"), items)
    fts = {d: score_model(*load_model(f"demo:{d}"), [i for i in items if i["domain"] == d]) for d in domains}
    return base, fts


def cmd_score(args) -> int:
    from transformers.utils import logging as hf_logging

    from .evaluation import (format_scores, load_model, load_suite, perplexity, relative_scores,
                             score_model)

    hf_logging.disable_progress_bar()          # one table of results, no loading bars

    model, tok = load_model(args.model)
    if args.perplexity is not None:
        text = args.perplexity
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        ppl = perplexity(model, tok, text)
        print(json.dumps({"perplexity": ppl}) if args.json else f"perplexity: {ppl:.3f}")
        return 0
    items = load_suite(args.suite, args.split)
    t0 = time.perf_counter()
    scores = score_model(model, tok, items, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    gains = None
    if args.relative:
        if args.suite != "zoo":
            raise ValueError("--relative needs the zoo suite (it compares with the demo fine-tunes)")
        base, fts = _reference_scores(args.split, list(scores))
        gains = relative_scores(scores, base, {d: fts[d][d] for d in fts})
    if args.json:
        out = {"model": args.model, "suite": str(args.suite), "split": args.split, "scores": scores,
               "seconds": round(seconds, 3)}
        if gains is not None:
            out["gains"] = gains
        print(json.dumps(out, indent=2))
    else:
        print(format_scores(scores, gains))
        print(f"({len(items)} items in {seconds:.1f} s)")
    return 0
