"""TSV-M combine: Task Singular Vectors merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per layer matrix (a 2-D tensor), with T tasks and r = min(rows, cols):
  1. each task's (weighted) delta is decomposed, Delta_i = U_i Sigma_i V_i^T (the task singular
     vectors), and cut to its top k = floor(r / T) triplets: TSV-C's compression, which gives
     every task an equal share of the layer's rank;
  2. the cut factors are laid side by side, U = [U_1,k ... U_T,k], Sigma = diag(Sigma_1,k ...
     Sigma_T,k), V = [V_1,k ... V_T,k], so that U Sigma V^T is the sum of the low-rank task
     matrices. Task interference is the overlap of different tasks' singular vectors, the
     off-diagonal blocks of U^T U and V^T V (the paper's singular task interference);
  3. TSV-M removes it by replacing U and V with the nearest matrices of orthonormal columns, the
     orthogonal Procrustes solution: U_perp = P Q^T for U = P S Q^T, likewise V_perp, and merges
     M = U_perp Sigma V_perp^T (the paper shows this is the whitening of U and V).
The merged model is theta_base + lambda * M (lambda: FusionBench's scalar `alpha`); the per-model
weight w_i scales Delta_i before step 1 (FusionBench's per-task `alpha` list).

Tensors that are not 2-D (norms, biases) have no singular vectors: they are averaged, the mean of
the weighted deltas, as the authors' code and FusionBench do. Embeddings and lm_head are matrices
like any other.
"""
from __future__ import annotations

import torch


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """The matrix of orthonormal columns (rows, if wider than tall) nearest `a` in Frobenius norm:
    P Q^T for a = P S Q^T (orthogonal Procrustes; also the polar factor of `a`)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_rank(rows: int, cols: int, n_tasks: int) -> int:
    """Singular triplets each task keeps: floor(min(rows, cols) / T)."""
    return min(rows, cols) // n_tasks


def tsv_factors(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, sigma, V^T) of step 2 for stacked (T, rows, cols) deltas: U is rows x r, sigma r, V^T
    r x cols, task i's k triplets in columns (rows of V^T) i*k .. (i+1)*k - 1.

    When T*k < r the last r - T*k columns stay zero, as in the authors' code: they meet zero
    singular values, so they add nothing to U Sigma V^T. Keeping that layout is what makes the
    results equal theirs: where U (or V) has fewer independent columns than it has columns
    (an embedding whose rows for unused tokens never moved), its polar factor is not unique and
    LAPACK's choice depends on the exact matrix it is given."""
    n, rows, cols = deltas.shape
    r = min(rows, cols)
    k = tsv_rank(rows, cols, n)
    u_cat = deltas.new_zeros(rows, r)
    s_cat = deltas.new_zeros(r)
    vh_cat = deltas.new_zeros(r, cols)
    for i in range(n):
        u, s, vh = torch.linalg.svd(deltas[i], full_matrices=False)
        u_cat[:, i * k:(i + 1) * k] = u[:, :k]
        s_cat[i * k:(i + 1) * k] = s[:k]
        vh_cat[i * k:(i + 1) * k] = vh[:k]
    return u_cat, s_cat, vh_cat


def tsv_m_combine(deltas: torch.Tensor, weights, inplace: bool = False) -> torch.Tensor:
    """deltas: (T, ...) task vectors of one tensor; weights: T numbers (each task's alpha).
    The merged delta, before lambda. `inplace` may overwrite deltas."""
    w = [float(x) for x in weights]
    if any(x != 1.0 for x in w):
        deltas = deltas if inplace else deltas.clone()
        for d, x in zip(deltas, w):
            d.mul_(x)
    if deltas.dim() != 3:
        return deltas.mean(dim=0)
    u, s, vh = tsv_factors(deltas)
    return (orthogonalize(u) * s) @ orthogonalize(vh)


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def combine(deltas: torch.Tensor, cfg, inplace: bool = False, stats=None) -> torch.Tensor:
    """The `tsv_m` combine of a config resolved for one tensor (`weight`: each task's alpha)."""
    return tsv_m_combine(deltas, [m.get("weight") for m in cfg.models], inplace=inplace)
