"""Property and reference tests for the merge methods (dppa_ui/methods) and the per-tensor pipeline.

Every stage is checked against an independent reference written here straight from issue 2's
"Methods, exact semantics" (full argsort ranking with the documented tie rule, mergekit's TIES
consensus, the official PCB-Merging steps with torch.sort, DP densities with plain Python loops,
DPA bands by rank), plus the properties the issue names. Small tensors, CPU, a few seconds.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from dppa_ui import load_config, merge_in_memory
from dppa_ui.methods import (agreement_mask, band_edges, band_factors, dare_prune, dp_densities, dp_densities_from_deltas,
                             dpa_amplify, elect_sign, greedy_alpha_search, keep_count, kth_largest,
                             magnitude_mask, magnitude_prune, pcb_combine, pcb_scale, random_mask,
                             sum_combine, tensor_generator, ties_combine, topk_mask)
from dppa_ui.stats import collect_stats

# ======================================================================= independent references

_BLOCK = re.compile(r"\.(\d+)\.")


def ref_rank(a: torch.Tensor) -> torch.Tensor:
    """Rank of every entry (0 = largest), ties broken by lowest flat index (the documented rule)."""
    flat = a.reshape(-1).double().numpy()
    order = np.lexsort((np.arange(flat.size), -flat))        # primary: -value, then index
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    return torch.from_numpy(rank).view(a.shape)


def ref_k(density: float, n: int) -> int:
    """Entries kept at `density`: int(density*n), at least one when density > 0 (mergekit 0.1.5)."""
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def ref_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the int(density*n) largest |delta| (ties: lowest flat index)."""
    if density >= 1:
        return delta.clone()
    k = ref_k(density, delta.numel())
    return torch.where(ref_rank(delta.abs()) < k, delta, torch.zeros_like(delta))


def ref_ties_loops(deltas: torch.Tensor, weights, normalize: bool) -> torch.Tensor:
    """TIES sign election and disjoint mean, entry by entry in Python (float64)."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1).double().tolist()
    out = []
    for j in range(len(flat[0])):
        vals = [weights[i] * flat[i][j] for i in range(n)]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        agree = [i for i in range(n) if vals[i] != 0 and math.copysign(1.0, vals[i]) == elected]
        total = sum(vals[i] for i in agree)
        if normalize:
            div = sum(weights[i] for i in agree)
            total /= div if div != 0 else 1.0
        out.append(total)
    return torch.tensor(out, dtype=torch.float64).view(deltas.shape[1:])


def ref_ties_mergekit(deltas: torch.Tensor, weights, normalize: bool) -> torch.Tensor:
    """mergekit's generalized_task_arithmetic consensus (method 'sum'), transcribed."""
    w = torch.tensor(weights, dtype=deltas.dtype)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    wd = deltas * w
    majority = (wd.sum(dim=0) >= 0).to(wd.dtype) * 2 - 1
    mask = wd.sign() == majority
    mixed = (wd * mask).sum(dim=0)
    if normalize:
        div = (w * mask).sum(dim=0)
        div[div == 0] = 1
        mixed = mixed / div
    return mixed


def _ref_minmax(x: torch.Tensor) -> torch.Tensor:
    # official `normalize(x, dim=1)`; a zero range (0/0) gives 0 as the issue requires
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return torch.nan_to_num((x - lo) / (hi - lo), nan=0.0)


