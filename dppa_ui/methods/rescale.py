"""Rescaling after a drop: mergekit's `rescale` (0.1.5, sparsify.rescaled_masked_tensor, L1 norm).

`rescale: true` (here "l1"): the kept entries are multiplied by ||delta||_1 / ||kept||_1, so the
pruned delta has the original's L1 norm. Nothing is rescaled when either norm is below 1e-7
(mergekit's guard against dividing by ~0). The papers' own rescalings (DARE's 1/density,
DELLA's 1/p per entry) live in dare.py and della.py as `rescale: paper`.
"""
from __future__ import annotations

import torch

RESCALE_MODES = ("l1", "none", "paper")
L1_EPS = 1e-7


def rescale_to_l1(pruned: torch.Tensor, l1_before: torch.Tensor | float) -> torch.Tensor:
    """Scale `pruned` in place so its L1 norm is `l1_before` (skipped below L1_EPS)."""
    after = pruned.abs().sum()
    if float(l1_before) >= L1_EPS and float(after) >= L1_EPS:
        pruned.mul_(l1_before / after)
    return pruned
