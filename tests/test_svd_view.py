"""Inspect's view for TSV-M, Iso-C and Iso-CTS (issue 18's app part): the singular values of each
fine-tune's delta of the matrix on screen, the merged delta's, and the share of each fine-tune's
delta energy that the merged delta's top-k left singular subspace holds, each checked against
torch computed here from the checkpoint files; the view follows the method picker and never shows
a previous method's figure."""
from __future__ import annotations

import pytest
import torch

from dppa_ui import analysis, figures, zoo
from dppa_ui.controls import MethodControls, picker_methods
from dppa_ui.methods.iso import iso_c_combine, iso_cts_combine, iso_cts_split
from dppa_ui.methods.tsv_m import tsv_m_combine
from dppa_ui.workspace import DiskCache, Workspace

NAME = "model.layers.1.mlp.up_proj.weight"       # 64 x 32: taller than wide
WIDE = "model.layers.0.mlp.down_proj.weight"     # 32 x 64


@pytest.fixture(scope="module")
def ws(tiny_llama, tmp_path_factory):
    fam = tiny_llama("svd-view", n_ft=3)
    root = tmp_path_factory.mktemp("svd-view")
    w = Workspace(temp_root=root, stats_cache=DiskCache(root / "cache")).load(str(fam.base), [str(f) for f in fam.fts])
    w.fam = fam
    yield w
    w.close()


def deltas(ws, name) -> torch.Tensor:
    fam = ws.fam
    return torch.stack([sd[name].float() - fam.base_sd[name].float() for sd in fam.ft_sds])


def rank_95(s: torch.Tensor) -> int:
    """The smallest k with ‖M_k‖_F ≥ 0.95 ‖M‖_F, by trying every k."""
    total = float(s.double().pow(2).sum()) ** 0.5
    return next(k for k in range(1, len(s) + 1) if float(s[:k].double().pow(2).sum()) ** 0.5 >= 0.95 * total)


def share(d: torch.Tensor, u: torch.Tensor) -> float:
    """‖P δ‖²_F / ‖δ‖²_F with the projector P = U Uᵀ formed explicitly."""
    p = u.double() @ u.double().T
    return float((p @ d.double()).pow(2).sum() / d.double().pow(2).sum())


