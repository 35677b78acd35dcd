"""APL: Activated Parameter Locating via causal intervention (Kong, Zhang & Wang 2024, arXiv 2408.09485).

DARE drops delta entries at random and TIES / DP by magnitude; APL asks the fine-tune itself which
parts of its delta Δ_t = Θ_t − Θ_b matter for its own task, and drops less where they do.

Source note: the paper's full text was not reachable from this project's stored copies (abstract
and summaries only), so the formulas below are written from the paper's abstract and the issue's
statement of the method, and carry no equation numbers. Where a detail is our choice it says "ours".

Partitions (one level at a time; `apl_level`):
  block    the 2-D weights of one numbered block
  module   one 2-D weight inside a block (the tensors DP prunes dynamically)
  row      one row of such a weight: one hidden state (an output unit of nn.Linear; of a Conv1D,
           whose weight is stored transposed, an input unit), the paper's finest level
  model    the whole delta; its importance sets the merge weights

Importance of partition j, the causal intervention do(Δ_j = 0) (`intervention_importance`):
    I_j = L_t(Θ_t − Δ_j) − L_t(Θ_t)
the rise of the fine-tune's loss on a few examples of its own task when partition j's delta is
removed (the base's weights patched in). L_t = mean over examples of the mean answer-token
cross-entropy. One forward pass per partition: fine for blocks and modules, not for rows.

Gradient approximation, first order, one backward pass for every partition at once
(`gradient_importance`):
    I_j ≈ −Δ_j · ∇L_t(Θ_p),  Θ_p = Θ_b + α Δ_t
α = 1 ("finetune") is the Taylor expansion of the intervention above around the fine-tune; there
the gradient nearly vanishes when the fine-tune has converged, and on the demo family its values
do not track the exact ones (README). α = 0.5 ("midpoint", the default; ours) is the one-point
midpoint rule of the path integral L_t(Θ_t) − L_t(Θ_b) = ∫ ∇L_t(Θ_b + aΔ_t)·Δ_t da, which tracks
them best there; α = 0 ("base") is offered too.

Drop ratios from importance (`calibrated_densities`, ours in the details): scores s_j are the
importances centred on their numel-weighted mean and scaled so max|s| = 1 (as DP scales its outlier
ratios); partition j keeps d_j = clamp(D·(1 + λ·s_j) + c, 0, 1) of its entries (λ = `apl_lambda`,
a spread relative to D), where the shift c (found by bisection; 0 unless a density reached 1) makes
the numel-weighted mean of d_j exactly the target density D. More important partitions keep more;
the model keeps D overall. With λ < 1 every partition keeps at least D·(1 − λ) before the shift,
which bounds DARE's 1/d rescaling (a partition near d = 0 would rescale its few survivors by 1/d).

Merge weights from the model-level importance (`importance_weights`, ours in the details; off by
default, `apl_weights: true`): w_t = n · max(I_t, 0) / Σ_s max(I_s, 0) (mean weight 1, so the
task-arithmetic scale is kept; equal weights when no fine-tune has a positive importance),
multiplying each model's own weight. The paper calibrates merge weights by importance too; the
README shows what these weights do to the demo family's pairs, which is why they are off.

Inside a partition (`apl_prune`): entries are dropped at random with DARE's rescaling (`apl_drop:
random`, the drop-ratio setting APL calibrates) or by magnitude (`apl_drop: magnitude`, ties broken
by flat index as everywhere here). At the row level every row has its own density.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import torch
from torch import nn

from .dare import RESCALE_MODES, dare_prune, tensor_generator
from .dp import block_of, is_dp_target
from .magnitude import magnitude_prune

LEVELS = ("block", "module", "row")
GRADIENT_AT = {"finetune": 1.0, "midpoint": 0.5, "base": 0.0}

Loss = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class APLDensity:
    density: float                      # the partition's (mean) density after calibration
    offset: float                       # density - target density (what DP's DPDensity carries too)
    rows: torch.Tensor | None = None    # row level: float64 density of every row


# ------------------------------------------------------------------------------------ partitions

def partition_groups(shapes: Mapping[str, Sequence[int]], level: str) -> dict[Hashable, list[str]]:
    """The tensors of each partition at `level` ("row" groups like "module": rows are split later).
    Only 2-D weights inside numbered blocks are partitioned; keys are block numbers or tensor names."""
    if level not in LEVELS:
        raise ValueError(f"apl level must be one of {LEVELS}, got {level!r}")
    groups: dict[Hashable, list[str]] = {}
    for name, shape in shapes.items():
        if is_dp_target(name, shape):
            groups.setdefault(block_of(name) if level == "block" else name, []).append(name)
    return groups


def _param(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name)


# ------------------------------------------------------------------------------------ importance

@torch.no_grad()
def intervention_importance(model: nn.Module, loss: Loss, base: Mapping[str, torch.Tensor],
                            groups: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, float]:
    """I_j = L(Θ_t − Δ_j) − L(Θ_t) for each group of tensors j (the causal intervention).

    `model` holds Θ_t; `base` maps tensor names to Θ_b. Each group's base weights are patched in,
    the loss measured, and the fine-tune's weights copied back bit for bit."""
    reference = float(loss(model))
    out = {}
    for key, names in groups.items():
        params = [_param(model, n) for n in names]
        saved = [p.detach().clone() for p in params]
        for p, n in zip(params, names):
            p.copy_(base[n].to(p.device, p.dtype))
        try:
            out[key] = float(loss(model)) - reference
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    return out


