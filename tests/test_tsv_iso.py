"""TSV-M (arXiv 2412.00081) and Iso-C / Iso-CTS (arXiv 2502.04959): the combines against a reference
written here from the papers' equations (float64, unpadded concatenation, the polar factor from an
eigendecomposition, Iso-CTS's common block first), the properties each paper builds on (flat
spectrum, orthonormal task singular vectors, the common / task-specific split), their YAML
(lambda, per-model weight, common_space_fraction), and the streaming engine equal to the in-memory
path. benchmarks/compare_fusionbench.py checks them against FusionBench itself (not in CI)."""
from __future__ import annotations

import pytest
import torch

import dppa_ui
from dppa_ui import ConfigError, load_config, merge_in_memory
from dppa_ui.methods.iso import iso_c_combine, iso_cts_combine, iso_cts_factors, iso_cts_split
from dppa_ui.methods.tsv_m import orthogonalize, tsv_factors, tsv_m_combine, tsv_rank

pytestmark = pytest.mark.usefixtures("one_thread")


# ======================================================================= reference, from the papers

def ref_polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes solution / polar factor a (a^T a)^(-1/2) (a of full column rank),
    from an eigendecomposition instead of an SVD; a wide matrix: (a a^T)^(-1/2) a."""
    wide = a.shape[0] < a.shape[1]
    a = a.T if wide else a
    evals, evecs = torch.linalg.eigh(a.T @ a)
    out = a @ (evecs * evals.rsqrt()) @ evecs.T
    return out.T if wide else out


def ref_tsv_m(deltas: torch.Tensor, weights) -> torch.Tensor:
    """TSV-M: every task's top floor(r/T) singular triplets, concatenated (no padding), U and V
    replaced by their Procrustes factors, M = U_perp Sigma V_perp^T."""
    deltas = deltas.double() * torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (deltas.dim() - 1))
    if deltas.dim() != 3:
        return deltas.sum(0) / len(deltas)
    k = min(deltas.shape[1:]) // len(deltas)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return ref_polar(u) @ torch.diag(s) @ ref_polar(v).T


def ref_iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C: sigma_bar U V^T of the summed task matrix, sigma_bar its mean singular value."""
    deltas = deltas.double()
    if deltas.dim() != 3:
        return deltas.mean(0)
    total = deltas.sum(0)
    return torch.linalg.svdvals(total).mean() * ref_polar(total)


def ref_iso_cts(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS: the sum's top c directions, then each task's top s directions outside them, c + T*s = r
    (the split rounded as the authors' code rounds it), U and V orthogonalized, spectrum flattened to
    the mean of the collected singular values."""
    deltas = deltas.double()
    if deltas.dim() != 3:
        return deltas.mean(0)
    n, rows, cols = deltas.shape
    r = min(rows, cols)
    s = round((r - int(r * fraction)) / n)
    c = r - n * s
    u, sig, vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    us, ss, vs = [u[:, :c]], [sig[:c]], [vh[:c].T]
    outside = torch.eye(rows, dtype=torch.float64) - u[:, :c] @ u[:, :c].T
    for d in deltas:
        ut, st, vht = torch.linalg.svd(outside @ d, full_matrices=False)
        us.append(ut[:, :s]), ss.append(st[:s]), vs.append(vht[:s].T)
    u, v = torch.cat(us, 1), torch.cat(vs, 1)
    return torch.cat(ss).mean() * ref_polar(u) @ ref_polar(v).T


def tasks(n: int, rows: int, cols: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """n random task matrices (full rank, or `rank`), scaled like fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, rows, cols, generator=g) * 0.01
    return torch.randn(n, rows, rank, generator=g) @ torch.randn(n, rank, cols, generator=g) * 0.01


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-4) -> bool:
    return float((a.double() - b.double()).abs().max()) <= rel * float(b.abs().max())


# ======================================================================= TSV-M

@pytest.mark.parametrize("n,rows,cols", [(2, 24, 24), (3, 30, 20), (4, 16, 40), (3, 10, 10)])
def test_tsv_m_matches_the_reference(n, rows, cols):
    d = tasks(n, rows, cols, seed=n + rows)
    w = [1.0, 0.5, -0.7, 1.3][:n]
    assert close(tsv_m_combine(d, w), ref_tsv_m(d, w))