def polar(a: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def check_common(v: dict, d: torch.Tensor, merged: torch.Tensor, weights, basis: torch.Tensor) -> None:
    """`basis`: the merged delta's left singular vectors in the method's order, computed here."""
    w = torch.tensor(weights).view(-1, 1, 1)
    for i in range(len(d)):
        spectrum = torch.linalg.svdvals(d[i] * (w[i] if v["combine"] == "tsv_m" else 1.0))
        torch.testing.assert_close(v["spectra"][i], spectrum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(v["merged"], torch.linalg.svdvals(merged), rtol=1e-4, atol=1e-6)
    ta = (d * w).sum(0)
    torch.testing.assert_close(v["task_sum"], torch.linalg.svdvals(ta), rtol=1e-4, atol=1e-6)
    assert v["k_merged"] == rank_95(torch.linalg.svdvals(merged)) and v["k_sum"] == rank_95(torch.linalg.svdvals(ta))
    u_t = torch.linalg.svd(ta, full_matrices=False)[0][:, :v["k_sum"]]
    assert v["kept"] == pytest.approx([share(x, basis[:, :v["k_merged"]]) for x in d], abs=1e-5)
    assert v["kept_sum"] == pytest.approx([share(x, u_t) for x in d], abs=1e-5)
    assert all(0 < k <= 1 for k in v["kept"] + v["kept_sum"])


@pytest.mark.parametrize("name", [NAME, WIDE])
def test_tsv_m_spectra_truncation_rank_and_kept_shares(ws, name):
    weights = [1.0, 0.5, 2.0]
    v = analysis.svd_view(ws, ws.config(MethodControls(preset="tsv_m", weights=tuple(weights))), name)
    d = deltas(ws, name)
    r = min(d.shape[1:])
    merged = tsv_m_combine(d.clone(), weights)
    # TSV-M's M = U⊥ Σ V⊥ᵀ keeps Σ: its own SVD ranks the directions as the method does
    check_common(v, d, merged, weights, torch.linalg.svd(merged, full_matrices=False)[0])
    assert v["rank"] == r and v["k_task"] == r // 3 and v["index"] == [0, 1, 2]
    for i, x in enumerate(d):
        s = torch.linalg.svdvals(x * weights[i])
        assert v["own"][i] == pytest.approx(float(s[:r // 3].pow(2).sum() / s.pow(2).sum()), abs=1e-5)
    # TSV-M's M has rank T * floor(r / T) at most: its spectrum past that is float32 rounding
    tail = v["merged"][3 * (r // 3):]
    assert len(tail) == r % 3 and float(tail.max()) < 1e-5 * float(v["merged"][0])


def test_iso_c_spectrum_is_flat_and_holds_more_of_each_task_than_task_arithmetic(ws):
    v = analysis.svd_view(ws, ws.config(MethodControls(preset="iso_c")), NAME)
    d = deltas(ws, NAME)
    # M's spectrum is flat: the directions rank by the task sum's singular values
    check_common(v, d, iso_c_combine(d.clone()), [1.0] * 3, torch.linalg.svd(d.sum(0), full_matrices=False)[0])
    assert v["flat"] == pytest.approx(float(torch.linalg.svdvals(d.sum(0)).mean()), rel=1e-5)
    torch.testing.assert_close(v["merged"], torch.full_like(v["merged"], v["flat"]), rtol=1e-4, atol=0)
    assert all(k >= t for k, t in zip(v["kept"], v["kept_sum"]))        # the flat spectrum's wider subspace


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_common_and_task_specific_split(ws, fraction):
    c = ws.config(MethodControls(preset="iso_cts", params={"common_space_fraction": fraction}))
    v = analysis.svd_view(ws, c, NAME)
    d = deltas(ws, NAME)
    rows, cols = d.shape[1:]
    assert (v["common"], v["specific"]) == iso_cts_split(rows, cols, 3, fraction)
    assert v["common"] + 3 * v["specific"] == min(rows, cols)
    u, sig, _ = torch.linalg.svd(d.sum(0), full_matrices=False)
    u_c = u[:, :v["common"]]
    # the directions it collects (each task's own, then the common ones), orthogonalized, ranked by
    # the singular value each came with (M's spectrum is flat)
    own = [torch.linalg.svd(x - u_c @ (u_c.T @ x), full_matrices=False) for x in d]
    vecs = torch.cat([o[0][:, :v["specific"]] for o in own] + [u_c], dim=1)
    sigmas = torch.cat([o[1][:v["specific"]] for o in own] + [sig[:v["common"]]])
    basis = polar(vecs)[:, torch.argsort(sigmas, descending=True, stable=True)]
    check_common(v, d, iso_cts_combine(d.clone(), fraction), [1.0] * 3, basis)
    assert v["common_share"] == pytest.approx([share(x, u_c) for x in d], abs=1e-5)
    for i, x in enumerate(d):
        residual = x.double() - u_c.double() @ (u_c.double().T @ x.double())
        u_own = torch.linalg.svd(residual, full_matrices=False)[0][:, :v["specific"]]
        assert v["specific_share"][i] == pytest.approx(share(x, u_own.float()), abs=1e-5)
        assert v["common_share"][i] + v["specific_share"][i] <= 1 + 1e-6


def test_other_methods_and_non_matrices(ws):
    assert analysis.svd_view(ws, ws.config(MethodControls(preset="ties")), NAME) is None
    mv = analysis.method_view(ws, ws.config(MethodControls(preset="iso_c")), NAME)
    assert mv["kind"] == "svd" and mv["method"] == "iso_c"
    with pytest.raises(ValueError, match="not a matrix: iso_cts averages it"):
        analysis.svd_view(ws, ws.config(MethodControls(preset="iso_cts")), "model.norm.weight")
    assert {"tsv_m", "iso_c", "iso_cts"} <= set(picker_methods())


def test_figure_draws_each_fine_tune_in_its_colour(ws):
    v = analysis.svd_view(ws, ws.config(MethodControls(preset="tsv_m")), NAME)
    fig = figures.method_view(v)
    lines = {t.name: t for t in fig.data if t.type == "scatter"}
    for ref, j in zip(v["models"], v["index"]):
        trace = lines[f"{figures.short(ref)}: σ of its wᵢδᵢ"]
        assert trace.line.color == figures.color(j) and len(trace.y) == v["rank"]
    kept = next(t for t in fig.data if t.type == "bar" and t.name.startswith("share of δᵢ in M's top"))
    assert list(kept.y) == pytest.approx([100 * k for k in v["kept"]])
    assert list(kept.marker.color) == [figures.color(j) for j in v["index"]]
    assert any(t.name.startswith("TSV-M: each task's top ") for t in fig.data)


# ------------------------------------------------------------------------------------ the page's handlers

demo_built = (zoo.ZOO_DIR / "reverse" / "config.json").is_file()


@pytest.mark.skipif(not demo_built, reason="assets/zoo is not built")
def test_the_view_follows_the_picker_and_never_keeps_a_previous_methods_figure():
    from dppa_ui.ui import inspect, models
    from dppa_ui.ui.common import AppState, ui_values
    s = AppState()
    fts = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets", "demo:reverse_complex"]
    assert models.load_models({"state": s, "base": "demo:base", "fts": fts})["models_status"].startswith("✓")
    try:
        def masks(preset, matrix="model.layers.1.mlp.down_proj.weight"):
            return inspect.masks({"state": s, "matrix": matrix, **ui_values(preset=preset)})
        for preset, said in (("tsv_m", "**TSV-M** keeps each task's top k = ⌊r / T⌋ = ⌊128 / 5⌋ = 25"),
                             ("iso_c", "**Iso-C** keeps the singular vectors"),
                             ("iso_cts", "**Iso-CTS** splits r = 128 into a common subspace")):
            out = masks(preset)
            fig = out["method_plot"]["value"]
            assert out["method_plot"]["visible"] and fig.layout.title.text.startswith(f"{preset}: singular values")
            assert said in out["mask_numbers"] and "**Share kept**" in out["mask_numbers"]
            assert out["mask_numbers"].count("\n| `") == 5                     # a row per fine-tune
            assert out["mask_plot"]["visible"] is False                       # no entry is masked
        out = masks("ties")
        assert out["method_plot"]["visible"] is False and "Share kept" not in out["mask_numbers"]
        assert out["mask_plot"]["visible"] and "sign conflicts" in out["mask_numbers"]
        out = masks("tsv_m", "model.norm.weight")         # over the API: a tensor that is not a matrix
        assert out["mask_numbers"] == "" and out["method_plot"]["visible"] is False
        assert "not drawn: model.norm.weight is not a matrix" in " ".join(
            a.text for a in out["mask_plot"]["value"].layout.annotations)
        # an SVD that does not converge (Iso-CTS on some wide matrices) is the views' one line, not an error
        with pytest.MonkeyPatch.context() as mp:
            def fail(*a, **k):
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            mp.setattr("dppa_ui.analysis.iso_cts_factors", fail)
            out = masks("iso_cts", "model.layers.0.mlp.up_proj.weight")        # not drawn before: nothing cached
        assert "not drawn: linalg.svd: The algorithm failed to converge" in " ".join(
            a.text for a in out["mask_plot"]["value"].layout.annotations)
        assert out["method_plot"]["visible"] is False and out["mask_numbers"] == ""
    finally:
        s.close()
