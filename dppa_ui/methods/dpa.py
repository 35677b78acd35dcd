"""DPA: Dynamic Partition Amplification from DPPA (Zhu et al. 2024, arXiv 2403.02799, Sec. 3.2).

After pruning at density D, the kept entries are split into magnitude bands and each band is
scaled by its own factor: partitions f_1 < ... < f_K = D (fractions of *all* entries, ranked by
|delta|), amplification a_1 ... a_K. Band k holds the entries ranked between f_{k-1} and f_k
(f_0 = 0) and is multiplied by a_k. Under DP pruning each edge is shifted by that module's DP
density offset (d_m - D) and clamped to [0, 1], so the last edge is the module's own density.

The official code instead prunes at each f_k, amplifies each copy and keeps the larger magnitude:
band k is in the copies pruned at f_k .. f_K, so it gets max(a_k, ..., a_K) (two bands: the top
band gets max(a_1, a_2)). That is the default (`band_factors(a, "max")`); `dpa_bands: own`
scales each band by its own a_k. The two agree whenever a_1 >= ... >= a_K, but a greedy walk can
end at, say, [1.9, 2.4].

Tensors the prune keeps whole (DP's embeddings, norms, lm_head, biases under `dp_others: keep`)
are whole in every one of those copies, so the official max-merge scales them by max_k a_k (1.8
at the search start). That is the default here too (pipeline.whole_factor); `dpa_whole: keep`
leaves them x1.

"Dynamic": a_k are found by `greedy_alpha_search` on a score of the pruned fine-tune alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .select import keep_count, topk_mask


def band_edges(partitions: Sequence[float], offset: float = 0.0) -> list[float]:
    """Band upper edges f_k + offset, each clamped to [0, 1]."""
    return [min(max(f + offset, 0.0), 1.0) for f in partitions]


def band_factors(amplification: Sequence[float], rule: str = "max") -> list[float]:
    """The factor each band gets: its own alpha ("own"), or ("max", the official max-merge of the
    pruned copies) the largest alpha of it and every band below it. Factors are >= 0, so the
    larger-magnitude copy is the one with the larger factor."""
    if rule == "own":
        return [float(a) for a in amplification]
    if rule != "max":
        raise ValueError(f"rule must be 'max' or 'own', got {rule!r}")
    out, top = [], float("-inf")
    for a in reversed(amplification):
        top = max(top, float(a))
        out.append(top)
    return out[::-1]


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


OFFICIAL_START = 1.8      # python_contral.py / run.sh: nine_ratio = 1.8 (top band), eight_ratio = 0.0


def official_start(n_bands: int) -> list[float]:
    """The official walk's start: 1.8 for the top band, 0.0 for the others."""
    return [OFFICIAL_START] + [0.0] * (n_bands - 1)


@dataclass
class AlphaSearchResult:
    alpha: list[float]                  # the returned amplification (the walk's end state, or the best seen)
    score: float | None                 # its score; None when the walk ended on a point it never scored
    path: list[tuple[list[float], float]] = field(default_factory=list)   # every (alpha, score) tried
    best: list[float] | None = None     # the best-scoring amplification seen
    best_score: float | None = None


class GreedyAlphaWalk:
    """DPPA's greedy coordinate walk over the band factors, as the official python_contral.py
    walks it, one score at a time (`ask` the next point, `tell` its score):

        a = start (official: [1.8, 0.0]); best = 0; k = 0
        while k < K:
            s = score(a)
            if s > best: best = s; a[k] += step
            else:
                if a[k] > 1: a[k] -= step
                k += 1
                if k < K: a[k] = 1.0 if a[k] < 0.1 else a[k] + step

    The official script keeps the model of the END state (it rebuilds `a` after the loop), not
    the best point scored: once a band starts at 1.0 it never ends below 1, and a band that did
    not improve on its first step still ends one step down. `mode="best"` returns the best point
    scored instead. `best` starts at `floor` (the official 0: scores are ratios >= 0). Values are
    rounded to 9 decimals after each step so float drift (0.1 + 0.2) never changes a comparison.
    A walk cut short by `max_evals` returns the best point scored (its end state is a point it
    has not scored yet)."""

    def __init__(self, n_bands: int = 2, start: Sequence[float] | None = None, step: float = 0.1,
                 mode: str = "official", max_evals: int = 60, floor: float = 0.0):
        self.alpha = official_start(n_bands) if start is None else [float(x) for x in start]
        if len(self.alpha) != n_bands:
            raise ValueError(f"start has {len(self.alpha)} values for {n_bands} bands")
        if mode not in ("official", "best"):
            raise ValueError(f"mode must be 'official' or 'best', got {mode!r}")
        self.n_bands, self.step, self.mode, self.max_evals = n_bands, float(step), mode, int(max_evals)
        self.best, self.best_alpha, self.k = float(floor), None, 0
        self.path: list[tuple[list[float], float]] = []

    @property
    def done(self) -> bool:
        return self.k >= self.n_bands or len(self.path) >= self.max_evals

    def ask(self) -> list[float] | None:
        """The next point to score, or None when the walk has ended."""
        return None if self.done else list(self.alpha)

    def tell(self, s: float) -> None:
        """The score of the point `ask` gave; moves the walk one step."""
        snap = lambda x: round(x, 9)  # noqa: E731
        s, a, k = float(s), self.alpha, self.k
        self.path.append((list(a), s))
        if s > self.best:
            self.best, self.best_alpha = s, list(a)
            a[k] = snap(a[k] + self.step)
        else:
            if a[k] > 1:
                a[k] = snap(a[k] - self.step)
            self.k = k = k + 1
            if k < self.n_bands:
                a[k] = 1.0 if a[k] < 0.1 else snap(a[k] + self.step)

    def result(self) -> AlphaSearchResult:
        best = self.best_alpha
        best_score = self.best if best is not None else None
        if self.mode == "best" or self.k < self.n_bands:      # "best", or cut short by max_evals
            alpha = best if best is not None else list(self.path[0][0]) if self.path else list(self.alpha)
        else:
            alpha = list(self.alpha)
        seen = [s for a, s in self.path if all(abs(x - y) < 1e-9 for x, y in zip(a, alpha))]
        return AlphaSearchResult(alpha=alpha, score=seen[-1] if seen else None, path=list(self.path),
                                 best=best, best_score=best_score)


def greedy_alpha_search(score: Callable[[list[float]], float], n_bands: int = 2,
                        start: Sequence[float] | None = None, step: float = 0.1,
                        max_evals: int = 60, mode: str = "official") -> AlphaSearchResult:
    """Run `GreedyAlphaWalk` on `score` (a function of the band factors) to its end."""
    walk = GreedyAlphaWalk(n_bands, start, step, mode, max_evals)
    while (alpha := walk.ask()) is not None:
        walk.tell(score(alpha))
    return walk.result()


# ------------------------------------------------------------------ the stage (registry.STAGES)
# Called with the config resolved for one tensor (MergeConfig.for_tensor); `step` is pipeline.Step.

def amplify(delta: torch.Tensor, step, cfg, i: int) -> torch.Tensor:
    """The `dpa` amplify of fine-tune i's pruned delta (`step.offset`: DP's band shift)."""
    m = cfg.models[i]
    return dpa_amplify(delta, m.get("partitions"), band_factors(m.get("amplification"), cfg.get("dpa_bands")),
                       step.offset)