def test_tsv_m_each_task_keeps_floor_r_over_t_triplets_and_the_vectors_come_out_orthonormal():
    d = tasks(3, 40, 22, seed=1)
    assert tsv_rank(40, 22, 3) == 7
    u, s, vh = tsv_factors(d)
    assert u.shape == (40, 22) and s.shape == (22,) and vh.shape == (22, 22)
    # task i's 7 triplets are its own top 7, in place; the last 22 - 21 = 1 slot stays empty
    for i in range(3):
        ui, si, _ = torch.linalg.svd(d[i], full_matrices=False)
        assert torch.allclose(s[7 * i:7 * i + 7], si[:7])
        assert torch.allclose(u[:, 7 * i:7 * i + 7].abs(), ui[:, :7].abs(), atol=1e-5)
    assert not s[21:].any() and not u[:, 21:].any() and not vh[21:].any()
    # different tasks' singular vectors overlap before (interference), not after the Procrustes step
    gram = u[:, :21].T @ u[:, :21]
    assert float((gram - torch.eye(21)).abs().max()) > 0.1
    up = orthogonalize(u)[:, :21]
    assert torch.allclose(up.T @ up, torch.eye(21), atol=1e-5)
    vp = orthogonalize(vh)[:21]
    assert torch.allclose(vp @ vp.T, torch.eye(21), atol=1e-5)


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_the_sum_of_their_truncations():
    """Where the tasks' kept singular vectors share no direction there is no interference to
    remove: TSV-M is task arithmetic of the TSV-C-compressed tasks, each cut to its top
    floor(r/T) triplets. Here r = 30, T = 3: each task keeps 10 of its 15 directions; the 5 it
    drops point along another task's kept right singular vectors."""
    g = torch.Generator().manual_seed(3)
    q_left, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    top_s, low_s = torch.linspace(3, 1, 10, dtype=torch.float64), torch.linspace(0.5, 0.1, 5, dtype=torch.float64)
    deltas, kept = [], []
    for i in range(3):
        left = q_left[:, 15 * i:15 * i + 15]
        other = (i + 1) % 3
        top = left[:, :10] @ torch.diag(top_s * (i + 1)) @ q_right[:, 10 * i:10 * i + 10].T
        low = left[:, 10:] @ torch.diag(low_s) @ q_right[:, 10 * other:10 * other + 5].T
        deltas.append(top + low)
        kept.append(top)
    d = (torch.stack(deltas) * 0.01).float()
    merged = tsv_m_combine(d, [1, 1, 1])
    assert torch.allclose(merged.double(), sum(kept) * 0.01, atol=1e-7)
    assert float((merged - d.sum(0)).abs().max()) > 1e-3          # not plain task arithmetic


def test_tsv_m_weights_scale_each_task_before_the_svd():
    d = tasks(2, 20, 20, seed=4)
    w = [0.3, 2.0]
    assert torch.allclose(tsv_m_combine(d, w), tsv_m_combine(d * torch.tensor(w).view(2, 1, 1), [1, 1]), atol=1e-7)
    # not a common factor on the result: a weight changes its task's share of Sigma
    plain = tsv_m_combine(d, [1, 1])
    scaled = tsv_m_combine(d, w)
    ratio = (scaled.flatten() @ plain.flatten()) / (plain.flatten() @ plain.flatten())
    assert not torch.allclose(scaled, ratio * plain, atol=1e-5)


def test_tsv_m_non_matrices_are_the_mean_of_the_weighted_deltas():
    d = tasks(3, 1, 17, seed=5)[:, 0]                # (3, 17): a norm or bias
    assert torch.allclose(tsv_m_combine(d, [1, 2, 3]), (d[0] + 2 * d[1] + 3 * d[2]) / 3, atol=1e-8)
    conv = tasks(2, 6, 12, seed=6).view(2, 2, 3, 12)    # not 2-D either
    assert torch.allclose(tsv_m_combine(conv, [1, 1]), conv.mean(0))


def test_tsv_m_one_task_gives_its_delta_back():
    d = tasks(1, 12, 9, seed=7)
    assert torch.allclose(tsv_m_combine(d, [1.0]), d[0], atol=1e-7)


def test_tsv_m_inplace_leaves_no_trace_when_not_asked():
    d = tasks(2, 8, 8, seed=8)
    keep = d.clone()
    tsv_m_combine(d, [0.5, 2.0])
    assert torch.equal(d, keep)


