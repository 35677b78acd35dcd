"""DP: Dynamic Pruning from DPPA (Zhu et al. 2024, arXiv 2403.02799, Sec. 3.1), as the official
code computes it.

Idea (borrowed from OWL): blocks and modules whose deltas have many outliers carry more of the
fine-tune's knowledge, so they keep more entries. Given a target density D:

  block b:   r_b = % of entries of the block's concatenated |delta| (its 2-D weights) above
             3 x their mean.  r is centred over blocks and scaled so max|r| = dp_lambda; D_b = D + r_b.
  module m:  o_m = % of its |delta| entries above M x its mean (M = dp_outlier_m, default 5).
             o is divided by its mean over all modules of the model, its numel-weighted mean is
             subtracted, and it is scaled so max|o| = dp_lambda.
  density:   d_m = clamp(o_m + D_b, 0, 1); the module keeps int(d_m * n) entries by magnitude.

Only 2-D weights inside numbered blocks (names with ".N.", block = the first such number) are
pruned dynamically. Other tensors (embeddings, norms, lm_head, biases) follow `dp_others`:
"keep" (official: whole delta kept) or "magnitude" (plain magnitude pruning at D).
Where a spread (or a mean used as divisor) is zero, that scaling step is skipped.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from .magnitude import magnitude_prune

_BLOCK = re.compile(r"\.(\d+)\.")
BLOCK_FACTOR = 3.0   # block outliers: entries above 3x the block's mean |delta|


def block_of(name: str) -> int | None:
    """The block index of a tensor name: the first ".N." number, else None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj` (None outside blocks)."""
    m = _BLOCK.search(name)
    if not m:
        return None
    rest = name[m.end():]
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


def is_dp_target(name: str, shape) -> bool:
    """True for 2-D weights inside numbered blocks: the tensors DP prunes dynamically."""
    return len(tuple(shape)) == 2 and block_of(name) is not None


def outlier_percent(abs_delta: torch.Tensor, factor: float, mean: float | torch.Tensor | None = None) -> float:
    """Percent of entries of |delta| strictly above factor x mean (mean of |delta| by default)."""
    if abs_delta.numel() == 0:
        return 0.0
    mean = abs_delta.mean(dtype=torch.float32) if mean is None else mean
    return 100.0 * float((abs_delta > factor * mean).sum()) / abs_delta.numel()


def block_outlier_percent(abs_deltas: list[torch.Tensor]) -> float:
    """r_b: percent of the concatenated entries above 3x their joint mean."""
    total = sum(t.numel() for t in abs_deltas)
    if total == 0:
        return 0.0
    mean = sum(float(t.sum(dtype=torch.float64)) for t in abs_deltas) / total
    above = sum(int((t > BLOCK_FACTOR * mean).sum()) for t in abs_deltas)
    return 100.0 * above / total


def _scale_to(values: dict, target: float) -> dict:
    """Scale so max|v| = target; skipped when all are zero."""
    peak = max((abs(v) for v in values.values()), default=0.0)
    return {k: v * target / peak for k, v in values.items()} if peak > 0 else dict(values)


@dataclass(frozen=True)
class DPDensity:
    density: float        # d_m after clamping to [0, 1]: the fraction this module keeps
    offset: float         # o_m + D_b - D before clamping: shifts DPA band edges
    clamped: bool         # True when o_m + D_b fell outside [0, 1]


def block_densities(block_pct: dict[int, float], density: float, dp_lambda: float) -> dict[int, float]:
    """D_b = density + r_b, with r centred over blocks and scaled so max|r| = dp_lambda."""
    if not block_pct:
        return {}
    mean = sum(block_pct.values()) / len(block_pct)
    centred = _scale_to({b: r - mean for b, r in block_pct.items()}, dp_lambda)
    return {b: density + r for b, r in centred.items()}


def module_offsets(module_pct: dict[str, float], module_numel: dict[str, int], dp_lambda: float) -> dict[str, float]:
    """o_m: divided by their mean, numel-weighted mean subtracted, scaled so max|o| = dp_lambda."""
    if not module_pct:
        return {}
    mean = sum(module_pct.values()) / len(module_pct)
    o = {m: v / mean for m, v in module_pct.items()} if mean != 0 else dict(module_pct)
    total = sum(module_numel[m] for m in o)
    wmean = sum(o[m] * module_numel[m] for m in o) / total
    return _scale_to({m: v - wmean for m, v in o.items()}, dp_lambda)


def dp_densities(block_pct: dict[int, float], module_pct: dict[str, float], module_numel: dict[str, int],
                 density: float, dp_lambda: float = 0.08) -> dict[str, DPDensity]:
    """Per-module densities d_m = clamp(o_m + D_b, 0, 1) from the outlier percentages."""
    d_block = block_densities(block_pct, density, dp_lambda)
    offsets = module_offsets(module_pct, module_numel, dp_lambda)
    out = {}
    for name, o in offsets.items():
        raw = o + d_block[block_of(name)]
        d = min(max(raw, 0.0), 1.0)
        out[name] = DPDensity(density=d, offset=raw - density, clamped=(d != raw))
    zeroed = [n for n, v in out.items() if v.density == 0.0]
    if zeroed:
        warnings.warn(f"DP pruned {len(zeroed)} module(s) to density 0 (e.g. {zeroed[0]}): "
                      f"raise the density or lower dp_lambda", stacklevel=2)
    return out


def dp_densities_from_deltas(deltas: dict[str, torch.Tensor], density: float, dp_lambda: float = 0.08,
                             outlier_m: float = 5.0) -> dict[str, DPDensity]:
    """Convenience for deltas held in memory: computes the statistics, then `dp_densities`."""
    targets = {n: d for n, d in deltas.items() if is_dp_target(n, d.shape)}
    blocks: dict[int, list[torch.Tensor]] = {}
    module_pct, module_numel = {}, {}
    for name, d in targets.items():
        a = d.float().abs()
        blocks.setdefault(block_of(name), []).append(a)
        module_pct[name] = outlier_percent(a, outlier_m)
        module_numel[name] = a.numel()
    block_pct = {b: block_outlier_percent(ts) for b, ts in blocks.items()}
    return dp_densities(block_pct, module_pct, module_numel, density, dp_lambda)


def dp_prune(delta: torch.Tensor, module_density: float, inplace: bool = False) -> torch.Tensor:
    """Prune one module at its DP density: magnitude pruning at d_m."""
    return magnitude_prune(delta, module_density, inplace=inplace)
