"""Linear: the weighted average of the models' weights, "model soups" (Wortsman et al. 2022,
arXiv 2203.05482), as mergekit 0.1.5's `linear`.

merged = sum_i w_i theta_i, divided by sum_i w_i when `normalize` (mergekit's default: true).
The products are accumulated in the models' order with one fused multiply-add each, in float32
(mergekit: float64 for float64 inputs). config/validate.py refuses normalize with constant weights summing
to 0; a varying weight that sums to 0 on some tensor gives inf/nan there, as in mergekit.
"""
from __future__ import annotations

import torch


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    w = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    out = torch.zeros_like(tensors[0])
    for x, wi in zip(tensors, w):
        out.addcmul_(x, wi)
    return out.div_(w.sum()) if normalize else out