# ======================================================================= Iso-C

@pytest.mark.parametrize("n,rows,cols", [(2, 24, 24), (3, 30, 20), (4, 16, 40)])
def test_iso_c_matches_the_reference(n, rows, cols):
    d = tasks(n, rows, cols, seed=10 + n)
    assert close(iso_c_combine(d), ref_iso_c(d))


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value_of_the_sum_with_its_singular_vectors():
    d = tasks(3, 30, 18, seed=11) * torch.tensor([1.0, 3.0, 9.0]).view(3, 1, 1)
    total = d.sum(0)
    s_sum = torch.linalg.svdvals(total)
    assert float(s_sum[0] / s_sum[-1]) > 3                              # uneven before
    m = iso_c_combine(d)
    assert torch.allclose(torch.linalg.svdvals(m), s_sum.mean().expand(18), rtol=1e-4)   # flat, at the mean
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    # the sum's singular directions are kept, each now at sigma_bar
    assert close(u.T @ m @ vh.T, s_sum.mean() * torch.eye(18), rel=1e-4)


def test_iso_c_is_scale_equivariant_and_ignores_task_order():
    d = tasks(3, 12, 20, seed=12)
    assert close(iso_c_combine(2.5 * d), 2.5 * iso_c_combine(d), rel=1e-5)
    assert close(iso_c_combine(d.flip(0)), iso_c_combine(d), rel=1e-5)


def test_iso_non_matrices_are_the_mean():
    d = tasks(3, 1, 11, seed=13)[:, 0]
    assert torch.allclose(iso_c_combine(d), d.mean(0))
    assert torch.allclose(iso_cts_combine(d, 0.8), d.mean(0))


# ======================================================================= Iso-CTS

@pytest.mark.parametrize("rows,cols,n,fraction,expected", [
    (128, 128, 4, 0.8, (104, 6)),      # int(102.4) = 102; 26 / 4 = 6.5 rounds (half to even) to 6
    (102, 128, 4, 0.8, (82, 5)),       # the demo's embedding: 81, then 21 / 4 = 5.25 -> 5
    (384, 128, 2, 0.8, (102, 13)),     # r = min(rows, cols)
    (128, 128, 3, 0.5, (65, 21)),     # 64 / 3 = 21.3 -> 21
    (100, 100, 3, 0.8, (79, 7)),       # 20 / 3 = 6.7 rounds up to 7: the common space gives one up
    (100, 100, 2, 0.95, (96, 2)),      # 5 / 2 = 2.5 -> 2 (half to even)
    (64, 64, 2, 1.0, (64, 0)),         # all common: Iso-C
    (6, 6, 4, 0.0, (2, 1)),            # 6 / 4 = 1.5 would round to 2 (8 > 6 dims): rounded down instead
])
def test_iso_cts_split_sizes(rows, cols, n, fraction, expected):
    c, s = iso_cts_split(rows, cols, n, fraction)
    assert (c, s) == expected
    assert c + n * s == min(rows, cols) and c >= 0


@pytest.mark.parametrize("n,rows,cols,fraction", [(2, 24, 24, 0.8), (3, 40, 20, 0.5), (4, 20, 36, 0.6)])
def test_iso_cts_matches_the_reference(n, rows, cols, fraction):
    d = tasks(n, rows, cols, seed=20 + n)
    assert close(iso_cts_combine(d, fraction), ref_iso_cts(d, fraction))


def test_iso_cts_collects_the_common_subspace_and_task_directions_outside_it():
    d = tasks(3, 50, 20, seed=21)                      # tall: r = 20, and U spans 20 of 50 dimensions
    c, s = iso_cts_split(50, 20, 3, 0.5)
    assert (c, s) == (11, 3)
    u, sig, vh = iso_cts_factors(d, 0.5)
    u_sum, s_sum, _ = torch.linalg.svd(d.sum(0), full_matrices=False)
    # the common block (last, in the authors' order): the sum's top 11 triplets
    assert torch.allclose(u[:, 9:].abs(), u_sum[:, :11].abs(), atol=1e-5)
    assert torch.allclose(sig[9:], s_sum[:11], rtol=1e-5)
    assert float((u_sum[:, :11].T @ u[:, :9]).abs().max()) < 1e-5       # task blocks: outside the common space
    for i in range(3):                                                    # task i's own top directions
        own = d[i] - u_sum[:, :11] @ (u_sum[:, :11].T @ d[i])
        assert torch.allclose(sig[3 * i:3 * i + 3], torch.linalg.svdvals(own)[:3], rtol=1e-4)
    m = iso_cts_combine(d, 0.5)
    # M's column space is the span of what was collected: the common directions and each task's own
    p = torch.linalg.svd(m, full_matrices=False)[0]
    assert float((u - p @ (p.T @ u)).abs().max()) < 1e-4
    # and every one of its 20 directions carries the mean of the 20 collected singular values
    assert torch.allclose(torch.linalg.svdvals(m), sig.mean().expand(20), rtol=1e-4)


