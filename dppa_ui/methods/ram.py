"""RAM combine: Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5 computes it
(merge_methods/ram.py), and its tensor-local RAM+ variant (`ramplus_tl`).

An entry of model i "contributes" where |delta_i| > epsilon; c = the number of models
contributing to that entry.
  ram:         merged = sum of the contributing deltas where c = 1 (unique entries keep their full
               value), their mean where c > 1 (shared entries are averaged over the contributors).
  ramplus_tl:  per model, rho_i = (its contributing entries that are shared) / max(its unique
               ones, epsilon) over this tensor; its unique entries are scaled by
               lambda_i = 1 + r * clamp(rho_i, 0, alpha).
No per-model weights and no lambda (mergekit's RAM has neither).
"""
from __future__ import annotations

import torch


def _contributions(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    contrib = deltas.abs() > epsilon                        # (n, ...) bool
    count = contrib.sum(dim=0)                              # models contributing to each entry
    return contrib, count


def ram_combine(deltas: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """deltas: (n, ...). Unique contributions summed, shared ones averaged (see module doc)."""
    contrib, count = _contributions(deltas, epsilon)
    total = (deltas * contrib).sum(dim=0)
    return total.div_(count.clamp(min=1))                   # count 1: unchanged; 0: total is 0


def ramplus_gains(deltas: torch.Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """(n,) factors lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha)."""
    contrib, count = _contributions(deltas, epsilon)
    n = deltas.shape[0]
    flat_c, flat_n = contrib.reshape(n, -1), count.reshape(1, -1)
    shared = (flat_c & (flat_n > 1)).sum(dim=1).float()
    unique = (flat_c & (flat_n == 1)).sum(dim=1).float()
    rho = shared / unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def ramplus_tl_combine(deltas: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
                       epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with each model's unique entries scaled by its `ramplus_gains` factor."""
    contrib, count = _contributions(deltas, epsilon)
    gains = ramplus_gains(deltas, r, alpha, epsilon).to(deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    unique = (count == 1)
    factor = torch.where(unique, gains, 1.0 / count.clamp(min=1).to(deltas.dtype))
    return (deltas * contrib * factor).sum(dim=0)
