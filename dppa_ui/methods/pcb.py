"""PCB combine: Parameter Competition Balancing (Du et al. 2024, arXiv 2410.02396, Sec. 3), with
the official code's exact steps.

On the n x d matrix of the n task vectors (each flattened):
  clip:   |delta| clipped per row to its sorted values at index int(d*c) and int(d*(1-c))-1, where
          c = clip_ratio: 0.0001 in pcb-merging.py (the default), 0.01 in the experiment scripts
          (vision_source_code/pcb.py, pcb_ES.py); 0 clips nothing
  intra:  exp(n * minmax_row(|delta|_clipped)^2)       (how much an entry stands out in its task)
  inter:  tanh(delta * sum_j delta_j)                 (how much it agrees with the other tasks)
  score = intra * inter; each row clipped below at its sorted value at index int(d*(1-ratio))
  scale = minmax_row(score clipped)                   (the low (1-ratio) of each row become 0)
  merged = sum_i w_i sign(delta_i)|delta_i|_clipped scale_i / max(sum_i scale_i, 1e-12)
`ratio` (pcb_ratio) is the fraction kept. Weights w_i are the paper's per-task lambda_i: they
multiply the clipped deltas in the numerator only; the scores use the unweighted deltas.
A min-max over a zero range gives zeros, never NaN.

Each entry's result depends on its own column and on four numbers per row only (`PCBStats`): the
clip bounds lo, hi (which are also the min and max the intra score normalises by), the score at
the ratio cut (`floor`) and the largest score (`top`). The official code takes them over the whole
model flattened (`scope: model`); `pcb_global_stats` computes them exactly in passes over the
model's tensors, so the merge can then go tensor by tensor. `scope: tensor` takes them per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .select import StreamedSelect, row_kth_smallest
from .sum import weight_column
from .ties import conflicts

CLIP_RATIO = 0.0001


@dataclass(frozen=True)
class PCBStats:
    """PCB's per-row quantities, each an (n, 1) float32 column (one row per task vector)."""
    lo: torch.Tensor       # |delta| clip bounds = the min and max of the clipped |delta|
    hi: torch.Tensor
    floor: torch.Tensor    # the score at the pcb_ratio cut
    top: torch.Tensor      # the largest score

    def to(self, device) -> "PCBStats":
        return PCBStats(*(t.to(device) for t in (self.lo, self.hi, self.floor, self.top)))


def clip_positions(d: int, clip_ratio: float) -> tuple[int, int]:
    """0-based positions, in a row of d sorted |delta|, of the clip bounds (pcb-merging.py's clamp;
    clip_ratio 0 gives the row's min and max)."""
    return int(d * clip_ratio), max(int(d * (1 - clip_ratio) - 1), 0)


def cut_position(d: int, ratio: float) -> int:
    """0-based position, in a row of d sorted scores, of the pcb_ratio cut."""
    return min(int(d * (1 - ratio)), d - 1)


