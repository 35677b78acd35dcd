"""Breadcrumbs prune: "Model Breadcrumbs" (Davari & Belilovsky 2023, arXiv 2312.06795, Sec. 3),
with mergekit 0.1.5's counts (sparsify.magnitude_outliers).

Rank the n entries of |delta| (largest first). Drop the top n_top = int(gamma * n) (outliers) and
keep the next target = int(density * n): the band of ranks [n_top, n_top + target). When
n_top + target > n the top drop shrinks so that exactly `target` entries stay (mergekit's rule;
`check` below refuses density + gamma > 1 anyway). density >= 1 keeps everything. Ties at either cut
follow `select.topk_mask` (lowest flat index ranks first). `rescale: true` restores the L1 norm
(mergekit's default for breadcrumbs is false).
"""
from __future__ import annotations

import torch

from .rescale import rescale_to_l1
from .select import kth_largest, topk_mask


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int, int]:
    """(outliers dropped at the top, entries kept, entries dropped at the bottom) of n entries."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    return n - n_bottom - target, target, n_bottom


def breadcrumbs_mask(abs_delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Float 1/0 mask of the kept band (same shape as `abs_delta`)."""
    top, kept, _ = breadcrumbs_counts(abs_delta.numel(), density, gamma)
    keep = topk_mask(abs_delta, top + kept, out=torch.empty_like(abs_delta, dtype=torch.float32))
    if top:
        keep -= topk_mask(abs_delta, top, out=torch.empty_like(keep))
    return keep


def breadcrumbs_thresholds(abs_delta: torch.Tensor, density: float, gamma: float) -> tuple[float | None, float | None]:
    """|delta| of the largest and of the smallest kept entry (the band's cuts on a histogram);
    None where nothing is kept."""
    top, kept, _ = breadcrumbs_counts(abs_delta.numel(), density, gamma)
    if kept == 0:
        return None, None
    return float(kth_largest(abs_delta, top + 1)), float(kth_largest(abs_delta, top + kept))


def breadcrumbs_prune(delta: torch.Tensor, density: float, gamma: float, rescale: str = "none",
                      inplace: bool = False) -> torch.Tensor:
    """Keep the band below the gamma outliers (see module doc); `inplace` may overwrite delta."""
    if density >= 1.0:
        return delta
    before = delta.abs().sum() if rescale == "l1" else None
    keep = breadcrumbs_mask(delta.abs(), density, gamma)
    out = delta.mul_(keep) if inplace else delta * keep
    return rescale_to_l1(out, before) if rescale == "l1" else out


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `breadcrumbs` prune of fine-tune i's delta of tensor `name`."""
    m = cfg.models[i]
    return breadcrumbs_prune(delta, step.density, m.get("gamma"), m.get("rescale"), inplace=inplace)


def check(m, where: str) -> None:
    """Refuse one model's resolved settings the prune cannot run (ValueError naming `where`)."""
    density, gamma = m.get("density"), m.get("gamma")
    if density < 1 and density + gamma > 1 + 1e-12:
        raise ValueError(f"`{where}`: breadcrumbs needs density + gamma <= 1 (the kept band plus the dropped "
                         f"outliers), got density {density:g} + gamma {gamma:g}; lower one of them")
