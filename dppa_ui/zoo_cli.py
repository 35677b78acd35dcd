"""CLI commands of the demo family and scoring, registered into `python -m dppa_ui`:

  zoo build [--dir DIR] [--quick] [--seed N] [--workers N]
                                                   rebuild the demo family (deterministic)
  zoo list                                         names, roles and domains of the demo models
  score MODEL [--suite zoo|FILE.jsonl] [--split test|dev] [--json] [--relative] [--perplexity TEXT]
  score MODEL --lm-eval TASKS [--limit N] [--num-fewshot K] [--batch-size B] [--include-path DIR]
              [--apply-chat-template] [--suite ...] [--out DIR]

MODEL is a model directory or `demo:NAME`. Errors are raised: `dppa_ui.cli.main` prints them as one
`error: ...` line and exits 1.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time

from . import harness, modelbuild
from .evaluation import format_scores, load_suite, perplexity, relative_scores, score_model
from .io import atomic_output_dir
from .zoo import ZOO_DIR, build_zoo, demo_names, demo_path, model_info


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

    s = subparsers.add_parser("score", help="score a model on the demo suite, a JSONL file or lm-eval tasks",
                              description="Per domain: exact match (greedy), smooth score (teacher-forced "
                                          "answer token accuracy) and mean answer log-likelihood. With "
                                          "--lm-eval: lm-evaluation-harness tasks instead (or as well, with "
                                          "--suite), on the same model object.")
    s.add_argument("model", help="model directory or demo:NAME")
    s.add_argument("--suite", default=None, help='"zoo" (default) or a JSONL file of {"prompt", "answer", "domain"}')
    s.add_argument("--split", default="test", choices=["test", "dev"], help="zoo split (default test)")
    s.add_argument("--batch-size", type=int, default=None,
                   help=f"items per forward pass (default 256; lm-eval: {harness.DEFAULT_BATCH})")
    s.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="lm-eval task, group or tag names, comma-separated (globs allowed): runs "
                        "lm-evaluation-harness on the model and prints its per-task table")
    s.add_argument("--limit", default=None, metavar="N", help="lm-eval: the first N documents of each task")
    s.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="lm-eval: few-shot examples")
    s.add_argument("--include-path", metavar="DIR", default=None,
                   help="lm-eval: a folder of task YAML files (e.g. assets/lm_eval: the demo domains)")
    s.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval: render each prompt with the tokenizer's chat template")
    s.add_argument("--out", metavar="DIR", default=None,
                   help="write scores.json (and, with --lm-eval, lm-eval's results as lm_eval_results.json) here")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.add_argument("--relative", action="store_true",
                   help="zoo suite: also show the share of the demo fine-tunes' gain over the base kept")
    s.add_argument("--perplexity", metavar="TEXT", default=None,
                   help="instead: perplexity of TEXT (or of a file's contents, written @FILE)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_score)


def cmd_zoo_build(args) -> int:

    build_zoo(args.dir, quick=args.quick, seed=args.seed, workers=args.workers)
    return 0


def cmd_zoo_list(args) -> int:

    for name in demo_names():
        try:
            info = model_info(demo_path(name))
            print(f"demo:{name:<18} role={info.get('role')!s:<9} domain={info.get('domain')}")
        except ValueError as e:
            print(f"demo:{name:<18} ({e})")
    return 0


def _reference_scores(split: str, domains) -> tuple[dict, dict]:
    """(base scores, {domain: that domain's fine-tune scores}) of the demo family on the zoo suite."""

    ref_file = ZOO_DIR / "reference_scores.json"
    if split == "test" and ref_file.is_file():
        ref = json.loads(ref_file.read_text())
        return ref["base"], {d: ref[d] for d in domains if d in ref}
    items = load_suite("zoo", split)
    base = score_model(*modelbuild.load("demo:base", placed=False), items)
    fts = {d: score_model(*modelbuild.load(f"demo:{d}", placed=False), [i for i in items if i["domain"] == d]) for d in domains}
    return base, fts


def cmd_score(args) -> int:
    if args.lm_eval is not None:
        return cmd_score_lm_eval(args)
    for flag, given in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot),
                        ("--include-path", args.include_path), ("--apply-chat-template", args.apply_chat_template)):
        if given not in (None, False):
            raise ValueError(f"{flag} is an lm-eval option: give the tasks with --lm-eval TASKS")
    args.suite = args.suite or "zoo"
    with contextlib.ExitStack() as stack:      # a non-empty --out is refused before any work
        out = _out_dir(stack, args)
        result = _score_suite(args, out)
    return result