def minmax_rows(x: torch.Tensor, inplace: bool = False, lo: torch.Tensor | None = None,
                hi: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max scale each row to [0, 1]; rows with zero range become 0 (never NaN). `lo` / `hi`:
    the rows' min and max when known (a row of the whole model seen in part)."""
    lo = x.min(dim=1, keepdim=True).values if lo is None else lo
    span = (x.max(dim=1, keepdim=True).values if hi is None else hi) - lo
    flat_rows = span <= 0
    y = (x if inplace else x.clone()).sub_(lo).div_(span.masked_fill(flat_rows, 1.0))
    return y.mul_(~flat_rows) if bool(flat_rows.any()) else y


def clip_abs(flat: torch.Tensor, clip_ratio: float = CLIP_RATIO,
             bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """|delta| clipped per row to its [int(d*c), int(d*(1-c))-1] order statistics (c = clip_ratio),
    or to given `bounds` (lo, hi) columns."""
    d = flat.shape[1]
    a = flat.abs()
    if clip_ratio <= 0:          # the bounds are the rows' min and max: nothing to clip
        return a
    if bounds is None:
        lo_at, hi_at = clip_positions(d, clip_ratio)
        bounds = row_kth_smallest(a, lo_at), row_kth_smallest(a, hi_at)
    return a.clamp_(*bounds)


def balance_scores(flat: torch.Tensor, a: torch.Tensor, lo: torch.Tensor | None = None,
                   hi: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """intra x inter of each entry, from the deltas and their clipped |delta| `a` (overwritten with
    `inplace`); `lo` / `hi`: the rows' clip bounds (default: a's own min and max)."""
    score = minmax_rows(a, inplace=inplace, lo=lo, hi=hi).square_().mul_(flat.shape[0]).exp_()   # intra
    return score.mul_(torch.mul(flat, flat.sum(dim=0, keepdim=True)).tanh_())                      # x inter


def pcb_scale(flat: torch.Tensor, ratio: float = 0.1, clipped_abs: torch.Tensor | None = None,
              clip_ratio: float = CLIP_RATIO, stats: PCBStats | None = None) -> torch.Tensor:
    """The (n, d) balancing weights in [0, 1] of n flattened task vectors: from their own rows
    (scope tensor), or from the whole model's `stats` (scope model)."""
    bounds = None if stats is None else (stats.lo, stats.hi)
    a = clip_abs(flat, clip_ratio, bounds) if clipped_abs is None else clipped_abs
    score, floor, top = score_and_cut(flat, a, ratio, stats)
    return minmax_rows(score.clamp_(min=floor), inplace=True, lo=floor, hi=top)


def score_and_cut(flat: torch.Tensor, clipped_abs: torch.Tensor, ratio: float, stats: PCBStats | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(score, floor, top): the (n, d) balancing scores (a new tensor), each row's score at the
    ratio cut and its largest score (None: the row's own), from this tensor's rows (scope tensor)
    or from the whole model's `stats` (scope model). The weights are minmax(score clipped at floor)."""
    bounds = (None, None) if stats is None else (stats.lo, stats.hi)
    score = balance_scores(flat, clipped_abs, *bounds)
    if stats is None:
        return score, row_kth_smallest(score, cut_position(flat.shape[1], ratio)), None
    return score, stats.floor, stats.top


def pcb_combine(deltas: torch.Tensor, weights, ratio: float = 0.1, clip_ratio: float = CLIP_RATIO,
                stats: PCBStats | None = None) -> torch.Tensor:
    """deltas: (n, ...) task vectors; weights: n per-task lambdas; `stats`: the whole model's
    (scope model) or None (this tensor's own). Returns the merged delta."""
    shape = deltas.shape[1:]
    flat = deltas.reshape(deltas.shape[0], -1)
    a = clip_abs(flat, clip_ratio, None if stats is None else (stats.lo, stats.hi))
    scale = pcb_scale(flat, ratio, clipped_abs=a, stats=stats)
    num = a.mul_(torch.sign(flat)).mul_(scale)                # sign(delta) |delta|_clipped scale
    if any(float(w) != 1.0 for w in weights):
        num.mul_(weight_column(flat, weights))
    den = scale.sum(dim=0).clamp_(min=1e-12)
    del scale
    return num.sum(dim=0).div_(den).view(shape)


def stat_passes(clip_ratio: float) -> int:
    """How many passes over the model `pcb_global_stats` makes."""
    return 4 if clip_ratio > 0 else 3


def pcb_global_stats(blocks: Callable[[], Iterable[torch.Tensor]], ratio: float = 0.1,
                     clip_ratio: float = CLIP_RATIO) -> PCBStats:
    """The PCBStats of the n task vectors flattened over a whole model, exactly as pcb_combine
    computes them on the whole (n, d) matrix, from passes over its column blocks: `blocks()`
    yields the (n, m) float32 blocks (a model's tensors' deltas, flattened), the same ones in the
    same order at every call; each block is done with before the next is asked for. Passes: the
    clip bounds (StreamedSelect's two passes over |delta|; one pass of min / max when clip_ratio
    is 0), then the score at the cut (two more, the largest score taken on the first of them).
    Memory: one block's work buffers and a few histograms."""
    buf: list[torch.Tensor] = []

    def abs_of(b: torch.Tensor) -> torch.Tensor:        # |b| in a reused buffer
        if not buf or buf[0].numel() < b.numel() or buf[0].device != b.device:
            buf[:] = [torch.empty(b.numel(), dtype=torch.float32, device=b.device)]
        return torch.abs(b, out=buf[0][:b.numel()].view(b.shape))

    if clip_ratio > 0:
        sel = StreamedSelect(absolute=True)
        for b in blocks():
            sel.count(b)
        sel.locate(list(clip_positions(sel.total, clip_ratio)))
        for b in blocks():
            sel.refine(b)
        lo, hi = sel.values().unbind(1)
        d = sel.total
    else:
        lo = hi = None
        d = 0
        for b in blocks():
            a = abs_of(b)
            lo = a.amin(1).cpu() if lo is None else torch.minimum(lo, a.amin(1).cpu())
            hi = a.amax(1).cpu() if hi is None else torch.maximum(hi, a.amax(1).cpu())
            d += b.shape[1]
    if lo is None or d == 0:
        raise ValueError("PCB over an empty model: no floating-point entries to merge")
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)

    def scores():
        dev = None
        for b in blocks():
            if dev != b.device:
                dev, blo, bhi = b.device, lo.to(b.device), hi.to(b.device)
            a = abs_of(b)
            yield balance_scores(b, a.clamp_(blo, bhi) if clip_ratio > 0 else a, blo, bhi, inplace=True)

    sel, top = StreamedSelect(), None
    for s in scores():
        sel.count(s)
        m = s.amax(1).cpu()
        top = m if top is None else torch.maximum(top, m)
    sel.locate([cut_position(d, ratio)])
    for s in scores():
        sel.refine(s)
    return PCBStats(lo, hi, sel.values(), top.unsqueeze(1))


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def balancing(flat: torch.Tensor, cfg, stats: PCBStats | None = None) -> dict:
    """PCB's combine on (n, d) flat pruned deltas, for a config resolved for one tensor, as the
    merge computes it: {"score" the balancing scores, "cut" each row's score at the cut, "scale"
    the weights (0 below the cut), "clipped" the clipped |delta|, "ratio"}; `stats`: the whole
    model's (scope model)."""
    clipped = clip_abs(flat, cfg.get("clip_ratio"), None if stats is None else (stats.lo, stats.hi))
    score, cut, top = score_and_cut(flat, clipped, cfg.get("pcb_ratio"), stats)
    scale = minmax_rows(score.clamp(min=cut), inplace=True, lo=cut, hi=top)
    return {"score": score, "cut": cut.reshape(-1), "scale": scale, "ratio": float(cfg.get("pcb_ratio")),
            "clipped": clipped}


def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats: PCBStats | None = None) -> torch.Tensor:
    """The `pcb` combine of a config resolved for one tensor; `stats`: the whole model's
    statistics, needed at scope model (pipeline.pcb_model_stats)."""
    if cfg.get("pcb_scope") == "model" and stats is None:
        raise ValueError("PCB at scope model needs the whole model's statistics: pipeline.pcb_model_stats")
    stats = stats.to(deltas.device) if cfg.get("pcb_scope") == "model" else None
    return pcb_combine(deltas, [m.get("weight") for m in cfg.models], cfg.get("pcb_ratio"), cfg.get("clip_ratio"),
                       stats)


def contributions(pruned: torch.Tensor, cfg, stats: PCBStats | None = None):
    """(each model's contribution sign(delta) |delta|_clipped x weight x lambda_i, the sign conflicts
    among what PCB keeps, the pruned deltas, the balancing weights)."""
    n = pruned.shape[0]
    flat = pruned.reshape(n, -1)
    parts = balancing(flat, cfg, stats)
    w = weight_column(flat, [m.get("weight") for m in cfg.models])
    contrib = (w * torch.sign(flat) * parts["clipped"] * parts["scale"]).view_as(pruned)
    return contrib, conflicts(contrib), pruned, parts["scale"].view_as(pruned)
