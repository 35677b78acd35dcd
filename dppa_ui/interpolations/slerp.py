"""SLERP: spherical linear interpolation (Shoemake 1985) between the base (t = 0) and one other
model (t = 1), one tensor at a time, as mergekit 0.1.5's `slerp`.

Each tensor is flattened to one vector. With unit directions a = v0/|v0| and b = v1/|v1| (a norm
<= 1e-8 counts as 1) and dot = clamp(a.b, -1, 1), theta = acos(dot):

    merged = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

applied to the unnormalized tensors, so the norms interpolate along with the directions.
Fallback: where |dot| > 0.9995 (nearly colinear or antipodal) it is plain linear interpolation
(1 - t) v0 + t v1. t outside [0, 1] extrapolates (config/validate.py notes it). Float32 throughout.
"""
from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_dot(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """cos of the angle between the flattened tensors, clamped to [-1, 1] (0-d float32)."""
    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > EPS, na, torch.ones_like(na))
    nb = torch.where(nb > EPS, nb, torch.ones_like(nb))
    return ((a / na) * (b / nb)).sum().clamp(-1, 1)


def slerp_coefficients(t: float, dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(coefficient of v0, coefficient of v1, linear fallback?) for position t and cos angle `dot`:
    what a plot of a tensor's effective mix shows."""
    t = torch.tensor(t, dtype=torch.float32, device=dot.device)
    if bool(dot.abs() > DOT_THRESHOLD):
        return 1 - t, t, True
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return torch.sin((1 - t) * theta) / s, torch.sin(t * theta) / s, False


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The interpolated tensor (float32, v0's shape)."""
    if v0.numel() == 0:
        return v0.float().clone()
    c0, c1, _ = slerp_coefficients(t, slerp_dot(v0, v1))
    return v0.float() * c0 + v1.float() * c1
