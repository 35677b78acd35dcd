"""The delta-pipeline stages added for mergekit's methods (breadcrumbs and della prunes, sce, ram
and ramplus_tl combines), each against an independent reference written here from mergekit
0.1.5's semantics (sorting, plain loops, hand-made tensors), and their compositions with our
stages (`prune: dp` + `combine: sce`, `prune: della` + `amplify: dpa`)."""
from __future__ import annotations

import math

import pytest
import torch

from dppa_ui import load_config, merge_in_memory
from dppa_ui.methods import (breadcrumbs_counts, breadcrumbs_prune, breadcrumbs_thresholds, della_curve,
                             della_probabilities, della_prune, ram_combine, ramplus_gains, ramplus_tl_combine,
                             sce_combine, sce_select_mask, sce_weights, tensor_generator)


def heavy(shape, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) / torch.randn(shape, generator=g).abs().clamp_min(0.1) * scale


# ======================================================================= breadcrumbs

def ref_breadcrumbs(delta, density, gamma):
    """mergekit's magnitude_outliers: sort |delta| ascending; keep positions [n_bot, n_bot + target)."""
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda i: (abs(float(delta.reshape(-1)[i])), -i))   # ties: higher index first
    keep = torch.zeros(n, dtype=torch.bool)
    for i in order[n_bot:n_bot + target]:
        keep[i] = True
    return torch.where(keep.view(delta.shape), delta, torch.zeros_like(delta))


def test_breadcrumbs_band_on_a_hand_made_tensor():
    g = torch.Generator().manual_seed(0)
    d = (torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.rand(100, generator=g) < 0.5, -1.0, 1.0))
    d = d[torch.randperm(100, generator=g)]
    out = breadcrumbs_prune(d, density=0.2, gamma=0.05)
    kept = sorted(int(abs(v)) for v in out[out != 0].tolist())
    assert kept == list(range(76, 96))                  # the 5 largest dropped, the next 20 kept
    assert breadcrumbs_counts(100, 0.2, 0.05) == (5, 20, 75)
    assert breadcrumbs_thresholds(d.abs(), 0.2, 0.05) == (95.0, 76.0)


def test_breadcrumbs_shrinks_the_outlier_cut_when_the_band_does_not_fit():
    d = torch.tensor([5.0, -1.0, 3.0, 2.0, -4.0, 6.0, 7.0, -8.0, 9.0, 10.0])
    out = breadcrumbs_prune(d, density=0.9, gamma=0.2)      # mergekit: exactly int(0.9 n) = 9 stay
    assert torch.count_nonzero(out) == 9 and out[9] == 0    # only the largest is dropped
    assert breadcrumbs_counts(10, 0.9, 0.2) == (1, 9, 0)


@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.3, 0.1), (0.5, 0.5), (0.05, 0.0)])
def test_breadcrumbs_matches_mergekit_reference(density, gamma):
    d = heavy((37, 23), 3)
    assert torch.equal(breadcrumbs_prune(d, density, gamma), ref_breadcrumbs(d, density, gamma))
    out = breadcrumbs_prune(d, density, gamma, rescale="l1")
    assert out.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)


def test_breadcrumbs_pipeline_and_config_refusal():
    with pytest.raises(Exception, match="density \\+ gamma"):
        load_config({"merge_method": "breadcrumbs", "base_model": "b", "models": ["a"],
                     "parameters": {"density": 0.95, "gamma": 0.1}})
    from test_methods import make_sds, ref_ties_mergekit
    base, fts = make_sds(2, seed=3)
    c = {"merge_method": "breadcrumbs_ties", "base_model": "b",
         "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3, "gamma": 0.05}},
                    {"model": "c", "parameters": {"weight": 0.5, "density": 0.4}}]}
    cf = load_config(c)
    assert cf.get("normalize") is False and cf.models[1].get("gamma") == 0.01       # mergekit's defaults
    out = merge_in_memory(base, fts, c)
    for k in base:
        d = torch.stack([ref_breadcrumbs(fts[0][k] - base[k], 0.3, 0.05),
                         ref_breadcrumbs(fts[1][k] - base[k], 0.4, 0.01)])
        assert torch.allclose(out[k], base[k] + ref_ties_mergekit(d, [1.0, 0.5], False), atol=1e-6), k


# ======================================================================= della

def test_della_probabilities_by_rank_in_each_row():
    row = torch.tensor([[0.5, -3.0, 1.0, 0.1, 2.0]])
    p = della_probabilities(row.abs(), density=0.5, epsilon=0.2)
    # ascending |delta| ranks: 0.1 -> 0, 0.5 -> 1, 1 -> 2, 2 -> 3, 3 -> 4;  p = 0.3 + 0.4 r / 4
    assert p.view(-1).tolist() == pytest.approx([0.4, 0.7, 0.5, 0.3, 0.6])
    # 1-D tensors are one row; ties rank by index; each row on its own
    assert della_probabilities(torch.tensor([1.0, 1.0, 1.0]), 0.5, 0.1).tolist() == pytest.approx([0.4, 0.5, 0.6])
    m = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    assert della_probabilities(m, 0.5, 0.25).view(-1).tolist() == pytest.approx([0.75, 0.25, 0.25, 0.75])
    assert della_curve(5, 0.5, 0.2) == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])


