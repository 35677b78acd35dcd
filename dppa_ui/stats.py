"""Delta statistics: what DP pruning needs, and what the app plots, computed once.

Per fine-tune and tensor: numel, mean |delta|, the percent of entries above M x mean (DP's module
outlier ratio) and above 3 x mean, and a 64-bin histogram of log10 |delta| (from a fixed-size
sample on large tensors). Per block (keyed by `block_key`, e.g. `model.layers.3`): r_b, the percent
of the block's concatenated 2-D weights above 3 x their joint mean. That needs the block mean first, so DP costs two statistics passes
over the inputs (reads from the page cache) before the merge pass.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .methods.dp import BLOCK_FACTOR, DPDensity, block_key, block_of, dp_densities, is_dp_target, outlier_percent

HIST_BINS = 64
HIST_SAMPLE = 1 << 16


@dataclass
class TensorStat:
    numel: int
    block: int | None           # block index, for display (two stacks share indices)
    dp_target: bool
    mean_abs: float
    pct_outlier: float          # % above outlier_m x mean (DP module ratio o_m before normalising)
    pct_3x: float               # % above 3 x mean
    hist_lo: float              # log10 edges of the histogram
    hist_hi: float
    hist: list[int]             # HIST_BINS counts over a sample (zeros excluded)
    zero_frac: float            # fraction of exactly-zero entries in the sample
    block_key: str | None = None    # the block it belongs to (`block_key`): what DP groups by


@dataclass
class DeltaStats:
    """Statistics of one fine-tune's delta against the base."""
    model: str
    outlier_m: float
    tensors: dict[str, TensorStat] = field(default_factory=dict)
    block_pct: dict[str, float] = field(default_factory=dict)     # block key -> r_b

    def dp_map(self, density: float, dp_lambda: float) -> dict[str, DPDensity]:
        """DP densities for every dynamically pruned tensor of this fine-tune."""
        targets = {n: t for n, t in self.tensors.items() if t.dp_target}
        return dp_densities(self.block_pct, {n: t.pct_outlier for n, t in targets.items()},
                            {n: t.numel for n, t in targets.items()}, density, dp_lambda)

    def to_json(self) -> dict:
        return {"model": self.model, "outlier_m": self.outlier_m,
                "block_pct": {str(b): v for b, v in self.block_pct.items()},
                "tensors": {n: asdict(t) for n, t in self.tensors.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "DeltaStats":
        """Also reads files written before blocks were keyed by name (block numbers as keys, one
        stack): each number becomes the key of the block its tensors carry."""
        tensors = {n: TensorStat(**{**t, "block_key": t.get("block_key") or block_key(n)})
                   for n, t in d["tensors"].items()}
        by_number = {t.block: t.block_key for t in tensors.values() if t.block is not None}
        block_pct = {by_number.get(int(b), b) if b.isdigit() else b: v for b, v in d["block_pct"].items()}
        return cls(model=d["model"], outlier_m=d["outlier_m"], tensors=tensors, block_pct=block_pct)


def sample_flat(t: torch.Tensor, size: int = HIST_SAMPLE) -> torch.Tensor:
    """A deterministic, evenly strided sample of at most `size` entries."""
    flat = t.reshape(-1)
    if flat.numel() <= size:
        return flat
    return flat[:: flat.numel() // size][:size]


def log_histogram(abs_sample: torch.Tensor, bins: int = HIST_BINS) -> tuple[float, float, list[int], float]:
    """Histogram of log10 of the non-zero entries: (lo, hi, counts, zero fraction)."""
    nz = abs_sample[abs_sample > 0].float()
    zero_frac = 1.0 - nz.numel() / max(abs_sample.numel(), 1)
    if nz.numel() == 0:
        return 0.0, 0.0, [0] * bins, zero_frac
    logs = nz.log10()
    lo, hi = float(logs.min()), float(logs.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    return lo, hi, [int(c) for c in counts], zero_frac


def tensor_stat(name: str, abs_delta: torch.Tensor, outlier_m: float) -> TensorStat:
    mean = abs_delta.mean(dtype=torch.float32)
    lo, hi, hist, zero_frac = log_histogram(sample_flat(abs_delta))
    return TensorStat(numel=abs_delta.numel(), block=block_of(name), dp_target=is_dp_target(name, abs_delta.shape),
                      mean_abs=float(mean), pct_outlier=outlier_percent(abs_delta, outlier_m, mean),
                      pct_3x=outlier_percent(abs_delta, 3.0, mean), hist_lo=lo, hist_hi=hi, hist=hist,
                      zero_frac=zero_frac, block_key=block_key(name))


Loader = Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]]


def collect_stats(names: Iterable[str], load: Loader, models: list[str], outlier_m: float,
                  progress: Callable[[int], None] | None = None) -> list[DeltaStats]:
    """Both statistics passes. `load(name)` returns (base, [fine-tunes]) float tensors for a tensor.

    Pass 1 visits every floating tensor; pass 2 revisits the DP targets to count block outliers
    against the block means that pass 1 found.
    """
    names = list(names)
    stats = [DeltaStats(model=m, outlier_m=outlier_m) for m in models]
    block_sum: list[dict[str, float]] = [{} for _ in models]
    for name in names:
        base, fts = load(name)
        for i, ft in enumerate(fts):
            a = (ft.float() - base.float()).abs_()
            t = tensor_stat(name, a, outlier_m)
            stats[i].tensors[name] = t
            if t.dp_target:
                block_sum[i][t.block_key] = block_sum[i].get(t.block_key, 0.0) + t.mean_abs * t.numel
        if progress:
            progress(1)
    targets = [n for n in names if stats[0].tensors[n].dp_target] if models else []
    block_numel: dict[str, int] = {}
    for n in targets:
        b = stats[0].tensors[n].block_key
        block_numel[b] = block_numel.get(b, 0) + stats[0].tensors[n].numel
    above: list[dict[str, int]] = [{} for _ in models]
    for name in targets:
        base, fts = load(name)
        b = stats[0].tensors[name].block_key
        for i, ft in enumerate(fts):
            mean_b = block_sum[i][b] / block_numel[b]
            a = (ft.float() - base.float()).abs_()
            above[i][b] = above[i].get(b, 0) + int((a > BLOCK_FACTOR * mean_b).sum())
        if progress:
            progress(1)
    for i in range(len(models)):
        stats[i].block_pct = {b: 100.0 * above[i].get(b, 0) / block_numel[b] for b in block_numel}
    return stats


def save_stats(stats: list[DeltaStats], path: Path) -> None:
    path.write_text(json.dumps([s.to_json() for s in stats]))

