"""SCE combine: Select, Calculate, Erase from FuseChat-2.0 (Wan et al. 2024, arXiv 2408.07990,
Sec. 3.3), as mergekit 0.1.5 computes it (merge_methods/sce.py).

On the n stacked task vectors of one tensor:
  select:    with select_topk < 1, keep only the int(k * m) entries whose variance across the n
             models (population variance) is largest, where m counts the entries of non-zero
             variance; the same entries for every model (select_topk <= 0 keeps none).
  calculate: model weights w_i = mean(delta_i^2) / sum_j mean(delta_j^2) over the selected
             deltas (1/n each when that sum is below 1e-6).
  erase:     elect a sign per entry from the sum of the deltas (>= 0 is +); an entry of a model
             counts only where its sign agrees (zeros never do).
  merged = sum_i w_i agree_i delta_i / max(sum_i w_i agree_i, 1e-6).
SCE has no per-model weights (mergekit's `weight` is not a parameter of sce) and no lambda.
Ties at the variance threshold follow `select.topk_mask` (lowest index first).
"""
from __future__ import annotations

import torch

from .select import topk_mask
from .ties import elect_sign


def sce_select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Float 1/0 mask (one tensor's shape) of the entries that vary most across the models."""
    shape = deltas.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.float32, device=deltas.device)
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.float32, device=deltas.device)
    # population variance over the models, one model at a time (torch.var over a short first
    # dimension is many times slower on the CPU)
    mean = deltas.mean(dim=0)
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    var.div_(deltas.shape[0])
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return topk_mask(var, k, out=var) if k > 0 else var.zero_()


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """(n,) model weights: each delta's mean square over their sum (1/n when the sum is < 1e-6)."""
    ms = deltas.reshape(deltas.shape[0], -1).square().mean(dim=1)
    total = float(ms.sum())
    if abs(total) < 1e-6:
        return torch.full_like(ms, 1.0 / ms.numel())
    return ms / total


def sce_combine(deltas: torch.Tensor, select_topk: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """deltas: (n, ...) task vectors. Returns the merged delta (see module doc)."""
    d = deltas if inplace else deltas.clone()
    if select_topk < 1:
        d.mul_(sce_select_mask(d, select_topk))
    w = sce_weights(d).view(-1, *([1] * (d.dim() - 1)))
    sign = elect_sign(d)
    agree = (d * sign).gt_(0).to(d.dtype).mul_(w)          # w_i where model i agrees, else 0
    den = agree.sum(dim=0).clamp_(min=1e-6)
    return d.mul_(agree).sum(dim=0).div_(den)


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `sce` combine of a config resolved for one tensor."""
    return sce_combine(deltas, cfg.get("select_topk"), inplace=inplace)


def contributions(pruned: torch.Tensor, cfg, stats=None):
    """Select (a shared mask), calculate (a weight per model), erase (minority signs): (each
    model's contribution to each merged entry, the sign conflicts, the selected deltas, None)."""
    topk = cfg.get("select_topk")
    if topk < 1:
        pruned = pruned * sce_select_mask(pruned, topk)
    agree = pruned.sign() == elect_sign(pruned)
    conflict = ((pruned != 0) & ~agree).any(dim=0)
    return pruned * agree * sce_weights(pruned).view(-1, *([1] * (pruned.dim() - 1))), conflict, pruned, None
