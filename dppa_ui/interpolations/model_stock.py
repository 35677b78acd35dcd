"""Model Stock (Jang et al. 2024, arXiv 2403.19522, Eq. 2-4), as mergekit 0.1.5's `model_stock`.

With the base w_0 and N >= 2 fine-tunes w_i, the offsets d_i = w_i - w_0 and the mean cosine of
the angle between every pair of offsets, cos = mean_{i<j} d_i.d_j / max(|d_i||d_j|, 1e-6)
(clamped to [-1, 1]):

    t = N cos / (1 + (N - 1) cos),     merged = t * mean_i(w_i) + (1 - t) * w_0
                                                 (= w_0 + t mean_i(w_i - w_0), computed so)

with t = 0 (keep the base) where |1 + (N - 1) cos| < 1e-6. `filter_wise: true` computes cos and
t per row (the last dimension is the vector; a 1-D tensor is one row) instead of per tensor.
"""
from __future__ import annotations

import torch


def model_stock_cosine(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Mean pairwise cosine between the offsets: 0-d, or one per row with filter_wise."""
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            den = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cos.append(((a * b).sum(dim=-1) / den).clamp(-1, 1))
    return torch.stack(cos).mean(dim=0)


def model_stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos); 0 where the denominator is within 1e-6 of 0."""
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


def _cosine_flat(offsets: list[torch.Tensor]) -> torch.Tensor:
    """model_stock_cosine over whole tensors, from dot products (no product temporaries)."""
    flat = [o.reshape(-1) for o in offsets]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    cos = [(torch.dot(a, b) / (norms[i] * norms[i + 1 + j]).clamp(min=1e-6)).clamp(-1, 1)
           for i, a in enumerate(flat) for j, b in enumerate(flat[i + 1:])]
    return torch.stack(cos).mean(dim=0)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    if not filter_wise:          # one ratio: base + t * mean offset, from the offsets alone
        offsets = [x - base for x in tensors]
        t = float(model_stock_ratio(_cosine_flat(offsets), len(tensors)))
        mean = offsets[0]
        for o in offsets[1:]:
            mean.add_(o)
        return mean.mul_(t / len(tensors)).add_(base)
    t = model_stock_ratio(model_stock_cosine(base, tensors, True), len(tensors)).unsqueeze(-1)
    w0 = base.unsqueeze(0) if base.dim() == 1 else base
    avg = sum(x.unsqueeze(0) if x.dim() == 1 else x for x in tensors) / len(tensors)
    return (t * avg + (1 - t) * w0).reshape(base.shape)
