"""Exact top-k selection without sorting the tensor.

Every magnitude-based step (TIES trim, DP pruning, DPA bands) needs "the k entries of largest
|delta|". mergekit argsorts the whole tensor: O(n log n) and several full-size copies. We only
need the k-th largest value: a selection, O(n). On the CPU that is numpy's introselect
(`np.partition`, zero-copy on a float32 tensor), which stays fast on the long runs of equal values
that bf16 deltas hold, where torch's CPU sort and kthvalue slow down by 10x or more; on a GPU it is
torch.kthvalue. Then one comparison pass builds the mask.

Tie rule (documented, consistent on every device): entries equal to the threshold are kept in
increasing flat-index order until exactly k entries are kept.
"""
from __future__ import annotations

import numpy as np
import torch

_CHUNK = 1 << 20           # tie scans walk the tensor in chunks of this many entries


def _threshold(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """(the k-th largest entry of a 1-D tensor, how many entries are >= it)."""
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if flat.device.type == "cpu":
        part = np.partition(flat.detach().float().numpy(), n - k)   # part[n-k:] are the k largest
        thr = part[n - k]
        n_ge = k + int(np.count_nonzero(part[: n - k] == thr))    # ties left of the cut
        return torch.tensor(thr).to(flat.dtype), n_ge
    thr = torch.kthvalue(flat, n - k + 1).values
    return thr, int(torch.count_nonzero(flat >= thr))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of `values` (1 <= k <= numel), as a 0-d tensor."""
    return _threshold(values.reshape(-1), k)[0]


def topk_mask(score: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of exactly k entries with the largest score, same shape as `score`.

    Boolean by default. With `out` (a float tensor of score's shape, which may be `score`
    itself) the mask is written there as 1.0 / 0.0: multiplying by a float mask is several
    times faster than by a boolean one, and writing over `score` needs no new memory.
    """
    n = score.numel()
    if out is None:
        out = torch.empty_like(score, dtype=torch.bool)
    if k >= n or k <= 0:
        return out.fill_(k >= n)
    flat = score.reshape(-1)
    thr, n_ge = _threshold(flat, k)
    # Ties at the threshold: the `extra` ones with the highest flat index are dropped. p is the
    # first dropped one: the mask is ">= thr" before p and "> thr" from p on. Found before `out`
    # (maybe `score` itself) is overwritten.
    p = _first_dropped_tie(flat, thr, n_ge - k) if n_ge > k else n
    mask = out.reshape(-1)
    torch.ge(flat[:p], thr, out=mask[:p])
    torch.gt(flat[p:], thr, out=mask[p:])
    return out


def _first_dropped_tie(flat: torch.Tensor, thr: torch.Tensor, extra: int) -> int:
    """Flat index of the `extra`-th tie (== thr) counted back from the end, scanning by chunks."""
    on_cpu = flat.device.type == "cpu"
    values, t = (flat.detach().float().numpy(), float(thr)) if on_cpu else (flat, thr)
    end = flat.numel()
    while True:
        start = max(end - _CHUNK, 0)
        eq = values[start:end] == t
        c = int(np.count_nonzero(eq)) if on_cpu else int(torch.count_nonzero(eq))
        if c >= extra:
            where = np.flatnonzero(eq) if on_cpu else eq.nonzero().squeeze(1)
            return start + int(where[c - extra])
        extra, end = extra - c, start


def order_statistics(values: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
    """The values at 0-based `positions` of `values` sorted ascending (one introselect for all of
    them on the CPU), as 0-d tensors in the values' dtype."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu":
        part = np.partition(flat.detach().float().numpy(), sorted(set(positions)))
        return [torch.tensor(part[p]).to(flat.dtype) for p in positions]
    return [torch.kthvalue(flat, p + 1).values for p in positions]


def row_kth_smallest(x: torch.Tensor, index: int) -> torch.Tensor:
    """Per row of a 2-D tensor, the value at 0-based `index` of the row sorted ascending, as an
    (n, 1) column (numpy's introselect on the CPU, torch.kthvalue elsewhere)."""
    if x.device.type == "cpu":
        rows = x.detach().float().numpy()
        vals = [np.partition(r, index)[index] for r in rows]
        return torch.tensor(vals, dtype=torch.float32).to(x.dtype).unsqueeze(1)
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def keep_count(density: float, numel: int) -> int:
    """Entries kept at `density`: int(density * n), the papers' rounding, but at least one entry of
    a non-empty tensor when density > 0 (mergekit 0.1.5's magnitude rule)."""
    if density <= 0 or numel <= 0:
        return 0
    return max(1, int(density * numel))