def _ref_clamp(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    # official `clamp` for 2-D input, with torch.sort
    d = x.size(1)
    s = torch.sort(x, dim=1).values
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def ref_pcb(flat: torch.Tensor, weights, ratio: float, clip: float = 0.0001) -> tuple[torch.Tensor, torch.Tensor]:
    """PCB-Merging's official pcb_merging (clamp/normalize/act as published), with per-task weights
    in the numerator only. Returns (merged, scale)."""
    n, d = flat.shape
    a = _ref_clamp(flat.abs(), clip, clip)
    clamped = torch.sign(flat) * a
    self_act = torch.exp(n * _ref_minmax(a) ** 2)
    cross_act = torch.tanh(flat * flat.sum(dim=0))
    scale = _ref_minmax(_ref_clamp(self_act * cross_act, 1 - ratio, 0))
    w = torch.tensor(weights, dtype=flat.dtype).view(-1, 1)
    merged = (w * clamped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return merged, scale


def _is_target(name, t):
    return t.dim() == 2 and _BLOCK.search(name) is not None


def ref_dp(deltas: dict[str, torch.Tensor], density: float, dp_lambda: float = 0.08, m: float = 5.0):
    """DP densities from the issue's formula, with plain Python loops. Returns {name: (d, raw)}."""
    targets = [n for n, t in deltas.items() if _is_target(n, t)]
    block = {n: int(_BLOCK.search(n).group(1)) for n in targets}
    vals = {n: [abs(x) for x in deltas[n].reshape(-1).tolist()] for n in targets}
    per_block: dict[int, list[float]] = {}
    for n in targets:
        per_block.setdefault(block[n], []).extend(vals[n])
    r = {}
    for b, v in per_block.items():
        mean = sum(v) / len(v)
        r[b] = 100.0 * sum(1 for x in v if x > 3 * mean) / len(v)
    rmean = sum(r.values()) / len(r)
    r = {b: x - rmean for b, x in r.items()}
    peak = max(abs(x) for x in r.values())
    if peak > 0:
        r = {b: x * dp_lambda / peak for b, x in r.items()}
    d_block = {b: density + x for b, x in r.items()}
    o = {}
    for n in targets:
        mean = sum(vals[n]) / len(vals[n])
        o[n] = 100.0 * sum(1 for x in vals[n] if x > m * mean) / len(vals[n])
    omean = sum(o.values()) / len(o)
    if omean != 0:
        o = {n: x / omean for n, x in o.items()}
    numel = {n: len(vals[n]) for n in targets}
    wmean = sum(o[n] * numel[n] for n in targets) / sum(numel.values())
    o = {n: x - wmean for n, x in o.items()}
    peak = max(abs(x) for x in o.values())
    if peak > 0:
        o = {n: x * dp_lambda / peak for n, x in o.items()}
    out = {}
    for n in targets:
        raw = o[n] + d_block[block[n]]
        out[n] = (min(max(raw, 0.0), 1.0), raw)
    return out


def ref_dpa(delta: torch.Tensor, keep: float, edges: list[float], alphas: list[float]) -> torch.Tensor:
    """Prune to int(keep*n) by rank, then band k = ranks in [int(e_{k-1} n), int(e_k n)) times alpha_k
    (the last band = every other kept entry)."""
    n = delta.numel()
    rank = ref_rank(delta.abs())
    out = torch.zeros_like(delta)
    kept = rank < ref_k(keep, n)
    factor = torch.full_like(delta, float(alphas[-1]))
    for e, a in reversed(list(zip(edges[:-1], alphas[:-1]))):
        factor = torch.where(rank < ref_k(min(max(e, 0.0), 1.0), n), float(a), factor)
    out[kept] = (delta * factor)[kept]
    return out


# ======================================================================= helpers

def heavy(shape, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi = torch.randn((3, *shape), generator=g).pow(2).sum(0).div(3).sqrt()
    return z / chi.clamp_min(1e-3) * scale


# Llama-shaped names on a small state dict: 2 blocks of 2-D weights, norms, embeddings, head.
SHAPES = {
    "model.embed_tokens.weight": (20, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (24, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 24),
    "model.layers.1.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.self_attn.o_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (24, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 24),
    "model.norm.weight": (8,),
    "lm_head.weight": (20, 8),
}


def make_sds(n_ft=3, seed=0, scale=0.01, outlier_rates=None):
    """A random base state dict and n fine-tunes with heavy-tailed deltas; each fine-tune gets
    its own extra outlier rate per module so DP's statistics differ between modules."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}
    fts = []
    for i in range(n_ft):
        ft = {}
        for j, (k, s) in enumerate(SHAPES.items()):
            d = heavy(s, 100 * seed + 10 * i + j, scale)
            rate = (outlier_rates or {}).get(k, 0.02 * ((j * 7 + i * 3) % 5))
            spikes = (torch.rand(s, generator=g) < rate) * torch.randn(s, generator=g) * 20 * scale
            ft[k] = base[k] + d + spikes
        fts.append(ft)
    return base, fts


def deltas_of(base, fts):
    return [{k: ft[k] - base[k] for k in base} for ft in fts]


def cfg(method=None, models=None, n=3, params=None, **top):
    models = models or [{"model": f"ft{i}", "parameters": {}} for i in range(n)]
    d = {"base_model": "base", "models": models, **top}
    if method:
        d["merge_method"] = method
    if params:
        d["parameters"] = params
    return load_config(d)


# ======================================================================= selection / magnitude

def test_keep_count_is_int_of_density_times_n():
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.29, 100) == int(0.29 * 100) == 28      # truncation, float product as written
    assert keep_count(0.001, 999) == 1          # mergekit 0.1.5: a positive density keeps at least one
    assert keep_count(0.0, 999) == 0 and keep_count(0.5, 0) == 0
    assert keep_count(1.0, 7) == 7


@pytest.mark.parametrize("shape,density,ties", [
    ((7, 13), 0.3, False), ((64, 32), 0.1, False), ((64, 32), 0.5, True),
    ((400, 400), 0.2, False),         # > 131072 entries: the sampled-bracket selection path
    ((400, 400), 0.07, True),         # same path with heavy ties (bf16-rounded values)
])
def test_magnitude_matches_full_argsort_reference(shape, density, ties):
    d = heavy(shape, 1)
    if ties:
        d = d.to(torch.bfloat16).float()
    assert torch.equal(magnitude_prune(d, density), ref_magnitude(d, density))
    assert int(magnitude_mask(d, density).sum()) == int(density * d.numel())


def test_magnitude_exact_count_under_massive_ties():
    d = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0] * 40).view(10, 20)   # every value repeated 40x
    for density in (0.05, 0.13, 0.37, 0.5, 0.81):
        k = int(density * d.numel())
        assert int(magnitude_mask(d, density).sum()) == k        # zeros may be kept too (k > 160)
        assert torch.equal(magnitude_mask(d, density), ref_rank(d.abs()) < k)   # ties: lowest index
        assert torch.equal(magnitude_prune(d, density), ref_magnitude(d, density))


def test_magnitude_large_tensor_with_ties_exact_count():
    # bf16 values (few distinct) over > 131072 entries exercise the bracket + tie fill path.
    d = heavy((600, 300), 3).to(torch.bfloat16).float()
    for density in (0.013, 0.25, 0.9):
        assert torch.equal(magnitude_prune(d, density), ref_magnitude(d, density))


def test_topk_mask_ties_across_chunks_on_big_tensor():
    # > 1M entries with 4 distinct values: the threshold value is shared by ~300k entries spread
    # over the whole tensor, so the tie fill has to walk several chunks; k on both sides of n/2.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (1200, 1000), generator=g).float()
    rank = ref_rank(x)
    for density in (0.3, 0.6):
        k = int(density * x.numel())
        m = topk_mask(x, k)
        assert int(m.sum()) == k
        assert torch.equal(m, rank < k)


def test_magnitude_bf16_input_tensor():
    d = heavy((300, 500), 5).to(torch.bfloat16)
    out = magnitude_prune(d, 0.2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), ref_magnitude(d.float(), 0.2))


def test_magnitude_tiny_density_keeps_the_largest_and_density_one():
    d = heavy((5, 7), 2)
    assert int(0.02 * 35) == 0
    out = magnitude_prune(d, 0.02)                 # mergekit 0.1.5: at least one entry survives
    assert torch.count_nonzero(out) == 1 and out.abs().max() == d.abs().max()
    assert torch.equal(magnitude_prune(d, 1.0), d)


def test_kth_largest_exact_on_large_tensor():
    x = heavy((1000, 200), 9)
    s = torch.sort(x.reshape(-1), descending=True).values
    for k in (1, 17, 20000, 123456, 200000):
        assert kth_largest(x, k).item() == s[k - 1].item()


def test_topk_mask_ties_lowest_index_first():
    m = topk_mask(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2)
    assert m.tolist() == [False, True, True, False, False]


# ======================================================================= DARE

def test_dare_kept_values_exactly_delta_over_density():
    d = heavy((300, 200), 4)
    density = 0.3
    out = dare_prune(d, density, tensor_generator(0, 0, "w"), rescale="paper")
    kept = out != 0
    assert torch.equal(out[kept], d[kept] / density)
    frac = kept.float().mean().item()
    sigma = math.sqrt(density * (1 - density) / d.numel())
    assert abs(frac - density) < 6 * sigma


def test_dare_mean_is_preserved():
    d = torch.full((400, 500), 0.5)
    out = dare_prune(d, 0.2, tensor_generator(1, 0, "w"), rescale="paper")
    # E[out] = d; the std of the mean is 0.5*sqrt(0.8/0.2/2e5) ~ 0.0022
    assert abs(out.mean().item() - 0.5) < 0.015
    # and per entry, over many independent masks
    acc = torch.zeros(50)
    for s in range(400):
        acc += dare_prune(torch.ones(50), 0.25, tensor_generator(s, 0, "v"), rescale="paper")
    assert torch.allclose(acc / 400, torch.ones(50), atol=0.45)
    assert abs((acc / 400).mean().item() - 1.0) < 0.1


def test_dare_rescale_modes():
    d = heavy((100, 80), 6)
    masks = {}
    for mode in ("paper", "l1", "none"):
        out = dare_prune(d, 0.4, tensor_generator(3, 1, "x"), rescale=mode)
        masks[mode] = out != 0
        kept = masks[mode]
        if mode == "paper":
            assert torch.equal(out[kept], d[kept] / 0.4)
        elif mode == "none":
            assert torch.equal(out[kept], d[kept])
        else:   # L1 norm of the pruned delta equals the original's; one common factor
            assert out.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
            ratio = out[kept] / d[kept]
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    assert torch.equal(masks["paper"], masks["l1"]) and torch.equal(masks["paper"], masks["none"])


def test_dare_density_one_is_identity():
    d = heavy((10, 10), 7)
    assert torch.equal(dare_prune(d, 1.0, tensor_generator(0, 0, "a")), d)


def test_dare_masks_depend_on_seed_model_index_and_name_only():
    shape, p = (64, 64), 0.5
    m = lambda seed, i, name: random_mask(shape, p, tensor_generator(seed, i, name))  # noqa: E731
    assert torch.equal(m(0, 0, "a.weight"), m(0, 0, "a.weight"))
    assert not torch.equal(m(0, 0, "a.weight"), m(0, 1, "a.weight"))
    assert not torch.equal(m(0, 0, "a.weight"), m(0, 0, "b.weight"))
    assert not torch.equal(m(0, 0, "a.weight"), m(1, 0, "a.weight"))


def test_dare_pipeline_masks_independent_of_tensor_order():
    base, fts = make_sds(2, seed=1)
    c = cfg("dare_linear", n=2, params={"density": 0.5})
    a = merge_in_memory(base, fts, c)
    order = list(reversed(list(base)))
    b = merge_in_memory({k: base[k] for k in order}, [{k: ft[k] for k in order} for ft in fts], c)
    assert all(torch.equal(a[k], b[k]) for k in base)
    # the two fine-tunes of one tensor get different masks, and a different seed changes them
    k = "model.layers.0.mlp.up_proj.weight"
    one = merge_in_memory(base, [fts[0], fts[0]], c)[k] - base[k]
    d0 = fts[0][k] - base[k]
    assert not torch.allclose(one, 2 * dare_prune(d0, 0.5, tensor_generator(0, 0, k)))
    c1 = cfg("dare_linear", n=2, params={"density": 0.5}, seed=1)
    assert not torch.equal(merge_in_memory(base, fts, c1)[k], a[k])


@pytest.mark.parametrize("rescale", [None, "paper", False])
def test_dare_pipeline_matches_reference_sum(rescale):
    """dare_linear's default rescale is mergekit's (L1 norm restored, `rescale: true`); the DARE
    paper's 1/density is `rescale: paper`; `false` keeps the kept values."""
    base, fts = make_sds(2, seed=2)
    params = {"density": 0.4, "weight": 0.7} | ({} if rescale is None else {"rescale": rescale})
    c = cfg("dare_linear", n=2, params=params, seed=5)
    out = merge_in_memory(base, fts, c)
    for k in base:
        ref = base[k].clone()
        for i, ft in enumerate(fts):
            d = ft[k] - base[k]
            mask = torch.rand(d.shape, generator=tensor_generator(5, i, k)) < 0.4
            kept = torch.where(mask, d, 0.0)
            if rescale is None:
                kept = kept * (d.abs().sum() / kept.abs().sum())
            elif rescale == "paper":
                kept = kept / 0.4
            ref += 0.7 * kept
        assert torch.allclose(out[k], ref, atol=1e-6), k


# ======================================================================= sum / task arithmetic

def test_sum_combine_weights_normalize_negative():
    d = torch.randn(3, 5, 4)
    w = [1.0, -0.5, 2.0]
    ref = sum(wi * di for wi, di in zip(w, d))
    assert torch.allclose(sum_combine(d, w), ref, atol=1e-6)
    assert torch.allclose(sum_combine(d, w, normalize=True), ref / 2.5, atol=1e-6)


def test_task_arithmetic_negation_and_lambda():
    base, fts = make_sds(1, seed=3)
    out = merge_in_memory(base, fts, cfg("task_arithmetic", models=[{"model": "ft", "parameters": {"weight": -1.0}}],
                                         params={"lambda": 0.5}))
    for k in base:
        assert torch.allclose(out[k], base[k] - 0.5 * (fts[0][k] - base[k]), atol=1e-6)


# ======================================================================= TIES

def test_sign_election_hand_made():
    d = torch.tensor([[1.0, -1.0, 0.0, 2.0, 0.0, 1.0],
                      [-1.0, -1.0, 0.0, -3.0, 0.0, -2.0]])
    # column sums: 0 (>= 0 counts +), -2, 0, -1, 0, -1
    assert elect_sign(d).tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    assert agreement_mask(d).tolist() == [[True, True, False, False, False, False],
                                          [False, True, False, True, False, True]]
    out = ties_combine(d, [1.0, 1.0], normalize=True)
    # no agreeing model (zeros never agree): divisor 1, value 0, no NaN
    assert out.tolist() == [1.0, -1.0, 0.0, -3.0, 0.0, -2.0]
    assert ties_combine(d, [1.0, 1.0], normalize=False).tolist() == [1.0, -2.0, 0.0, -3.0, 0.0, -2.0]


def test_sign_election_uses_weighted_deltas():
    d = torch.tensor([[1.0], [-1.5]])
    assert ties_combine(d, [2.0, 1.0], normalize=False).item() == 2.0   # 2*1 beats 1*-1.5
    assert ties_combine(d, [1.0, 1.0], normalize=False).item() == -1.5


@pytest.mark.parametrize("weights,normalize", [([1.0, 1.0, 1.0], True), ([0.3, 1.2, 0.5], True),
                                               ([1.0, -0.7, 0.4], True), ([0.3, 1.2, 0.5], False)])
def test_ties_combine_matches_references(weights, normalize):
    d = torch.stack([magnitude_prune(heavy((12, 17), s), 0.4) for s in range(3)])
    out = ties_combine(d, weights, normalize)
    assert torch.allclose(out, ref_ties_mergekit(d, weights, normalize), atol=1e-7)
    assert torch.allclose(out.double(), ref_ties_loops(d, weights, normalize), atol=1e-6)


def test_ties_pipeline_matches_mergekit_reference():
    base, fts = make_sds(3, seed=4)
    models = [{"model": f"ft{i}", "parameters": {"weight": w, "density": dn}}
              for i, (w, dn) in enumerate([(1.0, 0.3), (0.6, 0.5), (-0.4, 0.2)])]
    c = cfg("ties", models=models, params={"lambda": 0.9})
    assert c.get("normalize") is True
    out = merge_in_memory(base, fts, c)
    for k in base:
        d = torch.stack([ref_magnitude(ft[k] - base[k], m["parameters"]["density"]) for ft, m in zip(fts, models)])
        ref = base[k] + 0.9 * ref_ties_mergekit(d, [m["parameters"]["weight"] for m in models], True)
        assert torch.allclose(out[k], ref, atol=1e-6), k


def test_dare_ties_pipeline_matches_reference():
    base, fts = make_sds(2, seed=5)
    c = cfg("dare_ties", n=2, params={"density": 0.5}, seed=3)
    assert c.get("normalize") is False
    out = merge_in_memory(base, fts, c)
    for k in base:
        rows = []
        for i, ft in enumerate(fts):                  # mergekit's default: the L1 norm restored
            full = ft[k] - base[k]
            kept = torch.where(torch.rand(base[k].shape, generator=tensor_generator(3, i, k)) < 0.5, full, 0.0)
            rows.append(kept * (full.abs().sum() / kept.abs().sum()))
        d = torch.stack(rows)
        assert torch.allclose(out[k], base[k] + ref_ties_mergekit(d, [1.0, 1.0], False), atol=1e-6), k


# ======================================================================= PCB

@pytest.mark.parametrize("shape,ratio,weights", [((3, 40, 25), 0.1, [1.0, 1.0, 1.0]),
                                                 ((2, 333), 0.3, [0.5, 1.5]),
                                                 ((4, 20000), 0.1, [1.0, 0.2, -0.5, 2.0]),
                                                 ((3, 7), 0.5, [1.0, 1.0, 1.0])])
def test_pcb_matches_official_reference(shape, ratio, weights):
    d = torch.stack([heavy(shape[1:], 20 + s) for s in range(shape[0])])
    flat = d.reshape(shape[0], -1)
    ref, ref_scale = ref_pcb(flat, weights, ratio)
    out = pcb_combine(d, weights, ratio)
    assert out.shape == d.shape[1:]
    assert torch.allclose(out.reshape(-1), ref, rtol=1e-5, atol=1e-8)
    assert torch.allclose(pcb_scale(flat, ratio), ref_scale, rtol=1e-5, atol=1e-7)


def test_pcb_scale_range_and_kept_fraction():
    flat = torch.stack([heavy((1000,), s) for s in range(3)])
    scale = pcb_scale(flat, 0.2)
    assert scale.min().item() == 0.0 and scale.max().item() <= 1.0
    assert torch.all(scale.max(dim=1).values == 1.0)
    # entries below the row's int(d*(1-ratio))-th value are clipped up to it, then scaled to 0
    assert torch.all((scale > 0).sum(dim=1) <= 1000 - int(1000 * 0.8))


def test_pcb_zero_range_rows_give_zeros_not_nan():
    flat = torch.stack([torch.zeros(50), heavy((50,), 1), torch.full((50,), 0.3)])
    scale = pcb_scale(flat, 0.1)
    assert not torch.isnan(scale).any()
    assert torch.all(scale[0] == 0)
    out = pcb_combine(flat, [1.0, 1.0, 1.0], 0.1)
    assert not torch.isnan(out).any()
    ref, _ = ref_pcb(flat, [1.0, 1.0, 1.0], 0.1)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-8)
    # all rows zero: merged zero, no NaN
    assert torch.equal(pcb_combine(torch.zeros(2, 9), [1.0, 1.0]), torch.zeros(9))


def test_pcb_weights_only_in_numerator():
    d = torch.stack([heavy((30, 30), s) for s in range(3)])
    one = pcb_combine(d, [1.0, 1.0, 1.0])
    assert torch.allclose(pcb_combine(d, [2.0, 2.0, 2.0]), 2 * one, rtol=1e-6, atol=1e-9)
    # a weight of 0 removes the task from the numerator only: its scale still counts below
    flat = d.reshape(3, -1)
    _, scale = ref_pcb(flat, [1.0, 1.0, 1.0], 0.1)
    a = _ref_clamp(flat.abs(), 0.0001, 0.0001)
    num = (torch.sign(flat[:2]) * a[:2] * scale[:2]).sum(0)
    expect = num / torch.clamp(scale.sum(0), min=1e-12)
    assert torch.allclose(pcb_combine(d, [1.0, 1.0, 0.0]).reshape(-1), expect, rtol=1e-5, atol=1e-8)


def test_pcb_pipeline_tensor_and_model_scope():
    base, fts = make_sds(3, seed=6)
    for scope in ("tensor", "model"):
        c = cfg("pcb", models=[{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate([1.0, 0.5, 0.8])],
                params={"pcb_ratio": 0.2, "lambda": 1.1, "scope": scope})
        out = merge_in_memory(base, fts, c)
        if scope == "tensor":
            for k in base:
                flat = torch.stack([(ft[k] - base[k]).reshape(-1) for ft in fts])
                ref = base[k] + 1.1 * ref_pcb(flat, [1.0, 0.5, 0.8], 0.2)[0].view(base[k].shape)
                assert torch.allclose(out[k], ref, rtol=1e-5, atol=1e-7), k
        else:
            flat = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in base]) for ft in fts])
            merged = 1.1 * ref_pcb(flat, [1.0, 0.5, 0.8], 0.2)[0]
            pos = 0
            for k in base:
                n = base[k].numel()
                assert torch.allclose(out[k], base[k] + merged[pos:pos + n].view(base[k].shape),
                                      rtol=1e-5, atol=1e-7), k
                pos += n


