"""Karcher mean: the weighted Riemannian (Fréchet) mean of the models' directions on the unit
sphere, scaled by their mean norm; mergekit 0.1.5's `karcher` (arXiv 2603.04972).

All inputs count equally (alpha_i = 1/n; a base_model is one more input, as in mergekit). Per
tensor: unit directions u_i = x_i / |x_i| (inputs with |x_i| <= tol are left out of the direction);
start from the normalized weighted mean of the u_i (or u_1 when that mean is < tol); then at most
`max_iter` times:
    tangent = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mean),  theta_i = acos(mean . u_i)
              (terms with theta_i < tol skipped; a_i renormalized over the kept inputs)
    stop when |tangent| < tol, else mean = cos|tangent| mean + sin|tangent| tangent / |tangent|,
    renormalized.
result = (sum_i alpha_i |x_i|) * mean. All inputs of norm <= tol give zeros.
"""
from __future__ import annotations

import math

import torch


def karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(torch.linalg.vector_norm(x)) for x in tensors]
    keep = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not keep:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in keep)
    a = [alphas[i] / a_sum for i in keep]
    units = [(tensors[i] / norms[i]).reshape(-1) for i in keep]
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean.add_(u, alpha=ai)
    mn = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mn < tol else mean.div_(mn)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        # The scalars (cos, angle, step) are Python floats: the full-size work is one dot product
        # and two fused multiply-adds per input.
        tangent.zero_()
        for ai, u in zip(a, units):
            dot = min(max(float(torch.dot(mean, u)), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            c = ai * theta / math.sin(theta)
            tangent.add_(u, alpha=c).add_(mean, alpha=-c * dot)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean.div_(un)
    scale = sum(ai * nrm for ai, nrm in zip(alphas, norms))
    return mean.mul_(scale).view(tensors[0].shape)
