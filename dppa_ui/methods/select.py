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


# ------------------------------------------------------------------ order statistics in passes
#
# PCB at `scope: model` needs order statistics of rows that span a whole model (each fine-tune's
# task vector flattened), which never sits in memory at once. A radix selection finds them exactly
# from two passes over the model's tensors. Pass 1 histograms each row's entries by the high 16
# bits of their float32 bit pattern; those bins order as the floats do once the negative floats'
# bins are read backwards (a larger magnitude has larger bits), so the cumulative counts in that
# order give, for each wanted position, the bin that holds it and its rank inside. Pass 2
# histograms the low 16 bits of the entries in those bins only (again backwards for a negative
# bin); the rank then names one bit pattern, hence one float32 exactly. Memory: two 65536-bin
# histograms per row and wanted position, whatever the model's size. -0.0 sorts just below +0.0;
# the two compare equal, so this is one valid ascending sort and its k-th entry equals the k-th of
# any other (NaN is not expected in a delta and is not handled).

_DIGITS = 1 << 16
_HALF = 1 << 15


def _high_bins(x: torch.Tensor, absolute: bool, out: torch.Tensor) -> torch.Tensor:
    """Each float32's bin: its high 16 bits as an int32 in [0, 65536) (`absolute`: of |x|, in
    [0, 32768)), written to `out`."""
    torch.bitwise_right_shift(x.view(torch.int32), 16, out=out)       # arithmetic: [-32768, 32767]
    return out.bitwise_and_(_HALF - 1) if absolute else out.add_(_HALF)


def _bin_order(absolute: bool) -> np.ndarray:
    """The bins in ascending order of their floats: the negative floats' bins (below _HALF)
    backwards, then the others."""
    if absolute:
        return np.arange(_DIGITS)
    return np.concatenate([np.arange(_HALF - 1, -1, -1), np.arange(_HALF, _DIGITS)])


def _bincount(values: torch.Tensor) -> np.ndarray:
    """Counts of each value in [0, 65536) of a 1-D int32 tensor (torch's: on an int32 tensor about
    twice as fast as numpy's, which converts it to int64 first)."""
    return torch.bincount(values, minlength=_DIGITS).cpu().numpy()


def _float_of(bin_: int, low: int, absolute: bool) -> float:
    """The float32 in `bin_` whose low 16 bits are `low` counted in ascending order."""
    high = bin_ if absolute else bin_ - _HALF
    bits = (high << 16) | (low if high >= 0 else low ^ (_DIGITS - 1))
    return float(np.array(bits, dtype=np.int32).view(np.float32))


class StreamedSelect:
    """Exact order statistics of the n rows of a float32 matrix seen as column blocks, in two
    passes over the blocks (see above). `absolute`: of |x|.

        sel = StreamedSelect()
        for block in blocks(): sel.count(block)        # pass 1; sel.total: entries per row
        sel.locate([k1, k2])                           # 0-based positions in each row sorted ascending
        for block in blocks(): sel.refine(block)       # pass 2: the same blocks, the same order
        sel.values()                                   # (n, 2) float32: each row's k1-th and k2-th

    Blocks are (n, m) float32 tensors; their column order does not matter (only the multiset of
    each row's entries does), so a model's tensors may come in any order, but both passes must
    see the same entries."""

    def __init__(self, absolute: bool = False):
        self.absolute = absolute
        self.total = 0
        self._hist: np.ndarray | None = None           # (n, 65536) counts per bin
        self._bins: np.ndarray | None = None           # (n, positions): the bin of each wanted entry
        self._ranks: np.ndarray | None = None          # (n, positions): its rank inside the bin
        self._low: np.ndarray | None = None            # (n, positions, 65536) counts of the low bits there
        self._buf: torch.Tensor | None = None

    def _bins_of(self, block: torch.Tensor) -> torch.Tensor:
        if block.dtype != torch.float32 or block.dim() != 2:
            raise ValueError(f"blocks must be 2-D float32, got {block.dtype} of shape {tuple(block.shape)}")
        n = block.numel()
        if self._buf is None or self._buf.numel() < n or self._buf.device != block.device:
            self._buf = torch.empty(n, dtype=torch.int32, device=block.device)
        return _high_bins(block, self.absolute, self._buf[:n].view(block.shape))

    def count(self, block: torch.Tensor) -> None:
        """Pass 1: add an (n, m) block's entries to each row's histogram."""
        if self._hist is None:
            self._hist = np.zeros((block.shape[0], _DIGITS), dtype=np.int64)
        if block.shape[0] != self._hist.shape[0]:
            raise ValueError(f"a block of {block.shape[0]} rows after blocks of {self._hist.shape[0]}")
        if block.shape[1] == 0:
            return
        bins = self._bins_of(block.contiguous())
        for i in range(block.shape[0]):
            self._hist[i] += _bincount(bins[i])
        self.total += block.shape[1]

    def locate(self, positions: list[int]) -> None:
        """After pass 1: the 0-based positions (in each row sorted ascending) to find."""
        if self._hist is None or self.total == 0:
            raise ValueError("no entries counted: run pass 1 (count) over a non-empty matrix first")
        bad = [p for p in positions if not 0 <= p < self.total]
        if bad:
            raise ValueError(f"positions {bad} out of range for rows of {self.total} entries")
        order = _bin_order(self.absolute)
        cum = np.cumsum(self._hist[:, order], axis=1)
        n, k = cum.shape[0], len(positions)
        self._bins, self._ranks = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.int64)
        for i, row in enumerate(cum):
            for j, p in enumerate(positions):
                at = int(np.searchsorted(row, p, side="right"))      # the first bin whose count passes p
                self._bins[i, j], self._ranks[i, j] = order[at], p - (int(row[at - 1]) if at else 0)
        self._low = np.zeros((n, k, _DIGITS), dtype=np.int64)

    def refine(self, block: torch.Tensor) -> None:
        """Pass 2: add the low bits of a block's entries that fall in a wanted bin."""
        if self._low is None:
            raise ValueError("call locate(positions) between the two passes")
        if block.shape[1] == 0:
            return
        block = block.contiguous()
        bins = self._bins_of(block)
        bits = block.view(torch.int32)
        for j in range(self._bins.shape[1]):
            want = torch.from_numpy(self._bins[:, j]).to(device=block.device, dtype=torch.int32).view(-1, 1)
            hit = bins == want
            for i in torch.nonzero(hit.any(dim=1)).view(-1).tolist():
                low = bits[i][hit[i]].bitwise_and_(_DIGITS - 1)
                if not self.absolute and self._bins[i, j] < _HALF:     # a negative float: low bits backwards
                    low.bitwise_xor_(_DIGITS - 1)
                self._low[i, j] += _bincount(low)

    def values(self) -> torch.Tensor:
        """After pass 2: (n, len(positions)) float32, each row's entries at the wanted positions."""
        out = [[_float_of(int(b), int(np.searchsorted(np.cumsum(low), r, side="right")), self.absolute)
                for b, r, low in zip(bins, ranks, lows)]
               for bins, ranks, lows in zip(self._bins, self._ranks, self._low)]
        return torch.tensor(out, dtype=torch.float32)