def gradient_importance(model: nn.Module, loss: Loss, base: Mapping[str, torch.Tensor],
                        groups: Mapping[Hashable, Sequence[str]], at: str = "midpoint",
                        rows: bool = False) -> tuple[dict[Hashable, float | torch.Tensor], float]:
    """First-order I_j ≈ −Δ_j · ∇L(Θ_b + αΔ) for each group (α by `at`), from one backward pass.

    With `rows`, each tensor of the groups gets a float64 vector: the sum over each of its rows.
    Also returns the model-level value, −Δ · ∇L summed over every tensor in `base`. The model's
    weights are Θ_t again afterwards (bit for bit) and its gradients cleared."""
    alpha = GRADIENT_AT[at]
    own = dict(model.named_parameters())           # tied weights appear once here
    params = {n: own[n] for n in base if n in own and base[n].is_floating_point()}
    ft = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        with torch.no_grad():
            if alpha != 1.0:      # move the whole model to Θ_b + α(Θ_t − Θ_b)
                for n, p in params.items():
                    b = base[n].to(p.device, torch.float32)
                    p.copy_(b + alpha * (ft[n].float() - b))
        model.zero_grad(set_to_none=True)
        for p in params.values():
            p.requires_grad_(True)
        loss(model).backward()
        with torch.no_grad():
            contrib = {}
            for n, p in params.items():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                contrib[n] = -(ft[n].double() - base[n].to(p.device).double()) * g.double()
            model_value = float(sum(c.sum() for c in contrib.values()))
            out: dict[Hashable, float | torch.Tensor] = {}
            for key, group in groups.items():
                if rows:
                    for n in group:
                        out[n] = contrib[n].reshape(contrib[n].shape[0], -1).sum(1).cpu()
                else:
                    out[key] = float(sum(contrib[n].sum() for n in group))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ft[n])
                p.requires_grad_(flags[n])
        model.zero_grad(set_to_none=True)
    return out, model_value


# ------------------------------------------------------------------------ importance -> densities

def calibrated_densities(importance: torch.Tensor, numel: torch.Tensor, density: float,
                         spread: float) -> torch.Tensor:
    """d_j = clamp(D·(1 + spread·s_j) + c, 0, 1) per partition (see the module doc); float64.

    s_j = (I_j − μ) / max|I − μ| with μ the numel-weighted mean (all D when every I_j is equal);
    c is the shift that makes Σ n_j d_j = D Σ n_j exactly (up to float rounding)."""
    imp = torch.as_tensor(importance, dtype=torch.float64).reshape(-1)
    n = torch.as_tensor(numel, dtype=torch.float64).reshape(-1)
    if imp.numel() == 0:
        return imp
    centred = imp - (imp * n).sum() / n.sum()
    peak = float(centred.abs().max())
    s = centred / peak if peak > 0 else torch.zeros_like(centred)
    raw = density * (1.0 + spread * s)
    target = density * float(n.sum())

    def kept(c: float) -> float:
        return float((raw + c).clamp(0.0, 1.0).mul(n).sum())

    lo, hi = -1.0 - float(raw.max()), 1.0       # kept(lo) = 0 <= target <= kept(hi) = Σn
    for _ in range(100):                         # kept(c) is monotone in c: bisection
        mid = (lo + hi) / 2
        if kept(mid) < target:
            lo = mid
        else:
            hi = mid
    return (raw + (lo + hi) / 2).clamp(0.0, 1.0)


