"""TIES combine: elect sign, disjoint merge (Yadav et al. 2023, arXiv 2306.01708, Sec. 3 steps 2-3).

On the weighted deltas w_i * delta_i: the elected sign of each entry is the sign of their sum
(a sum >= 0 counts as +); an entry of model i agrees when its sign equals the elected one (a zero
entry never agrees); the merged entry is the sum of the agreeing entries, divided (normalize) by
the sum of the agreeing models' weights, or by 1 where that sum is 0. Same as mergekit's ties
consensus, defaults included (normalize is on for the ties preset).
"""
from __future__ import annotations

import torch

from .sum import _weights


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """+1 / -1 per entry: the sign of the sum over models (>= 0 counts as +)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor) -> torch.Tensor:
    """(n, ...) bool: entry i agrees with the elected sign (zeros never agree)."""
    return weighted.sign() == elect_sign(weighted)


def ties_combine(deltas: torch.Tensor, weights, normalize: bool = True, inplace: bool = False) -> torch.Tensor:
    """deltas: (n, ...) pruned task vectors; weights: n numbers. `inplace` may overwrite deltas.

    Computed without boolean masks: multiplying each weighted delta by the elected sign turns
    "agrees" into "is positive", so clamp(min=0) keeps exactly the agreeing magnitudes. The sum
    is the same float sum as summing the agreeing signed entries (negation is exact).
    """
    w = _weights(deltas, weights)
    weighted = deltas if inplace else deltas.clone()
    if not bool((w == 1).all()):
        weighted.mul_(w)
    sign = elect_sign(weighted)
    agreeing = weighted.mul_(sign).clamp_(min=0)          # |w_i delta_i| where it agrees, else 0
    merged = agreeing.sum(dim=0).mul_(sign)
    if normalize:
        agreeing.sign_()                                  # 1 where it agrees, else 0
        divisor = (agreeing * w).sum(dim=0)
        divisor[divisor == 0] = 1.0
        merged /= divisor
    return merged
