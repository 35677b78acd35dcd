"""Random pruning: DARE, "Drop And REscale" (Yu et al. 2023, arXiv 2311.03099, Eq. 1-2).

Each delta entry is kept independently with probability p = density and the kept entries are
multiplied by 1/p, so the expected delta is unchanged. Magnitude plays no part: that is DARE's
point, and the DPPA paper's counter-point (it fails when the fine-tune moved far from the base).

`rescale` options:
  "l1" (default, mergekit's `rescale: true`, its default for dare_ties / dare_linear): scale the
      kept entries so the L1 norm of the pruned delta equals the original's (rescale.py).
  "paper": x 1/density, the DARE paper's Eq. 2 (write `rescale: paper`).
  "none" (`rescale: false`): keep the surviving values as they are.
A mergekit dare YAML therefore gives mergekit's scaling here.

Masks are reproducible: one generator per (seed, model index, tensor name), so the same seed gives
the same masks on the same device type whatever order the tensors are processed in.
"""
from __future__ import annotations

import hashlib

import torch

from .rescale import RESCALE_MODES, rescale_to_l1


def tensor_generator(seed: int, model_index: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from (seed, model index, a stable hash of the tensor name)."""
    digest = hashlib.sha256(f"{int(seed)}|{int(model_index)}|{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_mask(shape: torch.Size | tuple, density: float, generator: torch.Generator,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Bernoulli(density) keep-mask: entry kept where a uniform draw in [0, 1) is < density.

    Boolean by default; with a float `dtype`, 1.0 / 0.0 written over the draws themselves (a float
    multiply is several times faster than a boolean one)."""
    draws = torch.rand(tuple(shape), generator=generator, device=device)
    return draws < density if dtype == torch.bool else draws.lt_(density).to(dtype)


def dare_prune(delta: torch.Tensor, density: float, generator: torch.Generator,
               rescale: str = "l1", inplace: bool = False) -> torch.Tensor:
    """Drop each entry with probability 1 - density, then rescale the survivors (see module doc).

    `inplace=True` works in `delta` itself (the engine's buffers), saving a copy."""
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    if density >= 1.0:
        return delta
    before = delta.abs().sum() if rescale == "l1" else None
    keep = random_mask(delta.shape, density, generator, delta.device, dtype=delta.dtype)
    out = delta.mul_(keep) if inplace else delta * keep
    if rescale == "paper":
        out /= density
    elif rescale == "l1":
        rescale_to_l1(out, before)
    return out


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `random` prune (DARE) of fine-tune i's delta of tensor `name`."""
    gen = tensor_generator(cfg.seed, i, name, delta.device)
    return dare_prune(delta, step.density, gen, cfg.models[i].get("rescale"), inplace=inplace)
