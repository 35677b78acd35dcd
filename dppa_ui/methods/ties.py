"""TIES combine: elect sign, disjoint merge (Yadav et al. 2023, arXiv 2306.01708, Sec. 3 steps 2-3).

On the weighted deltas w_i * delta_i: the elected sign of each entry is the sign of their sum
(a sum >= 0 counts as +); an entry of model i agrees when its sign equals the elected one (a zero
entry never agrees); the merged entry is the sum of the agreeing entries, divided (normalize) by
the sum of the agreeing models' weights, or by 1 where that sum is 0. Same as mergekit's ties
consensus, defaults included (normalize is on for the ties preset).
"""
from __future__ import annotations

import torch

from .sum import weight_column


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """+1 / -1 per entry: the sign of the sum over models (>= 0 counts as +)."""
    # sign() gives -1/0/+1; adding 0.5 moves 0 (and -0.0) to +0.5, so a second sign() is +1 there.
    return weighted.sum(dim=0).sign_().add_(0.5).sign_()


def agreement_mask(weighted: torch.Tensor) -> torch.Tensor:
    """(n, ...) bool: entry i agrees with the elected sign (zeros never agree)."""
    return weighted.sign() == elect_sign(weighted)


def ties_combine(deltas: torch.Tensor, weights, normalize: bool = True, inplace: bool = False) -> torch.Tensor:
    """deltas: (n, ...) pruned task vectors; weights: n numbers. `inplace` may overwrite deltas.

    Computed without boolean masks: multiplying each weighted delta by the elected sign turns
    "agrees" into "is positive", so clamp(min=0) keeps exactly the agreeing magnitudes. The sum
    is the same float sum as summing the agreeing signed entries (negation is exact).
    """
    w = [float(x) for x in weights]
    wt = weight_column(deltas, w) if any(x != 1.0 for x in w) else None    # None: all ones, skip the products
    weighted = deltas if inplace else deltas.clone()
    if wt is not None:
        weighted.mul_(wt)
    sign = elect_sign(weighted)
    agreeing = weighted.mul_(sign).clamp_(min=0)          # |w_i delta_i| where it agrees, else 0
    merged = agreeing.sum(dim=0).mul_(sign)
    if normalize:
        agreeing.sign_()                                  # 1 where it agrees, else 0
        if wt is not None:
            agreeing.mul_(wt)
        divisor = agreeing.sum(dim=0)                     # sum of the agreeing models' weights
        if min(w) > 0:
            # Any non-empty sum is >= min(w); an empty one (0) has a 0 numerator, so lifting it to
            # min(w)/2 gives 0 exactly as dividing by 1 would, without a boolean pass.
            divisor.clamp_(min=min(w) / 2)
        else:
            divisor[divisor == 0] = 1.0
        merged /= divisor
    return merged


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `ties` combine of a config resolved for one tensor."""
    return ties_combine(deltas, [m.get("weight") for m in cfg.models], cfg.get("normalize"), inplace=inplace)


def conflicts(x: torch.Tensor) -> torch.Tensor:
    """Entries where some model's non-zero value disagrees with the elected sign."""
    return ((x != 0) & ~agreement_mask(x)).any(dim=0)


def contributions(pruned: torch.Tensor, cfg, stats=None):
    """What the inspect views draw of this combine, for a config resolved for one tensor:
    (each model's contribution to each merged entry, the sign conflicts, the deltas it keeps,
    None): the weighted deltas that agree with the elected sign."""
    weighted = pruned * weight_column(pruned, [m.get("weight") for m in cfg.models])
    return weighted * agreement_mask(weighted), conflicts(weighted), pruned, None
