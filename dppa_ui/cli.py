"""`python -m dppa_ui merge|search|zoo|score`: the headless entry points.

Every failure exits non-zero with a one-line reason (no traceback unless DPPA_UI_DEBUG=1). Ctrl-C
and SIGTERM (docker stop, systemd, a job scheduler) stop a merge at once: its temp folder is
removed and the exit line says so (exit 130 and 143). A run killed outright (-9, the OOM killer)
leaves its temp folder; the next merge or search beside the same output removes it and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from . import io, search, zoo_cli
from .config import load_config
from .lifecycle import Stopped, sigterm_as_interrupt
from .refs import resolve_model
from .runner import merge, sweep_beside


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def _merge(args) -> int:
    out = args.out or args.out_pos
    if not out and not args.dry_run:
        print("error: give an output folder with --out DIR", file=sys.stderr)
        return 2
    res = merge(args.config, out, device=args.device, seed=args.seed, overwrite=args.overwrite,
                dry_run=args.dry_run, progress=not args.quiet, allow_pickle=args.allow_pickle,
                allow_vocab_trim=args.allow_vocab_trim, shard_bytes=args.shard_size,
                lora_cache=args.lora_merge_cache, intermediate_dir=args.intermediate_dir)
    if args.dry_run:
        print(res.report)
        return 0
    if res.config.upscale:
        print(f"upscaled {res.tensors} projections with {res.config.method_name} on {res.device} in "
              f"{res.seconds:.1f} s ({res.params:,} parameters) -> {res.out}")
        return 0
    kept = ""
    if res.config.family == "pipeline" and res.kept_fraction:
        kept = "; kept " + ", ".join(f"{k:.1%}" for k in res.kept_fraction) + " of each delta"
    print(f"merged {res.tensors} tensors ({res.params:,} parameters) with {res.config.method_name} on "
          f"{res.device} in {res.seconds:.1f} s{kept} -> {res.out}")
    return 0


def _search(args) -> int:
    cfg = load_config(args.config)
    autos = cfg.lambda_auto or any(m.get("amplification") == "auto" for m in cfg.models)
    if cfg.search is None and not autos:
        print("error: the config has no `search:` block (and no `amplification: auto` / `lambda: auto`); "
              "add one, e.g. `search: {parameters: {models[*].weight: [0.5, 1.5]}, budget: 100}`", file=sys.stderr)
        return 2
    spec = search.parse_search(cfg) if cfg.search is not None else None
    if spec is not None:
        spec.budget = args.budget or spec.budget
        spec.seed = spec.seed if args.seed is None else args.seed
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if args.out:
        sweep_beside(args.out, log=lambda s: print(s, file=sys.stderr))
    with contextlib.ExitStack() as stack:   # a non-empty --out is refused before any work
        tmp = stack.enter_context(io.atomic_output_dir(args.out, overwrite=args.overwrite)) if args.out else None
        base_dir = resolve_model(cfg.base_model)
        ft_dirs = [resolve_model(m.model) for m in cfg.models]
        search.search_amplification(cfg, base_dir, ft_dirs, log)
        search.search_lambda(cfg, base_dir, ft_dirs, log)
        if spec is not None:
            def progress(row):
                if not args.quiet:
                    print(f"  eval {row['eval']}/{spec.budget}: objective {row['objective']:.4f} "
                          f"(best {row['best']:.4f})", file=sys.stderr)
            res = search.run_search(cfg, spec, base_dir=base_dir, ft_dirs=ft_dirs, workers=args.workers,
                                    ray=args.ray, batch=args.batch, threads=args.threads, on_eval=progress,
                                    log=log, test=not args.no_test)
        else:                         # only the presets: their result is the config
            cfg.search = None
            res = search.SearchResult(config=cfg, values={}, objective=float("nan"))
        files = search.write_outputs(res, tmp) if tmp else {}
    print(f"best: {res.values or 'the presets above'} (dev objective {res.objective:.4f})")
    if res.test and res.spec is not None and res.spec.lm_eval is not None:
        m = res.spec.metric
        line = ", ".join(f"{t} {m} {s[m]:.3f} (best fine-tune {res.test['reference'][t]:.3f})"
                         for t, s in res.test["scores"].items())
        print(f"test ({res.test['documents']}): objective {res.test['objective']:.4f}; {line}")
    elif res.test:
        line = ", ".join(f"{d} EM {s['em']:.3f} / smooth {s['smooth']:.3f}" for d, s in res.test["scores"].items())
        print(f"test split: objective {res.test['objective']:.4f}; {line}")
    if args.out:
        print("wrote " + ", ".join(p.name for p in files.values()) + f" to {args.out}")
    else:
        print(res.config.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dppa_ui", description="Merge language models: DPPA, PCB and every mergekit method.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="run a merge from a YAML config (mergekit's merge YAML, or several "
                       "documents for a multi-stage merge; merge_method: smile writes a SMILE folder)")
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
    s = sub.add_parser("search", help="search merge parameters on dev data (the config's `search:` block)",
                       description="Every candidate is merged in memory and scored on the dev split; writes "
                                   "best.yaml (runs with `merge`), search_log.csv and a plot of the objective.")
    s.add_argument("config", help="YAML config with a `search:` block (or `amplification: auto` / `lambda: auto`)")
    s.add_argument("--out", help="output folder for best.yaml, search_log.csv, search_plot.html/png, summary.json")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    s.add_argument("--workers", type=int, default=1, help="evaluate candidates in N processes (or N Ray actors)")
    s.add_argument("--ray", metavar="ADDRESS", help="run the candidates on Ray actors: a cluster address, "
                                                    "`auto` (the running cluster) or `local` (start one here)")
    s.add_argument("--batch", type=int, help="candidates asked per round (default: --workers)")
    s.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    s.add_argument("--budget", type=int, help="overrides search.budget")
    s.add_argument("--seed", type=int, help="overrides search.seed")
    s.add_argument("--no-test", action="store_true", help="do not score the result on the test split")
    s.add_argument("--quiet", action="store_true", help="no per-candidate lines")
    s.set_defaults(func=_search)
    zoo_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        how, code = ("stopped by SIGTERM", 143) if isinstance(e, Stopped) else ("interrupted (Ctrl-C)", 130)
        print(f"error: {how}; the run stopped where it was and its temp files were removed: nothing was "
              "written", file=sys.stderr)
        return code
    except Exception as e:  # one line for users; DPPA_UI_DEBUG=1 for the traceback
        if os.environ.get("DPPA_UI_DEBUG"):
            raise
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