def _out_dir(stack, args):
    if not args.out:
        return None
    if args.perplexity is not None:
        raise ValueError("--out writes scores; --perplexity prints one number (drop one of them)")
    return stack.enter_context(atomic_output_dir(args.out, overwrite=args.overwrite))


def _score_suite(args, out) -> int:
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()          # one table of results, no loading bars

    model, tok = modelbuild.load(args.model, placed=False)
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
    scores = score_model(model, tok, items, batch_size=args.batch_size or 256)
    seconds = time.perf_counter() - t0
    gains = None
    if args.relative:
        if args.suite != "zoo":
            raise ValueError("--relative needs the zoo suite (it compares with the demo fine-tunes)")
        base, fts = _reference_scores(args.split, list(scores))
        gains = relative_scores(scores, base, {d: fts[d][d] for d in fts})
    doc = {"model": args.model, "suite": str(args.suite), "split": args.split, "scores": scores,
           "seconds": round(seconds, 3)}
    if gains is not None:
        doc["gains"] = gains
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_scores(scores, gains))
        print(f"({len(items)} items in {seconds:.1f} s)")
    if out is not None:
        (out / "scores.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def cmd_score_lm_eval(args) -> int:
    """lm-eval tasks on the model as this project builds it (accelerate placement, disk offload,
    SMILE folders), and our suite beside them when --suite is given. Every input is checked
    (limit, few-shot, task names, their data) before the model is built."""
    from transformers.utils import logging as hf_logging


    if args.perplexity is not None or args.relative:
        raise ValueError("--perplexity and --relative score our suite only: drop them, or --lm-eval")
    limit = harness.check_limit(args.limit)
    fewshot = harness.check_fewshot(args.num_fewshot)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = load_suite(args.suite, args.split) if args.suite else None
    tasks = harness.load_tasks(args.lm_eval, args.include_path)
    hf_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        out = _out_dir(stack, args)
        offload = stack.enter_context(tempfile.TemporaryDirectory(prefix="dppa-ui-offload-"))
        model, tok = modelbuild.load(args.model, offload_dir=offload)
        lm = harness.wrap(model, tok, args.batch_size)
        t0 = time.perf_counter()
        results = harness.run(lm, tasks, limit=limit, num_fewshot=fewshot, apply_chat_template=args.apply_chat_template)
        seconds = time.perf_counter() - t0
        doc = {"model": args.model, "lm_eval": harness.metrics(results),
               "lm_eval_args": {"tasks": tasks.names, "limit": limit, "num_fewshot": fewshot,
                                "batch_size": args.batch_size or harness.DEFAULT_BATCH,
                                "apply_chat_template": args.apply_chat_template},
               "seconds": round(seconds, 3)}
        if items is not None:
            t0 = time.perf_counter()
            doc.update(suite=str(args.suite), split=args.split,
                       scores=score_model(model, tok, items, batch_size=args.batch_size or 256),
                       suite_seconds=round(time.perf_counter() - t0, 3))
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(harness.table(results))
            print(f"(lm-eval: {', '.join(tasks.names)} in {seconds:.1f} s"
                  + (f", the first {limit} documents of each" if limit else "") + ")")
            if items is not None:
                print(format_scores(doc["scores"]))
                print(f"({len(items)} items in {doc['suite_seconds']:.1f} s)")
        if out is not None:
            (out / "lm_eval_results.json").write_text(harness.to_json(results) + "\n")
            (out / "scores.json").write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote scores.json, lm_eval_results.json to {args.out}", file=sys.stderr)
    return 0
