"""Running a config, as `python -m dppa_ui merge` does: what the streaming engine (engine.py) is
wrapped in. A multi-stage config runs stage by stage; `merge_method: smile` builds a SMILE folder
(smile.py); a plain merge first checks APL's task data, resolves `amplification: auto` and
`lambda: auto` (search.py), computes APL's density maps (apl.py), then streams the merge. Every
refusal comes before any tensor is read, the `search:` block's included (search.parse_search).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import apl, engine, io, lifecycle, search, smile
from .config import MergeConfig, load_config, load_stages, read_documents, rename_refs
from .engine import MergeResult
from .stats import DeltaStats


def check(cfg: MergeConfig) -> MergeConfig:
    """Refuse a config's `search:` block (validated by the search module, as the config reader
    knows no search) before anything is read; returns the config."""
    if cfg.search is not None:
        search.parse_search(cfg)
    return cfg


def merge(config, out: str | Path | None, *, device: str = "auto", seed: int | None = None,
          overwrite: bool = False, dry_run: bool = False, progress: bool | Callable[[int, int], None] = False,
          cancel: Callable[[], bool] | None = None, allow_pickle: bool = False, allow_vocab_trim: bool = False,
          shard_bytes: int = 5 * 10**9, log: Callable[[str], None] | None = None,
          stats: list[DeltaStats] | None = None, lora_cache: str | Path | None = None,
          intermediate_dir: str | Path | None = None) -> MergeResult:
    """Run a merge from a config (dict, YAML text or path) into the folder `out`.

    `progress`: True for a tqdm bar on stderr, or a callable(done, total). `cancel`: a callable
    polled between tensors; when it returns True the merge stops and nothing is left on disk.
    `stats`: the fine-tunes' DeltaStats (aligned with the config's models, at its dp_outlier_m)
    when the caller has them (the app's statistics cache): DP then skips its statistics passes.
    `lora_cache`: where `MODEL+ADAPTER` inputs are merged and kept for reuse (default: a
    dppa-ui-lora folder in the system's temp dir). A config of several YAML documents is a
    multi-stage merge (see `merge_stages`); `intermediate_dir` keeps its named stages' outputs
    (default: temporary).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    if out is not None and not dry_run:
        sweep_beside(out, log)
    if not isinstance(config, MergeConfig) and len(read_documents(config)) > 1:
        if stats is not None:
            raise ValueError("statistics can be passed for a single merge, not for a multi-stage config")
        return merge_stages(config, out, device=device, seed=seed, overwrite=overwrite, dry_run=dry_run,
                            progress=progress, cancel=cancel, allow_pickle=allow_pickle,
                            allow_vocab_trim=allow_vocab_trim, shard_bytes=shard_bytes, log=log,
                            lora_cache=lora_cache, intermediate_dir=intermediate_dir)
    t0 = time.perf_counter()
    engine.release_memory()      # what earlier work in this process freed: the merge adds only its working set
    engine.tune_allocator()
    cfg = check(load_config(config))
    if seed is not None:
        cfg.seed = int(seed)
    for note in cfg.notices:
        log(f"notice: {note}")
    dev = engine.pick_device(device)
    if cfg.upscale == "smile":
        return smile.upscale(cfg, out, device=dev, overwrite=overwrite, dry_run=dry_run, log=log,
                             allow_pickle=allow_pickle, shard_bytes=shard_bytes, t0=t0,
                             progress=progress if callable(progress) else None, cancel=cancel)
    return _merge(cfg, out, dev, t0, overwrite, dry_run, progress, cancel, allow_pickle, allow_vocab_trim,
                  shard_bytes, log, lora_cache, stats)


def sweep_beside(out: str | Path, log: Callable[[str], None]) -> None:
    """Remove the temp folders that merges killed outright left beside `out` (lifecycle.sweep: only
    folders whose owner process is gone), before the free-space check counts the disk."""
    lifecycle.sweep(Path(out).expanduser().absolute().parent, lifecycle.is_output_temp, log)


def _merge(cfg, out, dev, t0, overwrite, dry_run, progress, cancel, allow_pickle, allow_vocab_trim, shard_bytes,
           log, lora_cache, stats=None) -> MergeResult:
    inputs = engine.Inputs(cfg, allow_pickle, allow_vocab_trim, lora_cache, log)
    try:
        if cfg.prune == "apl":      # every fine-tune's task data, before anything is computed
            apl.check_data(cfg, inputs.ft_dirs)
        out_dtype = inputs.output_dtype(cfg)
        report, disk = engine.plan_report(cfg, inputs, out_dtype, dev)
        if dry_run:
            return MergeResult(out=None, seconds=time.perf_counter() - t0, device=str(dev), tensors=len(inputs.names),
                               params=inputs.n_params,
                               kept_fraction=[], config=cfg, notices=cfg.notices, report=report)
        if out is None:
            raise ValueError("an output folder is needed (--out DIR)")
        out = Path(out)
        io.check_free_disk(out.parent if not out.exists() else out, int(disk * 1.02) + (1 << 20))
        alpha_report = search.search_amplification(cfg, inputs.base_dir, inputs.ft_dirs, log)
        lambda_report = search.search_lambda(cfg, inputs.base_dir, inputs.ft_dirs, log)
        with io.naming_full_disk(out.absolute().parent, disk), io.atomic_output_dir(out, overwrite=overwrite) as tmp:
            maps = merge_cfg = None
            if cfg.prune == "apl":
                maps, merge_cfg = _apl_maps(cfg, inputs, tmp, dev, log)
            result = engine.write(cfg, inputs, tmp, dev, out_dtype, progress=progress, cancel=cancel,
                                  shard_bytes=shard_bytes, stats=stats, density_maps=maps, merge_cfg=merge_cfg,
                                  allow_pickle=allow_pickle)
        result.out, result.seconds, result.alpha_search = out, time.perf_counter() - t0, alpha_report
        result.lambda_search = lambda_report
        return result
    finally:
        inputs.close()
        engine.release_memory()


def merge_stages(config, out: str | Path | None, *, intermediate_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None, dry_run: bool = False, **kw) -> MergeResult:
    """A multi-stage config (several YAML documents, as mergekit-multimerge): each named stage is
    merged into `intermediate_dir/NAME` (default: a temporary folder beside `out`, removed at the
    end), later stages read it by that name, and the final stage (the unnamed document, else the
    last) is written to `out`. With an `intermediate_dir`, a stage whose folder is already complete
    is reused. Every document is validated before the first merge starts. Returns the final
    stage's result, with the stages' outputs in `notices`."""
    log = log or (lambda s: print(s, file=sys.stderr))
    stages = load_stages(config)
    for s in stages:          # every document's `search:` block too, before the first merge starts
        check(s.config)
    final = stages[-1]
    keep = intermediate_dir is not None
    if dry_run:
        lines = []
        for s in stages:
            head = f"stage {s.name or '(final)'}: {s.config.method_name}"
            lines.append(head + (f", reads stage(s) {', '.join(s.depends)}" if s.depends else ""))
        lines.append("(each stage is planned in full when it runs; run a single stage's YAML with --dry-run "
                     "for its tensors)")
        return MergeResult(out=None, seconds=0.0, device="", tensors=0, params=0, kept_fraction=[],
                           config=final.config, notices=[], report="\n".join(lines))
    if out is None:
        raise ValueError("an output folder is needed for the final stage (--out DIR)")
    out = Path(out)
    if keep:
        work = Path(intermediate_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        work = lifecycle.make_dir(out.absolute().parent, f".{out.name}.stages-")
    paths = {s.name: work / s.name for s in stages if s.name is not None and s is not final}
    notes = []
    try:
        result = None
        for s in stages:
            cfg = rename_refs(s.config, {k: str(v) for k, v in paths.items()})
            target = out if s is final else paths[s.name]
            if s is not final and keep and (target / "config.json").is_file() and any(target.glob("*.safetensors")):
                log(f"stage {s.name}: {target} exists, reused")
                notes.append(f"stage {s.name}: reused {target}")
                continue
            log(f"stage {s.name or '(final)'}: {s.config.method_name} -> {target}")
            result = merge(cfg, target, log=log, dry_run=False,
                           **({**kw, "overwrite": True} if s is not final else kw))
            notes.append(f"stage {s.name or '(final)'}: {target}")
        result.notices = result.notices + notes
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)




def _apl_maps(cfg: MergeConfig, inputs: engine.Inputs, tmp: Path, dev: torch.device, log) -> tuple[list, MergeConfig]:
    """APL's density maps and the config with its merge weights (the importance is cached), its
    report written beside the weights."""
    aplan = apl.merge_inputs(cfg, {n: inputs.shapes[n] for n in inputs.float_names}, inputs.base_dir,
                             inputs.ft_dirs, device=dev)
    (tmp / apl.APL_FILE).write_text(json.dumps(apl.report(cfg, aplan), indent=1))
    for m, w in zip(cfg.models, aplan.weights):
        log(f"apl: {m.model} merge weight x{w:.3f}")
    return aplan.maps, apl.weighted(cfg, aplan.weights)
