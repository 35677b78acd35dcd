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

The tangent sum s = sum w_i (u_i - (u_i . m) m) has only one direction, m (its component along m
is |sum w_i u_i| - sum w_i (u_i . m) = 0 up to rounding, and it has no other), so the result is m
times a scalar: we compute that scalar from dot products instead of building the tangent
vectors (mergekit builds them; the two agree to float32 rounding).
"""
from __future__ import annotations

import torch


def multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8, name: str = "") -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    xs = [t - base for t in tensors] if base is not None else list(tensors)
    w = torch.tensor(weights, dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    w = w.tolist()
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    mean = torch.zeros_like(xs[0])
    for x, wi, n in zip(xs, w, norms):
        mean.add_(x, alpha=wi / (n + eps))                  # sum w_i u_i, u_i = x_i / (|x_i| + eps)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError(f"multislerp: the weighted mean direction of tensor {name} is zero (antipodal "
                             f"models with balancing weights); change the weights")
        out = xs[0] * w[0] + xs[1] * w[1]
        return out + base if base is not None else out
    mean.div_(mean_norm)                                    # m
    along = sum(wi * float(torch.dot(x.reshape(-1), mean.reshape(-1))) / (n + eps)
                for x, wi, n in zip(xs, w, norms))          # sum w_i (u_i . m)
    s_len = mean_norm - along                               # s = s_len * m (0 up to rounding)
    t_norm = abs(s_len) + eps
    scale = (torch.cos(torch.tensor(t_norm)).item() + s_len * torch.sin(torch.tensor(t_norm)).item() / t_norm)
    out = mean.mul_(scale * sum(n * wi for n, wi in zip(norms, w)))
    return out + base if base is not None else out
