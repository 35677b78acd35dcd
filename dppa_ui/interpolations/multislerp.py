"""Multi-SLERP: barycentric interpolation of several models on the hypersphere, mergekit 0.1.5's
`multislerp` (Goddard, "multislerp", goddard.blog).

With a base model the deltas from it are interpolated (and the base added back); without one, the
weights. Per tensor, each flattened vector x_i is projected to the unit sphere (u_i = x_i /
(|x_i| + eps)); weights are normalized to sum 1 (`normalize_weights`, default true);
  mean m = sum w_i u_i / |sum w_i u_i|;
  tangent vectors u_i - (u_i . m) m, their weighted sum s;
  result = (m cos|s| + s sin|s| / |s|) * sum_i w_i |x_i|       (|s| includes + eps)
If the weighted mean of the directions vanishes (|sum w_i u_i| < eps: antipodal inputs), two
models fall back to the weighted sum w_1 x_1 + w_2 x_2 and more models are refused. One model is
returned as it is.
"""
from __future__ import annotations

import torch


def multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8, name: str = "") -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError(f"multislerp: the weighted mean direction of tensor {name} is zero (antipodal "
                             f"models with balancing weights); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    s = (tangents * w.view(-1, 1)).sum(0)
    s_norm = torch.norm(s) + eps
    out = (mean * torch.cos(s_norm) + s * (torch.sin(s_norm) / s_norm)) * (norms.squeeze(-1) * w).sum()
    out = out.view(x.shape[1:])
    return out + base if base is not None else out
