"""Magnitude pruning: TIES step 1, "trim" (Yadav et al. 2023, arXiv 2306.01708, Sec. 3).

Keep the k = int(density * n) entries of largest |delta| (at least one when density > 0, as
mergekit 0.1.5) and zero the rest. No rescaling by default: TIES keeps the surviving entries at
their trained values; `rescale: true` ("l1", mergekit's option) restores the L1 norm. Ties at the
threshold are resolved by `select.topk_mask` (lowest flat index first), so exactly k entries survive.
"""
from __future__ import annotations

import torch

from .rescale import rescale_to_l1
from .select import keep_count, topk_mask


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the int(density * n) entries of largest |delta|."""
    return topk_mask(delta.abs(), keep_count(density, delta.numel()))


def magnitude_prune(delta: torch.Tensor, density: float, inplace: bool = False, rescale: str = "none") -> torch.Tensor:
    """Zero all but the int(density * n) largest-magnitude entries of `delta`.

    `inplace=True` zeroes them in `delta` itself (the engine's buffers), saving a copy."""
    if density >= 1.0:
        return delta
    # A float 1/0 mask written over |delta| itself: no extra buffer, a fast float multiply.
    keep = delta.abs()
    before = keep.sum() if rescale == "l1" else None
    topk_mask(keep, keep_count(density, delta.numel()), out=keep)
    out = delta.mul_(keep) if inplace else delta * keep
    return rescale_to_l1(out, before) if rescale == "l1" else out


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `magnitude` prune of fine-tune i's delta of tensor `name`."""
    return magnitude_prune(delta, step.density, inplace=inplace, rescale=cfg.models[i].get("rescale"))