@pytest.mark.parametrize("clip", [0.0, 0.01, 0.05])
def test_pcb_clip_ratio_matches_official_clamp(clip):
    flat = heavy((3, 400), 31)
    got = pcb_combine(flat, [1.0, 0.7, 1.2], 0.2, clip_ratio=clip)
    assert torch.allclose(got, ref_pcb(flat, [1.0, 0.7, 1.2], 0.2, clip)[0], rtol=1e-5, atol=1e-8)
    base, fts = make_sds(2, seed=19)
    out = merge_in_memory(base, fts, cfg("pcb", n=2, params={"clip_ratio": clip, "pcb_ratio": 0.3, "scope": "tensor"}))
    k = "model.layers.0.mlp.up_proj.weight"
    flat = torch.stack([(ft[k] - base[k]).reshape(-1) for ft in fts])
    assert torch.allclose(out[k], base[k] + ref_pcb(flat, [1.0, 1.0], 0.3, clip)[0].view(base[k].shape),
                          rtol=1e-5, atol=1e-7)


def test_pcb_model_scope_drops_tied_duplicates():
    # T5-shaped: encoder/decoder embed_tokens are tied to `shared` (equal values here, shared
    # storage in the base): the official remove_keys leaves them out of the flattened vector and
    # gives them shared's merged values.
    base, fts = make_sds(2, seed=23)
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    for sd in (base, *fts):
        sd["shared.weight"] = sd.pop("model.embed_tokens.weight")
    base["encoder.embed_tokens.weight"] = base["decoder.embed_tokens.weight"] = base["shared.weight"]
    for ft in fts:
        for k in tied:
            ft[k] = ft["shared.weight"].clone()
    out = merge_in_memory(base, fts, cfg("pcb", n=2, params={"scope": "model", "pcb_ratio": 0.2}))
    assert list(out) == list(base)
    keys = [k for k in base if k not in tied]
    flat = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in keys]) for ft in fts])
    merged, pos = ref_pcb(flat, [1.0, 1.0], 0.2)[0], 0
    for k in keys:
        n = base[k].numel()
        assert torch.allclose(out[k], base[k] + merged[pos:pos + n].view(base[k].shape), rtol=1e-5, atol=1e-7), k
        pos += n
    for k in tied:
        assert torch.equal(out[k], out["shared.weight"])
    # An untied copy that differs in one fine-tune is a tensor of its own.
    fts[1]["decoder.embed_tokens.weight"] = fts[1]["decoder.embed_tokens.weight"] + 0.01
    out2 = merge_in_memory(base, fts, cfg("pcb", n=2, params={"scope": "model", "pcb_ratio": 0.2}))
    assert not torch.equal(out2["decoder.embed_tokens.weight"], out2["shared.weight"])
    assert torch.equal(out2["encoder.embed_tokens.weight"], out2["shared.weight"])