def test_della_kept_share_and_rescales():
    d = heavy((200, 300), 5)
    gen = lambda: tensor_generator(1, 0, "w")  # noqa: E731
    out = della_prune(d, 0.3, 0.1, gen(), rescale="none")
    kept = out != 0
    frac = kept.float().mean().item()
    assert abs(frac - 0.3) < 6 * math.sqrt(0.3 * 0.7 / d.numel())
    assert torch.equal(out[kept], d[kept])
    # large entries survive more often than small ones
    p = della_probabilities(d.abs(), 0.3, 0.1)
    assert kept[p > 0.35].float().mean() > kept[p < 0.25].float().mean() + 0.1
    l1 = della_prune(d, 0.3, 0.1, gen(), rescale="l1")
    assert torch.equal(l1 != 0, kept)                           # same draws, same mask
    assert l1.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    paper = della_prune(d, 0.3, 0.1, gen(), rescale="paper")
    assert torch.allclose(paper[kept], d[kept] / p[kept])


def test_della_pipeline_matches_reference_and_defaults():
    from test_methods import make_sds, ref_ties_mergekit
    base, fts = make_sds(2, seed=7)
    c = {"merge_method": "della", "base_model": "b", "seed": 4,
         "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.2}},
                    {"model": "c", "parameters": {"weight": 0.7, "density": 0.4}}]}
    cf = load_config(c)
    assert cf.get("normalize") is True and cf.models[1].get("della_epsilon") == 0.15 and cf.models[0].get("rescale") == "l1"
    out = merge_in_memory(base, fts, c)
    for k in base:
        rows = []
        for i, (ft, dens, eps) in enumerate(zip(fts, (0.5, 0.4), (0.2, 0.15))):
            d = ft[k] - base[k]
            x = d.abs().unsqueeze(0) if d.dim() == 1 else d.abs()
            p = torch.empty_like(x)
            for r in range(x.shape[0]):                     # plain loops: rank within the row
                order = sorted(range(x.shape[1]), key=lambda j: (float(x[r, j]), j))
                for rank, j in enumerate(order):
                    p[r, j] = dens - eps + 2 * eps * rank / (x.shape[1] - 1)
            keep = torch.rand(d.shape, generator=tensor_generator(4, i, k)) < p.view(d.shape)
            kept = torch.where(keep, d, 0.0)
            rows.append(kept * (d.abs().sum() / kept.abs().sum()) if kept.abs().sum() >= 1e-7 else kept)
        ref = base[k] + ref_ties_mergekit(torch.stack(rows), [1.0, 0.7], True)
        assert torch.allclose(out[k], ref, rtol=1e-5, atol=1e-6), k


def test_della_refusals():
    with pytest.raises(Exception, match="epsilon"):
        load_config({"merge_method": "della", "base_model": "b", "models": ["a"],
                     "parameters": {"density": 0.1, "epsilon": 0.15}})


# ======================================================================= sce

def ref_sce(tvs, topk):
    """mergekit's sce_merge on stacked task vectors, written out with plain tensor ops."""
    n = tvs.shape[0]
    if topk < 1:
        var = ((tvs - tvs.mean(0)) ** 2).mean(0)
        k = int(int((var != 0).sum()) * topk)
        order = sorted(range(var.numel()), key=lambda i: (-float(var.reshape(-1)[i]), i))
        mask = torch.zeros(var.numel())
        mask[order[:k]] = 1
        tvs = tvs * mask.view(var.shape)
    ms = [float((tvs[i] ** 2).mean()) for i in range(n)]
    w = [1 / n] * n if abs(sum(ms)) < 1e-6 else [m / sum(ms) for m in ms]
    elected = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    num = torch.zeros_like(tvs[0])
    den = torch.zeros_like(tvs[0])
    for i in range(n):
        agree = (torch.sign(tvs[i]) == elected).float()
        num += w[i] * agree * tvs[i]
        den += w[i] * agree
    return num / den.clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce_matches_reference(topk):
    tvs = torch.stack([heavy((30, 20), s, scale=0.5) for s in range(3)])
    assert torch.allclose(sce_combine(tvs, topk), ref_sce(tvs, topk), atol=1e-6)


