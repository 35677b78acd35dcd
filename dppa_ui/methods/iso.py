"""Iso-C and Iso-CTS combines: isotropic merging (Marczak et al., "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959).

Iso-C, per layer matrix: the task-arithmetic sum Delta = sum_i Delta_i = U Sigma V^T keeps its
singular vectors, and its spectrum is made flat, every singular value replaced by their mean:
  M = sigma_bar U V^T,  sigma_bar = (1/r) sum_j sigma_j,  r = min(rows, cols).
Directions a few tasks dominate no longer drown the rest (the paper's subspace alignment argument:
a task is served by how well the merged matrix's subspace covers its own, and a flat spectrum spreads
it evenly).

Iso-CTS keeps the top c singular directions of the sum (the common subspace, c about
common_space_fraction * r) and fills the remaining r - c with each task's own directions: task i's
delta with the common subspace projected out, (I - U_c U_c^T) Delta_i, contributes its top
s = (r - c) / T singular triplets. The r collected left (and right) vectors are orthogonalized as
TSV-M does (orthogonal Procrustes), and the spectrum is flattened to the mean of the r singular
values collected:
  M = sigma_bar U_perp V_perp^T.
Both merge theta_base + lambda * M (lambda: FusionBench's `scaling_factor`).

Tensors that are not 2-D are averaged (the mean of the deltas), as the authors' code and
FusionBench do.
"""
from __future__ import annotations

import torch

from .tsv_m import orthogonalize


def task_sum(deltas: torch.Tensor) -> torch.Tensor:
    """sum_i Delta_i, added in model order (the authors' code sums a Python list the same way)."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total


def iso_c_combine(deltas: torch.Tensor) -> torch.Tensor:
    """deltas: (T, ...) task vectors of one tensor. The merged delta, before lambda."""
    if deltas.dim() != 3:
        return deltas.mean(dim=0)
    n = deltas.shape[0]
    # The authors' code forms the sum as n times the mean, (sum / n) * n, which for n not a power
    # of two rounds its last bits. Where the sum is rank-deficient (an embedding whose rows for
    # unused tokens never moved) the singular vectors beyond its rank, which the flat spectrum
    # weights by sigma_bar like any other, follow those bits; rounded the same way, M equals theirs.
    total = task_sum(deltas).div_(n).mul_(n)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_split(rows: int, cols: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, s): the common subspace's size and each task's, with c + T*s = r = min(rows, cols).

    c starts at floor(r * fraction); the rest is rounded (half to even, Python's round, as the
    authors' code does) to a multiple of T so every task gets the same s, and c takes what is
    left. Where that rounding would need more than r (a small fraction on a small matrix, where
    the authors' code fails), s is rounded down instead."""
    r = min(rows, cols)
    c = int(r * common_space_fraction)
    s = round((r - c) / n_tasks)
    if s * n_tasks > r:
        s = (r - c) // n_tasks
    return r - s * n_tasks, s


def iso_cts_factors(deltas: torch.Tensor, common_space_fraction: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, sigma, V^T) collected before orthogonalization: task i's s triplets in columns (rows
    of V^T) i*s .. (i+1)*s - 1, the common subspace's c after them (the authors' order; the
    orthogonalized result does not depend on it, but LAPACK's bits do)."""
    n, rows, cols = deltas.shape
    c, s = iso_cts_split(rows, cols, n, common_space_fraction)
    u, sig, vh = torch.linalg.svd(task_sum(deltas), full_matrices=False)
    u_c = u[:, :c]
    r = min(rows, cols)
    u_cat, s_cat, vh_cat = deltas.new_empty(rows, r), deltas.new_empty(r), deltas.new_empty(r, cols)
    # (I - U_c U_c^T) Delta_i projects the common subspace out of task i's delta. The authors' code
    # forms the rows x rows projector U_c U_c^T first; where `own` is rank-deficient (an embedding
    # whose rows for unused tokens never moved) the singular vectors it contributes beyond its rank
    # follow the last bits of that product, and the flat spectrum gives them full weight. So the
    # projector is formed too where it takes no more memory than the stacked deltas (or 64 MB);
    # beyond that (a large vocabulary's embedding) U_c^T Delta_i goes first: the same matrix up to
    # rounding, without a rows x rows buffer.
    projector = u_c @ u_c.T if rows * rows <= max(deltas.numel(), 1 << 24) else None
    for i in range(n):
        own = deltas[i] - (projector @ deltas[i] if projector is not None else u_c @ (u_c.T @ deltas[i]))
        ut, st, vht = torch.linalg.svd(own, full_matrices=False)
        u_cat[:, i * s:(i + 1) * s] = ut[:, :s]
        s_cat[i * s:(i + 1) * s] = st[:s]
        vh_cat[i * s:(i + 1) * s] = vht[:s]
    u_cat[:, n * s:] = u_c
    s_cat[n * s:] = sig[:c]
    vh_cat[n * s:] = vh[:c]
    return u_cat, s_cat, vh_cat


def iso_cts_combine(deltas: torch.Tensor, common_space_fraction: float = 0.8) -> torch.Tensor:
    """deltas: (T, ...) task vectors of one tensor. The merged delta, before lambda."""
    if deltas.dim() != 3:
        return deltas.mean(dim=0)
    u, s, vh = iso_cts_factors(deltas, common_space_fraction)
    return (orthogonalize(u) * s.mean()) @ orthogonalize(vh)


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine_c(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `iso_c` combine of a config resolved for one tensor."""
    return iso_c_combine(deltas)


def combine_cts(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `iso_cts` combine of a config resolved for one tensor."""
    return iso_cts_combine(deltas, cfg.get("common_space_fraction"))