def density_map(importance: Mapping[Hashable, float | torch.Tensor], shapes: Mapping[str, Sequence[int]],
                level: str, density: float, spread: float) -> dict[str, APLDensity]:
    """Per tensor, its APLDensity from the importance of every partition at `level` (the output of
    `intervention_importance` / `gradient_importance` for the same groups)."""
    groups = partition_groups(shapes, level)

    def numel(n):
        return int(torch.Size(shapes[n]).numel())

    if level == "row":
        names = list(groups)
        values = torch.cat([torch.as_tensor(importance[n], dtype=torch.float64).reshape(-1) for n in names])
        sizes = torch.cat([torch.full((int(shapes[n][0]),), numel(n) // int(shapes[n][0]), dtype=torch.float64)
                           for n in names])
        d = calibrated_densities(values, sizes, density, spread)
        out, pos = {}, 0
        for n in names:
            r = int(shapes[n][0])
            rows = d[pos:pos + r]
            pos += r
            mean = float(rows.mean())
            out[n] = APLDensity(density=mean, offset=mean - density, rows=rows)
        return out
    keys = list(groups)
    sizes = torch.tensor([sum(numel(n) for n in groups[k]) for k in keys], dtype=torch.float64)
    d = calibrated_densities(torch.tensor([float(importance[k]) for k in keys], dtype=torch.float64),
                             sizes, density, spread)
    return {n: APLDensity(density=float(dk), offset=float(dk) - density) for k, dk in zip(keys, d)
            for n in groups[k]}


def importance_weights(model_importance: Sequence[float]) -> list[float]:
    """Merge weights w_t = n · max(I_t, 0) / Σ max(I_s, 0); all 1 when none is positive."""
    pos = [max(float(v), 0.0) for v in model_importance]
    total = sum(pos)
    if total <= 0:
        return [1.0] * len(pos)
    return [len(pos) * v / total for v in pos]


# ------------------------------------------------------------------------------------------ prune

def apl_prune(delta: torch.Tensor, density: float, rows: torch.Tensor | None = None, mode: str = "random",
              generator: torch.Generator | None = None, rescale: str = "paper",
              inplace: bool = False) -> torch.Tensor:
    """Drop entries of one partition's delta at its density (or each row at its own, `rows`).

    mode "random": DARE (keep with probability d, rescale by `rescale`); "magnitude": keep the
    int(d·n) largest |δ| (per row: int(d_r·cols)), ties by lowest index."""
    if mode not in ("random", "magnitude"):
        raise ValueError(f"apl drop mode must be random or magnitude, got {mode!r}")
    if rows is None:
        if mode == "magnitude":
            return magnitude_prune(delta, density, inplace=inplace)
        return dare_prune(delta, density, generator, rescale, inplace=inplace)
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    mat = delta.reshape(delta.shape[0], -1)
    d = rows.to(device=delta.device, dtype=torch.float32).unsqueeze(1)
    if mode == "magnitude":
        k = (rows.to(torch.float64) * mat.shape[1]).floor().to(torch.long).to(delta.device)   # int(d_r · cols)
        order = mat.abs().argsort(dim=1, descending=True, stable=True)    # equal |δ|: lower index first
        keep = torch.empty_like(mat)
        keep.scatter_(1, order, (torch.arange(mat.shape[1], device=delta.device) < k.unsqueeze(1)).to(mat.dtype)
                      .expand_as(mat).contiguous())
        out = mat.mul_(keep) if inplace else mat * keep
        return out.view(delta.shape)
    before = mat.abs().sum() if rescale == "l1" else None
    # The same uniform draws as DARE's mask for this generator, compared with each row's density.
    keep = torch.rand(mat.shape, generator=generator, device=delta.device).lt_(d).to(mat.dtype)
    out = mat.mul_(keep) if inplace else mat * keep
    if rescale == "paper":
        out.mul_(torch.where(d > 0, 1.0 / d.clamp_min(1e-30), torch.zeros_like(d)).to(mat.dtype))
    elif rescale == "l1":
        after = out.abs().sum()
        if before >= 1e-8 and after >= 1e-8:
            out.mul_(before / after)
    return out.view(delta.shape)


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def prune(delta: torch.Tensor, step, cfg, i: int, name: str, inplace: bool = False) -> torch.Tensor:
    """The `apl` prune: the partition's density (or each row's, `step.rows`), random or by
    magnitude."""
    drop = cfg.get("apl_drop")
    gen = tensor_generator(cfg.seed, i, name, delta.device) if drop == "random" else None
    return apl_prune(delta, step.density, step.rows, drop, gen, cfg.models[i].get("rescale"), inplace=inplace)