def test_iso_cts_all_common_is_iso_c():
    d = tasks(3, 16, 24, seed=22)
    assert torch.allclose(iso_cts_combine(d, 1.0), iso_c_combine(d), atol=1e-6)


def test_iso_cts_differs_from_iso_c_when_tasks_have_own_directions():
    d = tasks(2, 30, 30, seed=23, rank=5)
    assert not torch.allclose(iso_cts_combine(d, 0.5), iso_c_combine(d), atol=1e-4)


# ======================================================================= YAML, engine, in memory

def cfg(fam, method, params=None, weights=None):
    models = [{"model": str(p), **({"parameters": {"weight": weights[i]}} if weights else {})}
              for i, p in enumerate(fam.fts)]
    return {"merge_method": method, "base_model": str(fam.base), "models": models, "parameters": params or {}}


def test_yaml_defaults_are_fusionbenchs_and_bad_values_are_refused(tiny_family):
    c = load_config(cfg(tiny_family, "iso_cts"))
    assert c.stages == ("none", "none", "iso_cts") and c.get("common_space_fraction") == 0.8 and c.get("lambda") == 1.0
    assert load_config(cfg(tiny_family, "tsv_m")).models[0].get("weight") == 1.0
    with pytest.raises(ConfigError, match="common_space_fraction"):
        load_config(cfg(tiny_family, "iso_cts", {"common_space_fraction": 1.5}))
    c = load_config(cfg(tiny_family, "iso_c", weights=[1.0, 0.5]))
    assert any("weight" in n and "not a parameter of iso_c" in n for n in c.notices)
    again = load_config(load_config(cfg(tiny_family, "iso_cts", {"common_space_fraction": 0.6, "lambda": 1.4})).to_yaml())
    assert again.get("common_space_fraction") == 0.6 and again.get("lambda") == 1.4


@pytest.mark.parametrize("method,params,weights", [
    ("tsv_m", {"lambda": 0.7}, [1.0, 0.4]),
    ("iso_c", {"lambda": 1.5}, None),
    ("iso_cts", {"common_space_fraction": 0.6, "lambda": 1.2}, None),
])
def test_merge_is_base_plus_lambda_times_the_combine_per_tensor(tiny_family, method, params, weights):
    """In memory: every tensor is base + lambda * combine(deltas), 2-D ones through the SVD, the
    rest averaged (norms), with the per-model weights going to TSV-M's alphas."""
    fam = tiny_family
    out = merge_in_memory(fam.base_sd, fam.ft_sds, cfg(fam, method, params, weights))
    lam = params["lambda"]
    for name, b in fam.base_sd.items():
        d = torch.stack([sd[name].float() - b.float() for sd in fam.ft_sds])
        if method == "tsv_m":
            ref = ref_tsv_m(d, weights)
        elif method == "iso_c":
            ref = ref_iso_c(d)
        else:
            ref = ref_iso_cts(d, params["common_space_fraction"])
        assert close(out[name] - b, lam * ref, rel=1e-3), name


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_streaming_engine_equals_in_memory(tiny_family, read_weights, tmp_path, method):
    c = cfg(tiny_family, method, {"lambda": 1.3}, [1.0, 0.6] if method == "tsv_m" else None)
    res = dppa_ui.merge(c, tmp_path / "out")
    assert res.tensors == len(tiny_family.base_sd)
    disk = read_weights(tmp_path / "out")
    mem = merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, c)
    assert set(disk) == set(mem)
    for k in disk:
        assert torch.equal(disk[k], mem[k]), k
