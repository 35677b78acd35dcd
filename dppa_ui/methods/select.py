"""Exact top-k selection without sorting.

Every magnitude-based step (TIES trim, DP pruning, DPA bands) needs "the k entries of largest
|delta|". mergekit argsorts the whole tensor (O(n log n), several full copies). We only need the
k-th largest value, and a small sample brackets it tightly: one pass compacts the entries on the
small side of the bracket, and an exact kthvalue over the few entries inside the bracket
finishes. The answer is exact; the sample only decides how much work the exact step gets.

Tie rule (documented, consistent on every device): entries equal to the threshold are kept in
increasing flat-index order until exactly k entries are kept.
"""
from __future__ import annotations

import math

import torch

_SAMPLE = 1 << 15          # sample size used to bracket the threshold
_SMALL = 1 << 17           # below this, a plain kthvalue is cheaper than bracketing
_CHUNK = 1 << 20           # tie scans walk the tensor in chunks of this many entries


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _kthvalue(flat: torch.Tensor, k: int) -> torch.Tensor:
    if flat.dtype in (torch.float16, torch.bfloat16) and flat.device.type == "cpu":
        return torch.kthvalue(flat.float(), k).values.to(flat.dtype)
    return torch.kthvalue(flat, k).values


def _threshold(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """(the k-th largest entry, how many entries are >= it)."""
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n > _SMALL:
        # Bracket the target quantile with a fixed-seed sample (deterministic).
        gen = torch.Generator(device=flat.device).manual_seed(n)
        idx = torch.randint(0, n, (_SAMPLE,), generator=gen, device=flat.device)
        sample = flat[idx].float().sort().values
        q = 1.0 - k / n                       # fraction of entries below the threshold
        eps = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / _SAMPLE) / _SAMPLE) + 2.0 / _SAMPLE
        lo = sample[max(int((q - eps) * _SAMPLE), 0)].to(flat.dtype)
        hi = sample[min(int(math.ceil((q + eps) * _SAMPLE)), _SAMPLE - 1)].to(flat.dtype)
        if k <= n // 2:
            top = flat[flat > lo]             # the k largest, if the bracket holds, plus a few
            if top.numel() >= k:
                above = _count(top > hi)
                if above < k:
                    inner = top[top <= hi]
                    thr = _kthvalue(inner, inner.numel() - (k - above) + 1)
                    return thr, above + _count(inner >= thr)
        else:
            j = n - k + 1                     # the same entry, ranked from the bottom
            bottom = flat[flat <= hi]
            if bottom.numel() >= j:
                below = _count(bottom <= lo)
                if below < j:
                    inner = bottom[bottom > lo]
                    thr = _kthvalue(inner, j - below)
                    return thr, n - below - _count(inner < thr)
    thr = _kthvalue(flat, n - k + 1)          # small tensor, or the bracket missed (rare)
    return thr, _count(flat >= thr)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of `values` (1 <= k <= numel), as a 0-d tensor."""
    return _threshold(values.reshape(-1), k)[0]


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape as `score`) of exactly k entries with the largest score."""
    n = score.numel()
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.reshape(-1)
    thr, n_ge = _threshold(flat, k)
    mask = flat >= thr
    extra = n_ge - k
    # Ties at the threshold: drop the `extra` ones with the highest flat index, walking back
    # from the end in chunks so a few ties never cost a pass over the whole tensor.
    end = n
    while extra > 0:
        start = max(end - _CHUNK, 0)
        ties = (flat[start:end] == thr).nonzero().squeeze(1) + start
        drop = ties[max(ties.numel() - extra, 0):]
        mask[drop] = False
        extra -= drop.numel()
        end = start
    return mask.view(score.shape)


def keep_count(density: float, numel: int) -> int:
    """Entries kept at `density`: int(density * n), the papers' and mergekit's rounding."""
    return int(density * numel)
