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

Only 2-D weights inside numbered blocks are pruned dynamically. A block is keyed by the whole
name up to its first ".N." number (`model.language_model.layers.3`), so the stacks of a
multimodal model (`model.vision_tower.layers.3`) or of an encoder-decoder (`encoder.block.3`,
`decoder.block.3`) are different blocks. Other tensors (embeddings, norms, lm_head, biases)
follow `dp_others`: "keep" (official: whole delta kept) or "magnitude" (plain magnitude pruning
at D). Where a spread (or a mean used as divisor) is zero, that scaling step is skipped.

Stacks: the official code (scrips/pruning/lib/prune_all.py, prune_mag_outlier_layer_wei) runs on
the one stack `model.model.layers` of a Llama, centring and scaling r over its layers and
normalising o over its modules. A model with several stacks (the prefix before the block number)
is treated as several such models: r is centred and scaled, and o normalised, within each stack.
A vision tower's outlier profile then never shifts the language model's densities; every stack
keeps D on average, as the one stack does in the official code.
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
    """The block index of a tensor name, for display: the first ".N." number, else None. Two
    stacks share indices; group by `block_key`."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj` (None outside blocks)."""
    m = _BLOCK.search(name)
    if not m:
        return None
    rest = name[m.end():]
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


def block_key(name: str) -> str | None:
    """The block a tensor belongs to: its name up to the first ".N." number
    (`model.vision_tower.layers.3.mlp.fc1.weight` -> `model.vision_tower.layers.3`), else None."""
    m = _BLOCK.search(name)
    return name[:m.end(1)] if m else None


def stack_of(key: str) -> str:
    """The stack of a block key: the prefix before its number (`encoder.block.3` -> `encoder.block`)."""
    return key.rsplit(".", 1)[0]


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


def _by_stack(keys, stack) -> dict[str, list]:
    groups: dict[str, list] = {}
    for k in keys:
        groups.setdefault(stack(k), []).append(k)
    return groups


def block_densities(block_pct: dict[str, float], density: float, dp_lambda: float) -> dict[str, float]:
    """D_b = density + r_b, with r centred over the blocks of each stack and scaled so max|r| =
    dp_lambda within it. Keys are block keys (`block_key`)."""
    out = {}
    for keys in _by_stack(block_pct, stack_of).values():
        mean = sum(block_pct[b] for b in keys) / len(keys)
        centred = _scale_to({b: block_pct[b] - mean for b in keys}, dp_lambda)
        out.update({b: density + r for b, r in centred.items()})
    return out


def module_offsets(module_pct: dict[str, float], module_numel: dict[str, int], dp_lambda: float) -> dict[str, float]:
    """o_m per stack: divided by their mean, numel-weighted mean subtracted, scaled so max|o| = dp_lambda."""
    out = {}
    for names in _by_stack(module_pct, lambda n: stack_of(block_key(n))).values():
        mean = sum(module_pct[m] for m in names) / len(names)
        o = {m: module_pct[m] / mean for m in names} if mean != 0 else {m: module_pct[m] for m in names}
        total = sum(module_numel[m] for m in o)
        wmean = sum(o[m] * module_numel[m] for m in o) / total
        out.update(_scale_to({m: v - wmean for m, v in o.items()}, dp_lambda))
    return out


def dp_densities(block_pct: dict[str, float], module_pct: dict[str, float], module_numel: dict[str, int],
                 density: float, dp_lambda: float = 0.08) -> dict[str, DPDensity]:
    """Per-module densities d_m = clamp(o_m + D_b, 0, 1) from the outlier percentages
    (`block_pct` keyed by block key, the others by tensor name)."""
    d_block = block_densities(block_pct, density, dp_lambda)
    offsets = module_offsets(module_pct, module_numel, dp_lambda)
    out = {}
    for name, o in offsets.items():
        raw = o + d_block[block_key(name)]
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
    blocks: dict[str, list[torch.Tensor]] = {}
    module_pct, module_numel = {}, {}
    for name, d in targets.items():
        a = d.float().abs()
        blocks.setdefault(block_key(name), []).append(a)
        module_pct[name] = outlier_percent(a, outlier_m)
        module_numel[name] = a.numel()
    block_pct = {b: block_outlier_percent(ts) for b, ts in blocks.items()}
    return dp_densities(block_pct, module_pct, module_numel, density, dp_lambda)


def dp_prune(delta: torch.Tensor, module_density: float, inplace: bool = False) -> torch.Tensor:
    """Prune one module at its DP density: magnitude pruning at d_m."""
    return magnitude_prune(delta, module_density, inplace=inplace)


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `dp` prune: magnitude pruning at the module's own density."""
    return dp_prune(delta, step.density, inplace=inplace)