# ======================================================================= DP

def test_dp_densities_hand_computed():
    block_pct = {"m.0": 10.0, "m.1": 30.0}
    module_pct = {"m.0.a": 2.0, "m.0.b": 6.0, "m.1.c": 4.0, "m.1.d": 4.0}
    numel = {"m.0.a": 100, "m.0.b": 300, "m.1.c": 200, "m.1.d": 400}
    # r centred {-10, 10} -> scaled {-0.08, 0.08}: D_0 = 0.12, D_1 = 0.28
    # o / mean(o)=4 -> {0.5, 1.5, 1, 1}; numel-weighted mean 1.1 -> {-0.6, 0.4, -0.1, -0.1};
    # max|o| = 0.6 -> x 0.08/0.6
    out = dp_densities(block_pct, module_pct, numel, 0.2, 0.08)
    expect = {"m.0.a": 0.12 - 0.08, "m.0.b": 0.12 + 0.4 * 0.08 / 0.6,
              "m.1.c": 0.28 - 0.1 * 0.08 / 0.6, "m.1.d": 0.28 - 0.1 * 0.08 / 0.6}
    assert set(out) == set(expect)
    for n, d in expect.items():
        assert out[n].density == pytest.approx(d, abs=1e-12)
        assert out[n].offset == pytest.approx(d - 0.2, abs=1e-12)
        assert not out[n].clamped


def test_dp_zero_spread_skips_scaling():
    out = dp_densities({"x.3": 12.0}, {"x.3.a": 5.0, "x.3.b": 5.0}, {"x.3.a": 10, "x.3.b": 30}, 0.3, 0.08)
    assert all(v.density == pytest.approx(0.3) and v.offset == pytest.approx(0.0) for v in out.values())
    out = dp_densities({"x.0": 0.0, "x.1": 0.0}, {"x.0.a": 0.0, "x.1.b": 0.0}, {"x.0.a": 10, "x.1.b": 30}, 0.3, 0.08)
    assert all(v.density == pytest.approx(0.3) for v in out.values())


@pytest.mark.parametrize("density,lam,m", [(0.2, 0.08, 5.0), (0.5, 0.2, 3.0), (0.1, 0.05, 5.0)])
def test_dp_densities_from_deltas_match_python_formula(density, lam, m):
    base, fts = make_sds(1, seed=7)
    deltas = deltas_of(base, fts)[0]
    ref = ref_dp(deltas, density, lam, m)
    out = dp_densities_from_deltas(deltas, density, lam, m)
    assert set(out) == set(ref) == {k for k, s in SHAPES.items() if len(s) == 2 and ".layers." in k}
    for n, (d, raw) in ref.items():
        assert out[n].density == pytest.approx(d, abs=1e-9), n
        assert out[n].offset == pytest.approx(raw - density, abs=1e-9), n
    assert len({round(v.density, 9) for v in out.values()}) > 2        # the formula actually varies


