"""`python -m dppa_ui merge|zoo|score`: the headless entry points.

Every failure exits non-zero with a one-line reason (no traceback unless DPPA_UI_DEBUG=1).
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def _merge(args) -> int:
    from .engine import merge
    out = args.out or args.out_pos
    if not out and not args.dry_run:
        print("error: give an output folder with --out DIR", file=sys.stderr)
        return 2
    res = merge(args.config, out, device=args.device, seed=args.seed, overwrite=args.overwrite,
                dry_run=args.dry_run, progress=not args.quiet, allow_pickle=args.allow_pickle,
                allow_vocab_trim=args.allow_vocab_trim, shard_bytes=args.shard_size,
                lora_cache=args.lora_merge_cache, intermediate_dir=args.intermediate_dir)
    if args.dry_run:
        print(res.plan)
        return 0
    kept = ""
    if res.config.family == "pipeline" and res.kept_fraction:
        kept = "; kept " + ", ".join(f"{k:.1%}" for k in res.kept_fraction) + " of each delta"
    print(f"merged {res.tensors} tensors ({res.params:,} parameters) with {res.config.method_name} on "
          f"{res.device} in {res.seconds:.1f} s{kept} -> {res.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dppa_ui", description="Merge language models: DPPA, PCB and every mergekit method.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="run a merge from a YAML config (mergekit's merge YAML, or several "
                       "documents for a multi-stage merge)")
    m.add_argument("config", help="YAML config file")
    m.add_argument("out_pos", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    m.add_argument("--out", help="output folder (created; refused if non-empty unless --overwrite)")
    m.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    m.add_argument("--seed", type=int, help="overrides the config's seed (DARE masks)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--dry-run", action="store_true", help="validate, then print tensors, parameters and estimates")
    m.add_argument("--allow-pickle", action="store_true", help="also read pickle .bin weights (weights_only)")
    m.add_argument("--allow-vocab-trim", action="store_true", help="merge the common rows of embeddings whose vocab sizes differ")
    m.add_argument("--shard-size", type=_size, default=5 * 10**9, help="output shard size (default 5GB)")
    m.add_argument("--lora-merge-cache", metavar="DIR", help="where MODEL+ADAPTER inputs are merged and kept "
                   "(default: dppa-ui-lora in the temp dir)")
    m.add_argument("--intermediate-dir", "-I", metavar="DIR", help="multi-stage configs: keep (and reuse) the "
                   "named stages' outputs here (default: temporary)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)
    try:
        from . import zoo_cli
    except ImportError:       # the demo-zoo commands are optional for the merge core
        zoo_cli = None
    if zoo_cli is not None:
        zoo_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; DPPA_UI_DEBUG=1 for the traceback
        if os.environ.get("DPPA_UI_DEBUG"):
            raise
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
