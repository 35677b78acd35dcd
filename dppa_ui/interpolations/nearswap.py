"""NearSwap (alchemonaut, QuartetAnemoi-70B model card), as mergekit 0.1.5's `nearswap`.

Per entry, with the base a and the other model b: w = clamp(t / max(|a - b|, 1e-6), 0, 1),
merged = w b + (1 - w) a. Entries where the models are within t of each other take b's value;
farther apart, the merge stays closer to the base (w = t / |a - b|). t > 0 (config/validate.py).
"""
from __future__ import annotations

import torch


def nearswap_weight(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    return (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    w = nearswap_weight(base, other, t)
    return w * other + (1 - w) * base
