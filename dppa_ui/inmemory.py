"""Merges of state dicts held in memory, with no disk round trip: the plan (plan.py) run through the
pipeline over dicts instead of checkpoint readers. The app's instant path and every search
candidate (search.py) merge this way; APL's importance comes from apl.py (cached), DP's
statistics from stats.py when not given.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import apl
from .config import MergeConfig, load_config
from .pipeline import Scratch, dp_maps_from_stats, merge_tensor, output_dtype, pcb_model_stats
from .plan import DictReader, build_plan, input_refs
from .stats import DeltaStats, collect_stats


def merge_state_dicts(base_sd: dict[str, torch.Tensor] | None, ft_sds, config,
                      device: str | torch.device = "cpu", stats: list[DeltaStats] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: Callable[[], bool] | None = None, apl_plan=None) -> dict[str, torch.Tensor]:
    """Merge state dicts held in memory, with no disk round-trip. Returns tensors on CPU in the
    output dtype (the base's unless the config sets one). `stats` (from `collect_stats`) can be
    passed to skip the DP statistics passes. APL's importance is measured on the models the
    config's refs name (cached; `apl_plan` from `apl.merge_inputs` skips even the cache look-up).

    `ft_sds`: a list aligned with cfg.models (a base listed among them, as linear and karcher
    keep it, may be left out: `base_sd` fills its place), or a dict {model ref: state dict} (needed
    for `slices`). `base_sd` may be None for interpolations without a base."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if cfg.upscale:
        raise ValueError(f"merge_method {cfg.upscale} builds a model, not a state dict: use dppa_ui.smile.build")
    if any(isinstance(m.get("amplification"), str) for m in cfg.models):
        raise ValueError("amplification: auto must be resolved first (search.search_amplification)")
    by_ref = dict(ft_sds) if isinstance(ft_sds, dict) else None
    if by_ref is None:
        non_base = [m for m in cfg.models if m.model != cfg.base_model]
        if len(ft_sds) == len(cfg.models):
            by_ref = {m.model: sd for m, sd in zip(cfg.models, ft_sds)}
        elif len(ft_sds) == len(non_base):
            by_ref = {m.model: sd for m, sd in zip(non_base, ft_sds)}
        else:
            raise ValueError(f"the config lists {len(cfg.models)} fine-tunes but {len(ft_sds)} state dicts were given")
    if cfg.base_model is not None and base_sd is not None:
        by_ref.setdefault(cfg.base_model, base_sd)
    refs = input_refs(cfg)
    missing = [r for r in refs if r not in by_ref]
    if missing:
        raise ValueError(f"no state dict for {', '.join(missing)}")
    device = torch.device(device)
    if cfg.family == "pipeline" and cfg.slices is None:
        fts = [by_ref[m.model] for m in cfg.models]
        names = list(base_sd)
        float_names = [n for n in names if base_sd[n].is_floating_point()]
        dp_maps = None
        if cfg.prune == "apl":
            aplan = apl_plan or apl.merge_inputs(cfg, {n: tuple(base_sd[n].shape) for n in float_names}, device=device)
            dp_maps, cfg = aplan.maps, apl.weighted(cfg, aplan.weights)
        if cfg.prune == "dp" and stats is None:
            stats = collect_stats(float_names, lambda n: (base_sd[n].to(device), [sd[n].to(device) for sd in fts]),
                                  [m.model for m in cfg.models], cfg.get("dp_outlier_m"))
        if cfg.prune == "dp":
            dp_maps = dp_maps_from_stats(cfg, stats)
    else:
        dp_maps = None
    readers = [DictReader(by_ref[r]) for r in refs]
    plan = build_plan(cfg, readers)

    jobs = {j.name: j for j in plan.jobs}

    def load(name):
        job = jobs[name]
        base = readers[job.base[0]].get(job.base[1]).to(device) if job.base else None
        return base, [readers[i].get(n) for i, n in job.sources]
    pcb_stats, tied = None, {}
    if cfg.family == "pipeline" and cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":
        pcb_stats, tied = pcb_model_stats([(j.name, j.cfg) for j in plan.jobs if base_sd[j.name].is_floating_point()],
                                          load, dp_maps, device)
    out, scratch = {}, Scratch()
    for k, job in enumerate(plan.jobs):
        if cancel and cancel():
            raise InterruptedError("merge cancelled")
        base, fts = load(job.name)
        ref = base if base is not None else fts[0]
        math_job = jobs[tied.get(job.name, job.name)]      # a tied duplicate is merged as its primary
        merged = merge_tensor(math_job.cfg, math_job.name, base, fts, dp_maps,
                              out_dtype=output_dtype(cfg, ref.dtype), scratch=scratch, pcb_stats=pcb_stats)
        out[job.name] = merged.to("cpu")
        if progress:
            progress(k + 1, len(plan.jobs))
    return out
