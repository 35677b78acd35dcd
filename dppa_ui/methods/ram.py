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
    """(n, ...) float 1/0 where a model contributes, and (...) the number of contributors (float:
    float masks multiply far faster than boolean or integer ones on the CPU)."""
    contrib = (deltas.abs() > epsilon).to(deltas.dtype)
    return contrib, contrib.sum(dim=0)


def ram_combine(deltas: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """deltas: (n, ...). Unique contributions summed, shared ones averaged (see module doc)."""
    contrib, count = _contributions(deltas, epsilon)
    total = contrib.mul_(deltas).sum(dim=0)
    return total.div_(count.clamp_(min=1))                  # count 1: unchanged; 0: total is 0


def ramplus_gains(deltas: torch.Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """(n,) factors lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha)."""
    contrib, count = _contributions(deltas, epsilon)
    return _gains(contrib, count, r, alpha, epsilon)


def _gains(contrib, count, r, alpha, epsilon):
    unique = count == 1
    out = []
    for c in contrib:
        mine = c.bool()
        uniq = int(torch.count_nonzero(mine & unique))
        shared = int(torch.count_nonzero(mine)) - uniq
        rho = shared / max(uniq, epsilon)
        out.append(1 + r * min(max(rho, 0.0), alpha))
    return torch.tensor(out, dtype=torch.float32)


def ramplus_tl_combine(deltas: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
                       epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with each model's unique entries scaled by its `ramplus_gains` factor."""
    contrib, count = _contributions(deltas, epsilon)
    gains = _gains(contrib, count, r, alpha, epsilon).tolist()
    unique_f = (count == 1).to(deltas.dtype)
    shared_scale = count.clamp(min=1).reciprocal_().mul_(1 - unique_f)   # 1/c on shared entries, else 0
    out = torch.zeros_like(count)
    for d, c, g in zip(deltas, contrib, gains):
        out.add_(c.mul_(d).mul_(unique_f * g + shared_scale))
    return out


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `ram` combine of a config resolved for one tensor."""
    return ram_combine(deltas, cfg.get("ram_epsilon"))


def combine_plus(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `ramplus_tl` combine of a config resolved for one tensor."""
    return ramplus_tl_combine(deltas, cfg.get("r"), cfg.get("overlap_cap"), cfg.get("ram_epsilon"))