def test_sce_parts():
    tvs = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 0.0, -2.0, -1.0], [1.0, 0.0, 0.0, 0.5]])
    # two entries vary (2 and 3); int(2 x 0.5) = 1 is kept: the one of largest variance
    assert sce_select_mask(tvs, 0.5).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert sce_select_mask(tvs, 0.4).tolist() == [0.0, 0.0, 0.0, 0.0]   # int(0.8) = 0: nothing (mergekit)
    tvs2 = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    assert sce_weights(tvs2).tolist() == pytest.approx([0.5, 0.5])
    assert sce_weights(torch.zeros(2, 4)).tolist() == pytest.approx([0.5, 0.5])   # all-zero: uniform


def test_sce_composes_with_dp_prune():
    from test_methods import make_sds
    base, fts = make_sds(3, seed=11)
    c = load_config({"prune": "dp", "combine": "sce", "base_model": "b", "parameters": {"select_topk": 0.5},
                     "models": [{"model": f"m{i}", "parameters": {"density": 0.4}} for i in range(3)]})
    assert c.stages == ("dp", "none", "sce")
    out = merge_in_memory(base, fts, c)
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(out[k], base[k]) and torch.isfinite(out[k]).all()


# ======================================================================= ram / ramplus_tl

def test_ram_on_hand_made_deltas():
    tvs = torch.tensor([[0.5, 0.0, 1.0, 0.0],
                        [0.0, 0.0, 3.0, 2e-6],
                        [0.0, 0.0, -1.0, 0.0]])
    # entry 0: only model 0 -> 0.5; entry 1: nobody; entry 2: all three -> mean 1.0; entry 3: below epsilon
    assert ram_combine(tvs, epsilon=1e-5).tolist() == pytest.approx([0.5, 0.0, 1.0, 0.0])


def test_ramplus_gains_and_combine_by_loops():
    tvs = heavy((3, 40), 2, scale=1.0) * (torch.rand(3, 40, generator=torch.Generator().manual_seed(5)) < 0.5)
    eps, r, alpha = 1e-5, 0.1, 0.2
    n = tvs.shape[0]
    contrib = [[abs(float(tvs[i, j])) > eps for j in range(40)] for i in range(n)]
    count = [sum(contrib[i][j] for i in range(n)) for j in range(40)]
    gains = []
    for i in range(n):
        shared = sum(1 for j in range(40) if contrib[i][j] and count[j] > 1)
        unique = sum(1 for j in range(40) if contrib[i][j] and count[j] == 1)
        gains.append(1 + r * min(max(shared / max(unique, eps), 0), alpha))
    assert ramplus_gains(tvs, r, alpha, eps).tolist() == pytest.approx(gains)
    ref = []
    for j in range(40):
        if count[j] == 1:
            i = next(i for i in range(n) if contrib[i][j])
            ref.append(float(tvs[i, j]) * gains[i])
        else:
            ref.append(sum(float(tvs[i, j]) for i in range(n) if contrib[i][j]) / max(count[j], 1))
    assert ramplus_tl_combine(tvs, r, alpha, eps).tolist() == pytest.approx(ref, abs=1e-6)


def test_ram_presets_merge():
    from test_methods import make_sds
    base, fts = make_sds(2, seed=2)
    for method in ("ram", "ramplus_tl"):
        out = merge_in_memory(base, fts, {"merge_method": method, "base_model": "b", "models": ["x", "y"]})
        k = "model.layers.1.mlp.down_proj.weight"
        tvs = torch.stack([f[k] - base[k] for f in fts])
        ref = ram_combine(tvs) if method == "ram" else ramplus_tl_combine(tvs)
        assert torch.allclose(out[k], base[k] + ref, atol=1e-7)


# ======================================================================= compositions

def test_della_prune_with_dpa_amplify():
    from test_methods import make_sds
    base, fts = make_sds(1, seed=4)
    c = {"prune": "della", "amplify": "dpa", "combine": "sum", "base_model": "b", "seed": 1,
         "models": [{"model": "a", "parameters": {"density": 0.4, "epsilon": 0.1, "rescale": False,
                                                  "partitions": [0.1, 0.4], "amplification": [2.0, 1.0]}}]}
    out = merge_in_memory(base, fts, c)
    plain = merge_in_memory(base, fts, {**c, "amplify": "none"})
    k = "model.layers.0.mlp.up_proj.weight"
    d_amp, d_plain = out[k] - base[k], plain[k] - base[k]
    assert torch.equal(d_amp != 0, d_plain != 0)                         # same kept entries
    ratio = torch.round(d_amp[d_plain != 0] / d_plain[d_plain != 0], decimals=4)
    assert set(ratio.unique().tolist()) == {1.0, 2.0}   # top band doubled
    top = ratio == 2.0
    assert int(top.sum()) == int(0.1 * d_amp.numel())                   # the top 10% of all entries, by |delta|
    assert d_plain[d_plain != 0][top].abs().min() >= d_plain[d_plain != 0][~top].abs().max()