def test_dp_stats_pass_matches_python_formula():
    base, fts = make_sds(2, seed=8)
    stats = collect_stats(list(base), lambda n: (base[n], [f[n] for f in fts]), ["a", "b"], 5.0)
    for s, deltas in zip(stats, deltas_of(base, fts)):
        ref = ref_dp(deltas, 0.3, 0.08, 5.0)
        got = s.dp_map(0.3, 0.08)
        assert set(got) == set(ref)
        for n, (d, raw) in ref.items():
            assert got[n].density == pytest.approx(d, abs=1e-6), n
            assert got[n].offset == pytest.approx(raw - 0.3, abs=1e-6), n


def test_dp_clamps_and_warns_at_zero():
    with pytest.warns(UserWarning, match="density 0"):
        out = dp_densities({"x.0": 0.0, "x.1": 50.0}, {"x.0.a": 9.0, "x.0.b": 0.0, "x.1.c": 1.0},
                           {"x.0.a": 10, "x.0.b": 10, "x.1.c": 10}, 0.05, 0.2)
    low = [v for v in out.values() if v.density == 0.0]
    assert low and all(v.clamped and v.offset < -0.05 for v in low)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hi = dp_densities({"x.0": 0.0, "x.1": 50.0}, {"x.0.a": 0.0, "x.1.b": 9.0, "x.1.c": 9.0},
                          {"x.0.a": 10, "x.1.b": 10, "x.1.c": 10}, 0.98, 0.2)
    top = [v for v in hi.values() if v.density == 1.0]
    assert top and all(v.clamped and v.offset > 0.02 for v in top)
    assert all(0.0 <= v.density <= 1.0 for v in hi.values())


# Multi-stack names: a multimodal model (vision tower + language model) and an encoder-decoder.
MULTIMODAL = {
    "model.vision_tower.embeddings.patch_embedding.weight": (8, 12),
    **{f"model.vision_tower.layers.{b}.{m}.weight": s for b in range(3)
       for m, s in (("self_attn.q_proj", (8, 8)), ("mlp.fc1", (16, 8)), ("layer_norm1", (8,)))},
    "model.multi_modal_projector.linear_1.weight": (8, 8),
    "model.language_model.embed_tokens.weight": (20, 8),
    **{f"model.language_model.layers.{b}.{m}.weight": s for b in range(2)
       for m, s in (("self_attn.q_proj", (8, 8)), ("self_attn.o_proj", (8, 8)), ("mlp.up_proj", (24, 8)),
                    ("input_layernorm", (8,)))},
    "lm_head.weight": (20, 8),
}
ENCODER_DECODER = {
    "shared.weight": (20, 8),
    **{f"{stack}.block.{b}.layer.{j}.{m}.weight": s for stack in ("encoder", "decoder") for b in range(2)
       for j, m, s in ((0, "SelfAttention.q", (8, 8)), (0, "SelfAttention.o", (8, 8)), (1, "DenseReluDense.wi", (16, 8)),
                       (0, "layer_norm", (8,)))},
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (4, 2),
    "encoder.final_layer_norm.weight": (8,),
}


def multi_stack_deltas(shapes, seed):
    out = {}
    for j, (k, s) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(1000 * seed + j)
        rate = 0.01 * (j % 6)
        out[k] = heavy(s, 1000 * seed + j) + (torch.rand(s, generator=g) < rate) * torch.randn(s, generator=g) * 0.3
    return out


def ref_dp_per_stack(deltas, density, dp_lambda=0.08, m=5.0):
    """The official DP run on each stack as if it were the model's one `model.layers`."""
    stacks: dict[str, dict] = {}
    for n, t in deltas.items():
        hit = _BLOCK.search(n)
        if hit and t.dim() == 2:
            stacks.setdefault(n[:hit.start()], {})[n] = t
    out = {}
    for sub in stacks.values():
        out.update(ref_dp(sub, density, dp_lambda, m))
    return out


@pytest.mark.parametrize("shapes,stacks", [(MULTIMODAL, {"model.vision_tower.layers", "model.language_model.layers"}),
                                           (ENCODER_DECODER, {"encoder.block", "decoder.block"})])
def test_dp_blocks_are_keyed_per_stack(shapes, stacks):
    from dppa_ui.methods import block_key, block_of
    from dppa_ui.stats import DeltaStats
    import json
    keys = {block_key(n) for n in shapes if block_key(n)}
    assert {k.rsplit(".", 1)[0] for k in keys} == stacks
    assert block_key("model.vision_tower.layers.1.mlp.fc1.weight") == "model.vision_tower.layers.1"
    assert block_key("decoder.block.1.layer.0.SelfAttention.q.weight") == "decoder.block.1"
    assert block_of("decoder.block.1.layer.0.SelfAttention.q.weight") == 1
    deltas = multi_stack_deltas(shapes, 3)
    ref = ref_dp_per_stack(deltas, 0.3, 0.1, 5.0)
    got = dp_densities_from_deltas(deltas, 0.3, 0.1, 5.0)
    assert set(got) == set(ref)
    for n, (d, raw) in ref.items():
        assert got[n].density == pytest.approx(d, abs=1e-9), n
        assert got[n].offset == pytest.approx(raw - 0.3, abs=1e-9), n
    # Each stack keeps the target density on average over its blocks (the official single-stack rule).
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    (st,) = collect_stats(list(base), lambda n: (base[n], [deltas[n]]), ["ft"], 5.0)
    assert set(st.block_pct) == keys
    from_stats = st.dp_map(0.3, 0.1)
    for n, (d, raw) in ref.items():
        assert from_stats[n].density == pytest.approx(d, abs=1e-6), n
    # JSON round trip keeps the block keys; a file from before (block numbers, one stack) still loads.
    again = DeltaStats.from_json(json.loads(json.dumps(st.to_json())))
    assert again.block_pct == st.block_pct and again.dp_map(0.3, 0.1) == from_stats
    assert again.tensors == st.tensors


def test_stats_json_with_block_numbers_still_loads():
    from dppa_ui.stats import DeltaStats
    base, fts = make_sds(1, seed=5)
    (st,) = collect_stats(list(base), lambda n: (base[n], [fts[0][n]]), ["ft"], 5.0)
    old = st.to_json()
    old["block_pct"] = {k.rsplit(".", 1)[1]: v for k, v in old["block_pct"].items()}
    for t in old["tensors"].values():
        t.pop("block_key")
    again = DeltaStats.from_json(old)
    assert again.block_pct == st.block_pct == {"model.layers.0": pytest.approx(st.block_pct["model.layers.0"]),
                                               "model.layers.1": pytest.approx(st.block_pct["model.layers.1"])}
    assert again.dp_map(0.2, 0.08) == st.dp_map(0.2, 0.08)


@pytest.mark.parametrize("others,m", [("keep", 5.0), ("magnitude", 5.0), ("keep", 3.0)])
def test_dp_pipeline_matches_reference(others, m):
    base, fts = make_sds(2, seed=9)
    c = cfg("dp", models=[{"model": "a", "parameters": {"density": 0.3, "weight": 0.8}},
                          {"model": "b", "parameters": {"density": 0.5, "weight": 1.2}}],
            params={"dp_others": others, "dp_lambda": 0.1, "dp_outlier_m": m})
    out = merge_in_memory(base, fts, c)
    deltas = deltas_of(base, fts)
    dens = [ref_dp(deltas[0], 0.3, 0.1, m), ref_dp(deltas[1], 0.5, 0.1, m)]
    for k in base:
        ref = base[k].clone()
        for i, (w, dn) in enumerate([(0.8, 0.3), (1.2, 0.5)]):
            if k in dens[i]:
                p = ref_magnitude(deltas[i][k], dens[i][k][0])
            else:
                p = deltas[i][k] if others == "keep" else ref_magnitude(deltas[i][k], dn)
            ref = ref + w * p
        assert torch.allclose(out[k], ref, atol=1e-6), k


