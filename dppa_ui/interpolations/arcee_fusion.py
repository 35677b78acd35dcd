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

from ..methods.select import kth_largest


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 x the interquartile range, quantiles at floor(q (n - 1)) of the sorted values
    (a 0-d tensor in the importance's dtype)."""
    flat = importance.reshape(-1)
    n = flat.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, med, q3 = (kth_largest(flat, n - i) for i in idx)
    return med + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    importance = fusion_importance(base, other)
    mask = importance >= fusion_threshold(importance)
    return base + (other - base) * mask
