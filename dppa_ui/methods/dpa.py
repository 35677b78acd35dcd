"""DPA: Dynamic Partition Amplification from DPPA (Zhu et al. 2024, arXiv 2403.02799, Sec. 3.2).

After pruning at density D, the kept entries are split into magnitude bands and each band is
scaled by its own factor: partitions f_1 < ... < f_K = D (fractions of *all* entries, ranked by
|delta|), amplification a_1 ... a_K. Band k holds the entries ranked between f_{k-1} and f_k
(f_0 = 0) and is multiplied by a_k. Under DP pruning each edge is shifted by that module's DP
density offset (d_m - D) and clamped to [0, 1], so the last edge is the module's own density.

The official code instead prunes at each f_k, amplifies each copy and keeps the larger magnitude,
so its top band gets max(a_1, a_2); the two agree whenever a_1 >= a_2.

Tensors the prune keeps whole (DP's embeddings, norms, lm_head, biases under `dp_others: keep`)
are whole in every one of those copies, so the official max-merge scales them by max_k a_k (1.8
at the search start). That is the default here too (pipeline.whole_factor); `dpa_whole: keep`
leaves them x1.

"Dynamic": a_k are found by `greedy_alpha_search` on a score of the pruned fine-tune alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .select import keep_count, topk_mask


def band_edges(partitions: Sequence[float], offset: float = 0.0) -> list[float]:
    """Band upper edges f_k + offset, each clamped to [0, 1]."""
    return [min(max(f + offset, 0.0), 1.0) for f in partitions]


def dpa_amplify(pruned: torch.Tensor, partitions: Sequence[float], amplification: Sequence[float],
                offset: float = 0.0) -> torch.Tensor:
    """Scale band k of `pruned` (entries ranked by |delta| in (f_{k-1}, f_k]) by amplification[k].

    `pruned` is the delta after magnitude/DP pruning: the top-ranked entries of the pruned tensor
    are those of the original delta, so bands can be read off it directly. Every non-zero entry
    outranks every zero one, so the ranks are taken among the non-zero (kept) entries only, in
    flat order (ties keep the lowest index, as in `topk_mask`); a band edge past them only adds
    zeros, which no factor changes. That also spares the selection a tensor that is mostly zeros.
    """
    if len(partitions) != len(amplification):
        raise ValueError("partitions and amplification need the same length")
    edges = band_edges(partitions, offset)
    flat = pruned.reshape(-1)
    kept = flat.nonzero().squeeze(1)
    values = flat[kept]
    factor = torch.full_like(values, amplification[-1])      # widest band first, narrower overwrite
    a = values.abs()
    for f, alpha in zip(reversed(edges[:-1]), reversed(amplification[:-1])):
        factor.masked_fill_(topk_mask(a, min(keep_count(f, flat.numel()), a.numel())), alpha)
    out = torch.zeros_like(flat)
    out[kept] = values * factor
    return out.view(pruned.shape)


@dataclass
class AlphaSearchResult:
    alpha: list[float]                  # best-scoring amplification seen
    score: float                        # its score
    path: list[tuple[list[float], float]] = field(default_factory=list)   # every (alpha, score) tried


def greedy_alpha_search(score: Callable[[list[float]], float], n_bands: int = 2,
                        start: Sequence[float] | None = None, step: float = 0.1,
                        max_evals: int = 60) -> AlphaSearchResult:
    """DPPA's greedy coordinate search for the band factors, exactly as the official code walks:

        a = [1.8, 0.0]; best = -inf; k = 0
        while k < K:
            s = score(a)
            if s > best: best = s; a[k] += step
            else:
                if a[k] > 1: a[k] -= step
                k += 1
                if k < K: a[k] = 1.0 if a[k] < 0.1 else a[k] + step

    Values are rounded to 9 decimals after each step so float drift (0.1 + 0.2) never changes a
    comparison; the walk stays on the grid its start defines. Stops early after `max_evals`
    scores. Returns the best-scoring a seen, its score and the path.
    """
    alpha = [1.8] + [0.0] * (n_bands - 1) if start is None else [float(x) for x in start]
    if len(alpha) != n_bands:
        raise ValueError(f"start has {len(alpha)} values for {n_bands} bands")
    snap = lambda x: round(x, 9)  # noqa: E731
    best, best_alpha, path, k = -math.inf, list(alpha), [], 0
    while k < n_bands and len(path) < max_evals:
        s = float(score(list(alpha)))
        path.append((list(alpha), s))
        if s > best:
            best, best_alpha = s, list(alpha)
            alpha[k] = snap(alpha[k] + step)
        else:
            if alpha[k] > 1:
                alpha[k] = snap(alpha[k] - step)
            k += 1
            if k < n_bands:
                alpha[k] = 1.0 if alpha[k] < 0.1 else snap(alpha[k] + step)
    return AlphaSearchResult(alpha=best_alpha, score=best, path=path)