# ======================================================================= DPA

def test_band_edges_shift_and_clamp():
    assert band_edges([0.1, 0.2], 0.0) == [0.1, 0.2]
    assert band_edges([0.1, 0.2], -0.15) == [0.0, pytest.approx(0.05)]
    assert band_edges([0.5, 0.9], 0.2) == [pytest.approx(0.7), 1.0]


def test_dpa_band_values_by_rank():
    d = heavy((10, 10), 11)
    pruned = magnitude_prune(d, 0.2)
    out = dpa_amplify(pruned, [0.1, 0.2], [1.8, 1.1])
    rank = ref_rank(d.abs())
    assert torch.equal(out[rank < 10], d[rank < 10] * 1.8)
    band2 = (rank >= 10) & (rank < 20)
    assert torch.equal(out[band2], d[band2] * 1.1)
    assert torch.count_nonzero(out[rank >= 20]) == 0
    assert torch.allclose(out, ref_dpa(d, 0.2, [0.1, 0.2], [1.8, 1.1]))


def test_dpa_three_bands_and_ties():
    d = torch.tensor([3.0, -1.0, 3.0, 2.0, -3.0, 1.0, 2.0, -2.0, 0.5, 3.0] * 5)
    parts, alphas = [0.1, 0.3, 0.6], [2.0, 0.5, 1.3]
    out = dpa_amplify(magnitude_prune(d, 0.6), parts, alphas)
    assert torch.allclose(out, ref_dpa(d, 0.6, parts, alphas))


def test_dpa_bands_shifted_by_offset():
    d = heavy((20, 10), 12)
    for offset in (0.05, -0.04, -0.15):
        keep = min(max(0.2 + offset, 0.0), 1.0)
        pruned = magnitude_prune(d, keep)
        out = dpa_amplify(pruned, [0.1, 0.2], [1.7, 1.2], offset)
        edges = [0.1 + offset, 0.2 + offset]
        assert torch.allclose(out, ref_dpa(d, keep, edges, [1.7, 1.2])), offset
        rank = ref_rank(d.abs())
        top = rank < ref_k(max(0.1 + offset, 0.0), d.numel())
        assert torch.equal(out[top], d[top] * 1.7)


def ref_enhance_offset(copies: list[torch.Tensor], alphas: list[float]) -> torch.Tensor:
    """The official enhance_offset.py on one tensor: start from zeros, then for the widest copy
    first, x = my_max(x, copy * alpha), where my_max keeps x unless the new value is larger in
    magnitude or x is 0 there (and skips a new value that is all zeros)."""
    x = [0.0] * copies[0].numel()
    for copy, a in reversed(list(zip(copies, alphas))):
        y = [v * a for v in copy.reshape(-1).tolist()]
        if not any(v != 0 for v in y):
            continue
        x = [yv if (abs(yv) > abs(xv) or (yv != 0 and xv == 0)) else xv for xv, yv in zip(x, y)]
    return torch.tensor(x, dtype=copies[0].dtype).view(copies[0].shape)


def test_official_whole_tensor_factor_is_the_largest_alpha():
    # A tensor DP keeps whole is whole in every pruned copy, so the official max-merge scales it
    # by the largest alpha (and by the only non-zero one when the other is 0).
    d = heavy((6, 5), 21)
    for alphas in ([1.8, 0.0], [1.8, 1.0], [0.9, 1.3], [0.0, 0.0]):
        assert torch.allclose(ref_enhance_offset([d, d], alphas), d * max(alphas)), alphas


@pytest.mark.parametrize("others,whole", [("keep", "amplify"), ("keep", "keep"), ("magnitude", "amplify")])
def test_dppa_pipeline_matches_reference(others, whole):
    base, fts = make_sds(2, seed=13)
    models = [{"model": "a", "parameters": {"density": 0.2, "partitions": [0.1, 0.2], "amplification": [1.8, 1.0]}},
              {"model": "b", "parameters": {"density": 0.4, "partitions": [0.15, 0.4], "amplification": [1.5, 1.2],
                                            "weight": 0.7}}]
    c = cfg("dppa", models=models, params={"dp_others": others, "dpa_whole": whole})
    out = merge_in_memory(base, fts, c)
    deltas = deltas_of(base, fts)
    for k in base:
        ref = base[k].clone()
        for i, m in enumerate(models):
            p = m["parameters"]
            dens = ref_dp(deltas[i], p["density"])
            if k in dens:         # DP target: own density, band edges shifted by its offset
                d_m, raw = dens[k]
                off = raw - p["density"]
                q = ref_dpa(deltas[i][k], d_m, [f + off for f in p["partitions"]], p["amplification"])
            elif others == "keep":   # left whole: the official max-merge of whole copies, or x1 (keep)
                q = ref_enhance_offset([deltas[i][k]] * 2, p["amplification"]) if whole == "amplify" else deltas[i][k]
            else:                    # plain magnitude at the target density, bands unshifted
                q = ref_dpa(deltas[i][k], p["density"], p["partitions"], p["amplification"])
            ref = ref + p.get("weight", 1.0) * q
        assert torch.allclose(out[k], ref, atol=1e-6), k


@pytest.mark.parametrize("alphas", [[1.0, 2.0], [1.9, 2.4], [1.3, 0.5, 2.0], [2.0, 0.6, 1.1]])
def test_dpa_band_factor_is_the_official_max_of_the_pruned_copies(alphas):
    # The official enhance_offset.py prunes at every edge, scales each copy by its alpha and keeps
    # the larger magnitude: a band gets the largest alpha of it and the bands below (the top band
    # max(alpha_1, alpha_2) when alpha_2 > alpha_1). `dpa_bands: own` scales each band by its own.
    d = heavy((12, 10), 31)
    parts = [0.1, 0.25, 0.4][-len(alphas):] if len(alphas) == 3 else [0.15, 0.4]
    pruned = magnitude_prune(d, parts[-1])
    official = ref_enhance_offset([ref_magnitude(d, f) for f in parts], alphas)
    assert torch.allclose(dpa_amplify(pruned, parts, band_factors(alphas)), official)
    assert torch.allclose(dpa_amplify(pruned, parts, band_factors(alphas, "own")), ref_dpa(d, parts[-1], parts, alphas))
    assert band_factors([1.9, 2.4]) == [2.4, 2.4] and band_factors([1.9, 2.4], "own") == [1.9, 2.4]


@pytest.mark.parametrize("rule", [None, "max", "own"])
def test_dppa_pipeline_top_band_when_alpha_rises(rule):
    # a walk can end at [1.9, 2.4]: the default (official) top band gets 2.4 on DP targets, whose
    # copies are pruned at the edges shifted by the module's DP offset; tensors kept whole get max too
    base, fts = make_sds(1, seed=17)
    p = {"density": 0.3, "partitions": [0.1, 0.3], "amplification": [1.9, 2.4]}
    c = cfg("dppa", models=[{"model": "a", "parameters": p}], params={"dpa_bands": rule} if rule else None)
    assert c.get("dpa_bands") == (rule or "max")
    out = merge_in_memory(base, fts, c)
    delta = deltas_of(base, fts)[0]
    dens = ref_dp(delta, p["density"])
    for k in base:
        if k in dens:
            d_m, raw = dens[k]
            edges = [min(max(f + raw - p["density"], 0.0), 1.0) for f in p["partitions"]]
            want = (ref_dpa(delta[k], d_m, edges, p["amplification"]) if rule == "own" else
                    ref_enhance_offset([ref_magnitude(delta[k], e) for e in edges], p["amplification"]))
        else:
            want = delta[k] * 2.4
        assert torch.allclose(out[k], base[k] + want, atol=1e-6), k
    # the bands the Inspect view reports are the ones applied
    from dppa_ui.pipeline import tensor_fates
    mag = load_config({"prune": "magnitude", "amplify": "dpa", "combine": "sum", "base_model": "b",
                       "models": [{"model": "a", "parameters": p}], "parameters": {"dpa_bands": rule} if rule else {}})
    fate = tensor_fates(mag, "x.weight", (10, 10), None)[0]
    assert [a for _, _, a in fate.bands] == ([1.9, 2.4] if rule == "own" else [2.4, 2.4])


