"""Sum combine: task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

merged delta = sum_i w_i * delta_i, optionally divided by sum_i w_i (normalize). Weights may be
negative (task negation). Matches mergekit's task_arithmetic, including its guard: a weight sum
whose magnitude is below 1e-8 is not divided by.
"""
from __future__ import annotations

import torch


def weight_column(deltas: torch.Tensor, weights) -> torch.Tensor:
    """The n weights shaped to broadcast over (n, ...) stacked deltas."""
    w = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
    return w.view(-1, *([1] * (deltas.dim() - 1)))


def sum_combine(deltas: torch.Tensor, weights, normalize: bool = False, inplace: bool = False) -> torch.Tensor:
    """deltas: (n, ...) stacked task vectors; weights: n numbers. `inplace` may overwrite deltas."""
    w = weight_column(deltas, weights)
    if bool((w == 1).all()):
        merged = deltas.sum(dim=0)
    else:
        merged = (deltas.mul_(w) if inplace else deltas * w).sum(dim=0)
    if normalize:
        total = float(w.sum())
        if abs(total) >= 1e-8:
            merged /= total
    return merged


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `sum` combine of a config resolved for one tensor."""
    return sum_combine(deltas, [m.get("weight") for m in cfg.models], cfg.get("normalize"), inplace=inplace)
