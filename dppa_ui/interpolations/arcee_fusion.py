"""Arcee Fusion: mergekit 0.1.5's `arcee_fusion` (Arcee AI), a base plus only the salient part of
one other model's change.

importance = |theta - theta_base| * KL(p || q) per row, with p = softmax(theta) + 1e-8 and
q = softmax(theta_base) + 1e-8 over the last dimension (a 1-D tensor is one row), KL = sum p log(p/q).
threshold = median + 1.5 (q3 - q1) of the importances, each quantile the sorted value at index
int(q (n - 1)); merged = theta_base + (theta - theta_base) where importance >= threshold.
Quantiles here are exact; mergekit samples 1,000,000 entries (with replacement, unseeded) for
larger tensors, so there the two agree only approximately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods.select import order_statistics


def _row_kl(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, p = softmax(other) + 1e-8, q = softmax(base) + 1e-8 (in place, so no
    more than two tensor-sized temporaries)."""
    p = F.softmax(other, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    ratio = torch.div(p, q, out=q).log_()
    return p.mul_(ratio).sum(dim=-1, keepdim=True)


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return (other - base).abs_().mul_(_row_kl(base, other))


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 x the interquartile range, quantiles at floor(q (n - 1)) of the sorted values
    (a 0-d tensor in the importance's dtype)."""
    n = importance.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, med, q3 = order_statistics(importance, idx)
    return med + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    diff = other - base
    importance = diff.abs().mul_(_row_kl(base, other))
    keep = importance.ge_(fusion_threshold(importance)).to(diff.dtype)     # 1 / 0, over the importance
    return diff.mul_(keep).add_(base)
