"""PCB combine: Parameter Competition Balancing (Du et al. 2024, arXiv 2410.02396, Sec. 3), with
the official code's exact steps.

On the n x d matrix of the n task vectors (each flattened):
  clip:   |delta| clipped per row to its sorted values at index int(d*c) and int(d*(1-c))-1, where
          c = clip_ratio: 0.0001 in pcb-merging.py (the default), 0.01 in the experiment scripts
          (vision_source_code/pcb.py, pcb_ES.py); 0 clips nothing
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


def clip_abs(flat: torch.Tensor, clip_ratio: float = CLIP_RATIO) -> torch.Tensor:
    """|delta| clipped per row to its [int(d*c), int(d*(1-c))-1] order statistics (c = clip_ratio)."""
    d = flat.shape[1]
    a = flat.abs()
    if clip_ratio <= 0:          # the indices are the row's min and max: nothing to clip
        return a
    lo = row_kth_smallest(a, int(d * clip_ratio))
    hi = row_kth_smallest(a, max(int(d * (1 - clip_ratio) - 1), 0))
    return a.clamp_(lo, hi)


def pcb_score(flat: torch.Tensor, clipped_abs: torch.Tensor) -> torch.Tensor:
    """The (n, d) balancing scores: intra-balancing x inter-balancing (a new tensor)."""
    n = flat.shape[0]
    score = minmax_rows(clipped_abs).square_().mul_(n).exp_()              # intra-balancing
    return score.mul_(torch.mul(flat, flat.sum(dim=0, keepdim=True)).tanh_())   # x inter-balancing


def pcb_cut(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Each row's score at the cut: its sorted value at index int(d*(1-ratio)); only the entries
    above it keep a weight."""
    d = score.shape[1]
    return row_kth_smallest(score, min(int(d * (1 - ratio)), d - 1))


def pcb_scale(flat: torch.Tensor, ratio: float = 0.1, clipped_abs: torch.Tensor | None = None,
              clip_ratio: float = CLIP_RATIO) -> torch.Tensor:
    """The (n, d) balancing weights in [0, 1] of n flattened task vectors."""
    a = clip_abs(flat, clip_ratio) if clipped_abs is None else clipped_abs
    score = pcb_score(flat, a)
    return minmax_rows(score.clamp_(min=pcb_cut(score, ratio)), inplace=True)


def pcb_combine(deltas: torch.Tensor, weights, ratio: float = 0.1, clip_ratio: float = CLIP_RATIO) -> torch.Tensor:
    """deltas: (n, ...) task vectors; weights: n per-task lambdas. Returns the merged delta."""
    shape = deltas.shape[1:]
    flat = deltas.reshape(deltas.shape[0], -1)
    a = clip_abs(flat, clip_ratio)
    scale = pcb_scale(flat, ratio, clipped_abs=a)
    num = a.mul_(torch.sign(flat)).mul_(scale)                # sign(delta) |delta|_clipped scale
    if any(float(w) != 1.0 for w in weights):
        num.mul_(_weights(flat, weights))
    den = scale.sum(dim=0).clamp_(min=1e-12)
    del scale
    return num.sum(dim=0).div_(den).view(shape)
