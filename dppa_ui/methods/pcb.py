"""PCB combine: Parameter Competition Balancing (Du et al. 2024, arXiv 2410.02396, Sec. 3), with
the official code's exact steps.

On the n x d matrix of the n task vectors (each flattened):
  clip:   |delta| clipped per row to its sorted values at index int(d*0.0001) and int(d*0.9999)-1
  intra:  exp(n * minmax_row(|delta|_clipped)^2)       (how much an entry stands out in its task)
  inter:  tanh(delta * sum_j delta_j)                 (how much it agrees with the other tasks)
  score = intra * inter; each row clipped below at its sorted value at index int(d*(1-ratio))
  scale = minmax_row(score clipped)                   (the low (1-ratio) of each row become 0)
  merged = sum_i w_i sign(delta_i)|delta_i|_clipped scale_i / max(sum_i scale_i, 1e-12)
`ratio` (pcb_ratio) is the fraction kept. Weights w_i are the paper's per-task lambda_i: they
multiply the clipped deltas in the numerator only; the scores use the unweighted deltas.
A min-max over a zero range gives zeros, never NaN.
"""
from __future__ import annotations

import torch

from .select import row_kth_smallest
from .sum import _weights

CLIP_RATIO = 0.0001


def minmax_rows(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Min-max scale each row to [0, 1]; rows with zero range become 0 (never NaN)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    flat_rows = span <= 0
    y = (x if inplace else x.clone()).sub_(lo).div_(span.masked_fill(flat_rows, 1.0))
    return y.mul_(~flat_rows) if bool(flat_rows.any()) else y


def clip_abs(flat: torch.Tensor) -> torch.Tensor:
    """|delta| clipped per row to its [int(d*1e-4), int(d*(1-1e-4))-1] order statistics."""
    d = flat.shape[1]
    a = flat.abs()
    lo = row_kth_smallest(a, int(d * CLIP_RATIO))
    hi = row_kth_smallest(a, int(d * (1 - CLIP_RATIO) - 1))
    return a.clamp_(lo, hi)


def pcb_scale(flat: torch.Tensor, ratio: float = 0.1, clipped_abs: torch.Tensor | None = None) -> torch.Tensor:
    """The (n, d) balancing weights in [0, 1] of n flattened task vectors."""
    n, d = flat.shape
    a = clip_abs(flat) if clipped_abs is None else clipped_abs
    score = minmax_rows(a).square_().mul_(n).exp_()                        # intra-balancing
    score.mul_(torch.mul(flat, flat.sum(dim=0, keepdim=True)).tanh_())      # x inter-balancing
    floor = row_kth_smallest(score, min(int(d * (1 - ratio)), d - 1))
    return minmax_rows(score.clamp_(min=floor), inplace=True)


def pcb_combine(deltas: torch.Tensor, weights, ratio: float = 0.1) -> torch.Tensor:
    """deltas: (n, ...) task vectors; weights: n per-task lambdas. Returns the merged delta."""
    shape = deltas.shape[1:]
    flat = deltas.reshape(deltas.shape[0], -1)
    a = clip_abs(flat)
    scale = pcb_scale(flat, ratio, clipped_abs=a)
    num = a.mul_(torch.sign(flat)).mul_(scale)                # sign(delta) |delta|_clipped scale
    if any(float(w) != 1.0 for w in weights):
        num.mul_(_weights(flat, weights))
    den = scale.sum(dim=0).clamp_(min=1e-12)
    del scale
    return num.sum(dim=0).div_(den).view(shape)
