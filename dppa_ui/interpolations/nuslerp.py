"""NuSLERP: mergekit 0.1.5's `nuslerp` (merge_methods/nuslerp.py), a SLERP of two models whose
position comes from their weights, over the whole tensor, its rows or its columns.

t = w_2 / (w_1 + w_2) (0.5 when the weights sum to less than 1e-6 in magnitude). With a base
model the two deltas from it are interpolated and added back (task-vector SLERP); without one,
the weights themselves. Vectors: the flattened tensor (`nuslerp_flatten: true`, the default), else
each row (the last dimension), or each column with `nuslerp_row_wise: true` (mergekit's naming).
Per vector, with unit directions (norms clamped below at 1e-7) and cos = clamp(a.b, -1, 1)
(for the flattened tensor computed as v0.v1 / (|v0| |v1|): the same up to float rounding):

    merged = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta),   theta = acos(cos)

and plain (1 - t) v0 + t v1 where the vectors are colinear (1 - cos^2 <= 1e-16).
"""
from __future__ import annotations

import torch


def nuslerp_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def _nuslerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float) -> torch.Tensor:
    """The flattened case: one angle, so the mix is two scalar coefficients (no vector-sized
    temporaries for the unit vectors)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    cos = (torch.dot(a, b) / (torch.norm(a).clamp(min=1e-7) * torch.norm(b).clamp(min=1e-7))).clamp(-1, 1)
    if bool((1 - cos.square()) <= eps ** 2):
        c0, c1 = 1 - t, t
    else:
        theta = torch.acos(cos)
        c0, c1 = float(torch.sin((1 - t) * theta) / torch.sin(theta)), float(torch.sin(t * theta) / torch.sin(theta))
    return torch.add(v0 * c0, v1, alpha=c1)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    if flatten:
        return _nuslerp_flat(t, v0, v1, eps)
    shape = v0.shape
    if row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_merge(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                  row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    t = nuslerp_t(weights)
    if base is None:
        return nuslerp(t, tensors[0], tensors[1], row_wise, flatten)
    return base + nuslerp(t, tensors[0] - base, tensors[1] - base, row_wise, flatten)