def test_tensor_fates_and_kept_fraction_count_a_zero_band_as_dropped():
    from dppa_ui.pipeline import kept_fraction, tensor_fates
    models = [{"model": "a", "parameters": {"density": 0.3, "partitions": [0.1, 0.3], "amplification": [2.0, 0.0]}},
              {"model": "c", "parameters": {"density": 0.3, "partitions": [0.1, 0.3], "amplification": [2.0, 1.0]}}]
    c = load_config({"prune": "magnitude", "amplify": "dpa", "combine": "sum", "base_model": "b", "models": models})
    shapes = {"x.weight": (10, 10), "y.weight": (7,)}
    # a: only its top band survives, int(0.1*100) + max(1, int(0.1*7)) (keep_count keeps at least one
    # entry, as mergekit); c: int(0.3*100) + int(0.3*7)
    assert kept_fraction(c, shapes, None) == pytest.approx([(10 + 1) / 107, (30 + 2) / 107])
    fa, fc = tensor_fates(c, "x.weight", (10, 10), None)
    assert fa.pruned and fa.density == 0.3 and fa.bands == ((0.0, 0.1, 2.0), (0.1, 0.3, 0.0))
    assert fa.kept == pytest.approx(0.1) and fc.kept == pytest.approx(0.3) and fa.amplified


@pytest.mark.parametrize("whole,alphas", [("amplify", [1.5, 0.0]), ("keep", [1.5, 0.0]), ("amplify", [0.0, 0.0]),
                                          ("amplify", [1.2, 1.4])])
def test_dp_kept_fraction_and_fates_match_the_merged_tensors(whole, alphas):
    from dppa_ui.pipeline import dp_maps_from_stats, kept_fraction, tensor_fates
    base, fts = make_sds(1, seed=15)
    c = cfg("dppa", models=[{"model": "a", "parameters": {"density": 0.3, "partitions": [0.1, 0.3],
                                                           "amplification": alphas}}],
            params={"dpa_whole": whole})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = merge_in_memory(base, fts, c)
        stats = collect_stats(list(base), lambda n: (base[n], [fts[0][n]]), ["a"], 5.0)
        maps = dp_maps_from_stats(c, stats)
    changed = sum(int((out[k] != base[k]).sum()) for k in base)
    total = sum(t.numel() for t in base.values())
    assert kept_fraction(c, {k: tuple(t.shape) for k, t in base.items()}, maps)[0] == pytest.approx(changed / total)
    (norm,) = tensor_fates(c, "model.norm.weight", (8,), maps)
    factor = max(alphas) if whole == "amplify" else 1.0
    assert not norm.pruned and norm.bands == ((0.0, 1.0, factor),) and norm.kept == (1.0 if factor else 0.0)
    assert torch.allclose(out["model.norm.weight"], base["model.norm.weight"]
                          + factor * (fts[0]["model.norm.weight"] - base["model.norm.weight"]))
    (q,) = tensor_fates(c, "model.layers.0.self_attn.q_proj.weight", (8, 8), maps)
    assert q.pruned and q.density == maps[0]["model.layers.0.self_attn.q_proj.weight"].density
    assert [a for _, _, a in q.bands] == [max(alphas), alphas[1]]      # the official top band: max(a1, a2)


def test_magnitude_dpa_explicit_stages_match_reference():
    base, fts = make_sds(1, seed=14)
    c = load_config({"prune": "magnitude", "amplify": "dpa", "combine": "sum", "base_model": "b",
                     "models": [{"model": "a", "parameters": {"density": 0.3, "partitions": [0.1, 0.3],
                                                              "amplification": [2.0, 0.5]}}]})
    out = merge_in_memory(base, fts, c)
    for k in base:
        ref = base[k] + ref_dpa(fts[0][k] - base[k], 0.3, [0.1, 0.3], [2.0, 0.5])
        assert torch.allclose(out[k], ref, atol=1e-6), k


@pytest.mark.parametrize("prune,combine,scope", [("dp", "ties", None), ("magnitude", "pcb", "tensor"),
                                                 ("random", "pcb", "tensor"), ("dp", "pcb", "tensor"),
                                                 ("magnitude", "pcb", "model"), ("random", "pcb", "model"),
                                                 ("dp", "pcb", "model"), ("magnitude", "sum", None)])
def test_explicit_stage_compositions_match_reference(prune, combine, scope):
    base, fts = make_sds(3, seed=17)
    weights, dens = [1.0, 0.5, 0.8], [0.3, 0.5, 0.4]
    c = load_config({"prune": prune, "combine": combine, "base_model": "b", "seed": 2,
                     "parameters": {"lambda": 0.8, "pcb_ratio": 0.3, **({"scope": scope} if scope else {})},
                     "models": [{"model": f"m{i}", "parameters": {"weight": w, "density": d}}
                                for i, (w, d) in enumerate(zip(weights, dens))]})
    out = merge_in_memory(base, fts, c)
    deltas = deltas_of(base, fts)
    dp = [ref_dp(deltas[i], dens[i]) for i in range(3)]
    stacks = {}
    for k in base:
        ps = []
        for i in range(3):
            d = deltas[i][k]
            if prune == "magnitude":
                ps.append(ref_magnitude(d, dens[i]))
            elif prune == "random":        # a random prune restores the L1 norm by default (mergekit)
                mask = torch.rand(d.shape, generator=tensor_generator(2, i, k)) < dens[i]
                kept = torch.where(mask, d, 0.0)
                ps.append(kept * (d.abs().sum() / kept.abs().sum()) if kept.abs().sum() >= 1e-7 else kept)
            else:
                ps.append(ref_magnitude(d, dp[i][k][0]) if k in dp[i] else d)
        stacks[k] = stack = torch.stack(ps)
        if scope == "model":      # the official flattening: every tensor's pruned deltas in one row per model
            continue
        if combine == "ties":
            merged = ref_ties_mergekit(stack, weights, c.get("normalize"))
        elif combine == "pcb":
            merged = ref_pcb(stack.reshape(3, -1), weights, 0.3)[0].view(base[k].shape)
        else:
            merged = sum(w * p for w, p in zip(weights, ps))
        assert torch.allclose(out[k], base[k] + 0.8 * merged, rtol=1e-5, atol=1e-6), k
    if scope == "model":
        merged, pos = ref_pcb(torch.cat([stacks[k].reshape(3, -1) for k in base], dim=1), weights, 0.3)[0], 0
        for k in base:
            n = base[k].numel()
            assert torch.allclose(out[k], base[k] + 0.8 * merged[pos:pos + n].view(base[k].shape),
                                  rtol=1e-5, atol=1e-6), k
            pos += n


# ======================================================================= greedy alpha search

def quad(a):
    return 10 - (a[0] - 2.1) ** 2 - (a[1] - 1.3) ** 2


def ref_python_contral(score, start, step=0.1):
    """The official python_contral.py loop, transcribed (its `.1f` model keys read as rounding;
    here to 6 decimals). Returns (end state, every alpha scored)."""
    alpha, idx, perfermence, tried = list(start), 0, 0, []
    while idx < len(alpha):
        tried.append(list(alpha))
        temp = score(alpha)
        if temp > perfermence:
            perfermence = temp
            alpha[idx] = round(alpha[idx] + step, 6)
        else:
            if alpha[idx] > 1:
                alpha[idx] = round(alpha[idx] - step, 6)
            idx += 1
            if idx < len(alpha):
                alpha[idx] = 1 if alpha[idx] < 0.1 else round(alpha[idx] + step, 6)
    return alpha, tried


