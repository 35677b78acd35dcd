"""DELLA prune: MagPrune from DELLA-Merging (Deep et al. 2024, arXiv 2406.11617, Sec. 3.1), as
mergekit 0.1.5 computes it (sparsify.della_magprune).

Within each row (a 1-D tensor is one row; dim 1 of larger tensors), entries are ranked by |delta|
ascending, r = 0 .. c - 1 (ties: lower index first), and kept with probability

    p = (density - epsilon) + 2 epsilon r / (c - 1)            (p = density - epsilon when c = 1)

so small entries are dropped more often and the expected density is `density`. Needs
density -/+ epsilon inside (0, 1) (`check` below refuses otherwise); density >= 1 keeps everything.
Rescale: "l1" (mergekit's default, `rescale: true`) restores the L1 norm of the delta; "paper"
divides each kept entry by its own p (the paper's Eq. 3); "none" keeps the values.
Draws come from the per-(seed, model, tensor) generator, as for DARE.
"""
from __future__ import annotations

import torch

from .dare import tensor_generator
from .rescale import rescale_to_l1


def della_probabilities(abs_delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of every entry (same shape): linear in its |delta| rank within its row."""
    x = abs_delta.unsqueeze(0) if abs_delta.dim() < 2 else abs_delta
    cols = x.shape[1]
    # Non-negative float32 values sort like their bit patterns read as int32, and torch sorts
    # integers faster than floats.
    keys = x.view(torch.int32) if x.dtype == torch.float32 else x
    order = torch.argsort(keys, dim=1, stable=True)
    step = torch.arange(cols, device=x.device, dtype=torch.float32)
    if cols > 1:
        step.mul_(2 * epsilon / (cols - 1))
    else:
        step.zero_()
    shape = [1] * x.dim()
    shape[1] = cols
    p = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    p.scatter_(1, order, step.view(shape).expand(x.shape))
    return p.add_(density - epsilon).view(abs_delta.shape)


def della_curve(cols: int, density: float, epsilon: float) -> list[float]:
    """Keep probability against |delta| rank (0 = smallest) in a row of `cols` entries (for plots)."""
    if cols <= 1:
        return [density - epsilon] * cols
    return [density - epsilon + 2 * epsilon * r / (cols - 1) for r in range(cols)]


def della_prune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                rescale: str = "l1", inplace: bool = False) -> torch.Tensor:
    """Drop entries with probability 1 - p (see module doc), then rescale."""
    if density >= 1.0:
        return delta
    before = delta.abs().sum() if rescale == "l1" else None
    p = della_probabilities(delta.abs(), density, epsilon)
    draws = torch.rand(delta.shape, generator=generator, device=delta.device)
    keep = draws.lt_(p).to(delta.dtype)
    if rescale == "paper":
        keep.div_(p)             # kept entries x 1/p, dropped ones stay 0
    out = delta.mul_(keep) if inplace else delta * keep
    return rescale_to_l1(out, before) if rescale == "l1" else out


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `della` prune of fine-tune i's delta of tensor `name`."""
    m = cfg.models[i]
    gen = tensor_generator(cfg.seed, i, name, delta.device)
    return della_prune(delta, step.density, m.get("della_epsilon"), gen, m.get("rescale"), inplace=inplace)


def check(m, where: str) -> None:
    """Refuse one model's resolved settings the prune cannot run (ValueError naming `where`)."""
    density, epsilon = m.get("density"), m.get("della_epsilon")
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"`{where}`: della needs density - epsilon > 0 and density + epsilon < 1 (keep "
                         f"probabilities), got density {density:g}, epsilon {epsilon:g}; lower epsilon")