def hand_path():
    # simulated by hand from python_contral.py, start [1.8, 0.0], step 0.1
    alphas = [[1.8, 0.0], [1.9, 0.0], [2.0, 0.0], [2.1, 0.0], [2.2, 0.0],     # 2.2 worse: back to 2.1, k=1
              [2.1, 1.0], [2.1, 1.1], [2.1, 1.2], [2.1, 1.3], [2.1, 1.4]]     # 1.4 worse: back to 1.3, stop
    return alphas


def test_greedy_alpha_search_path_on_quadratic():
    res = greedy_alpha_search(quad)
    path = [a for a, _ in res.path]
    assert len(path) == len(hand_path())
    for got, want in zip(path, hand_path()):
        assert got == pytest.approx(want, abs=1e-9)
    assert res.alpha == pytest.approx([2.1, 1.3], abs=1e-9)
    assert res.score == pytest.approx(10.0, abs=1e-12)
    assert [s for _, s in res.path] == pytest.approx([quad(a) for a in hand_path()], abs=1e-9)
    end, tried = ref_python_contral(quad, [1.8, 0.0])
    assert path == [pytest.approx(t, abs=1e-9) for t in tried] and res.alpha == pytest.approx(end, abs=1e-9)


def test_greedy_walk_returns_the_end_state_not_the_best():
    # The second band starts at 1.0 and is worse there than at 0.0: the official walk still ends
    # at 1.0 (1.0 is not > 1, so it does not step back); `best` mode returns [2.0, 0.0].
    def score(a):
        return 5 - (a[0] - 2.0) ** 2 - 0.5 * a[1]
    end, tried = ref_python_contral(score, [1.8, 0.0])
    res = greedy_alpha_search(score)
    assert [a for a, _ in res.path] == [pytest.approx(t, abs=1e-9) for t in tried]
    assert end == pytest.approx([2.0, 1.0]) and res.alpha == pytest.approx(end, abs=1e-9)
    assert res.score == pytest.approx(score([2.0, 1.0])) and res.best == pytest.approx([2.0, 0.0])
    best = greedy_alpha_search(score, mode="best")
    assert best.alpha == pytest.approx([2.0, 0.0]) and best.score == pytest.approx(5.0)
    # A first step that does not beat the official floor of 0 still steps the band down by one.
    res0 = greedy_alpha_search(lambda a: 0.0, n_bands=1)
    assert [a for a, _ in res0.path] == [[1.8]] and res0.alpha == pytest.approx([1.7]) and res0.score is None


def test_greedy_alpha_search_eval_cap():
    calls = []
    res = greedy_alpha_search(lambda a: calls.append(list(a)) or quad(a), max_evals=4)
    assert len(calls) == 4 and len(res.path) == 4
    assert res.alpha == pytest.approx([2.1, 0.0], abs=1e-9)      # cut short: the best point scored
    assert res.score == pytest.approx(quad([2.1, 0.0]), abs=1e-9)


def test_greedy_alpha_search_flat_score():
    # first score beats the floor 0, the second ties (not better): alpha[0] > 1 steps back, the
    # next band starts at 1.0 (it was < 0.1), which does not beat the best either; 1.0 is not > 1,
    # so the walk ends at [1.8, 1.0] (the best seen was [1.8, 0.0]).
    res = greedy_alpha_search(lambda a: 0.5)
    assert [a for a, _ in res.path] == [pytest.approx([1.8, 0.0]), pytest.approx([1.9, 0.0]),
                                        pytest.approx([1.8, 1.0])]
    assert res.alpha == pytest.approx([1.8, 1.0]) and res.best == pytest.approx([1.8, 0.0])
    assert ref_python_contral(lambda a: 0.5, [1.8, 0.0])[0] == pytest.approx(res.alpha)


def test_greedy_alpha_search_start_step_and_bands():
    # from [1.0, 0.6, 0.0] with step 0.2 on a score peaked at [1.4, 0.85, 1.2]
    target = [1.4, 0.85, 1.2]

    def score(a):
        return 10 - sum((x - t) ** 2 for x, t in zip(a, target))
    res = greedy_alpha_search(score, n_bands=3, start=[1.0, 0.6, 0.0], step=0.2)
    # band 0: 1.0 1.2 1.4 1.6 (worse -> back to 1.4); band 1: 0.6+0.2 = 0.8, 1.0 (worse; 1.0 is not
    # > 1 so it stays 1.0); band 2: 0.0 < 0.1 -> 1.0, 1.2, 1.4 (worse -> back to 1.2, stop)
    want = [[1.0, 0.6, 0.0], [1.2, 0.6, 0.0], [1.4, 0.6, 0.0], [1.6, 0.6, 0.0],
            [1.4, 0.8, 0.0], [1.4, 1.0, 0.0],
            [1.4, 1.0, 1.0], [1.4, 1.0, 1.2], [1.4, 1.0, 1.4]]
    path = [a for a, _ in res.path]
    assert len(path) == len(want)
    for got, w in zip(path, want):
        assert got == pytest.approx(w, abs=1e-9)
    assert res.alpha == pytest.approx([1.4, 1.0, 1.2], abs=1e-9)
    assert ref_python_contral(score, [1.0, 0.6, 0.0], 0.2)[0] == pytest.approx(res.alpha)


def test_greedy_alpha_search_uses_the_given_start():
    # The issue: step and start are parameters; the walk starts at `start` as given. 1.5 is not a
    # multiple of 0.2, which must not move the start (flat score: start, +step, next band at 1.0).
    res = greedy_alpha_search(lambda a: 1.0, start=[1.5, 0.0], step=0.2)
    path = [a for a, _ in res.path]
    assert path[0] == pytest.approx([1.5, 0.0], abs=1e-9)
    assert path == [pytest.approx([1.5, 0.0]), pytest.approx([1.7, 0.0]), pytest.approx([1.5, 1.0])]
    assert res.alpha == pytest.approx([1.5, 1.0])


# ======================================================================= config-level method defaults

def test_normalize_defaults_per_preset():
    expect = {"ties": True, "dare_ties": False, "task_arithmetic": False, "dare_linear": False,
              "dp": False, "dppa": False, "pcb": False}
    for method, norm in expect.items():
        assert cfg(method, n=1, params={"density": 0.5} if method != "dppa" else None).get("normalize") is norm, method
    assert cfg("ties", n=1, params={"normalize": False}).get("normalize") is False


def test_normalized_ties_with_negative_weight_matches_mergekit():
    base, fts = make_sds(2, seed=15)
    models = [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": "b", "parameters": {"weight": -1.0, "density": 0.5}}]
    out = merge_in_memory(base, fts, cfg("ties", models=models))
    for k in base:
        d = torch.stack([ref_magnitude(ft[k] - base[k], 0.5) for ft in fts])
        ref = base[k] + ref_ties_mergekit(d, [1.0, -1.0], True)
        assert not torch.isnan(out[k]).any()
        assert torch.allclose(out[k], ref, atol=1e-6), k


def test_merge_in_memory_output_dtype_and_non_float_passthrough():
    base, fts = make_sds(1, seed=16)
    base["model.layers.0.idx"] = torch.arange(5)
    fts[0]["model.layers.0.idx"] = torch.arange(5) + 1
    out = merge_in_memory(base, fts, cfg("task_arithmetic", n=1))
    assert torch.equal(out["model.layers.0.idx"], torch.arange(5))     # non-float: the base's
    out16 = merge_in_memory(base, fts, cfg("task_arithmetic", n=1, dtype="bfloat16"))
    k = "model.norm.weight"
    assert out16[k].dtype == torch.bfloat16
    assert torch.equal(out16[k], (base[k] + (fts[0][k] - base[k])).to(torch.bfloat16))
