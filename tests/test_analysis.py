"""What the Inspect views show (dppa_ui.analysis data, dppa_ui.figures charts), checked against
the deltas computed here from the files: thresholds are the exact k-th largest |δ|, DP uses each
module's density, DARE counts its real mask, histograms count every entry once."""
from __future__ import annotations

import os

import pytest
import torch

from dppa_ui import analysis, figures
from dppa_ui.controls import MethodControls
from dppa_ui.methods import keep_count, kth_largest, random_mask, tensor_generator
from dppa_ui.workspace import DiskCache, Workspace

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def ws(tiny_llama, tmp_path_factory):
    fam = tiny_llama("analysis", n_ft=3)
    root = tmp_path_factory.mktemp("analysis")
    w = Workspace(temp_root=root, stats_cache=DiskCache(root / "cache")).load(str(fam.base), [str(f) for f in fam.fts])
    w.stats.wait(timeout=60)
    w.fam = fam
    yield w
    w.close()


def delta(ws, j, name=NAME):
    fam = ws.fam
    return fam.ft_sds[j][name].float() - fam.base_sd[name].float()


def cfg(ws, **kw):
    return ws.config(MethodControls(**kw))


def test_magnitude_threshold_is_kth_largest_and_moves_with_density(ws):
    n = delta(ws, 0).numel()
    prev = None
    for density in (0.5, 0.2, 0.05):
        rows = analysis.thresholds(ws, cfg(ws, preset="ties", density=density), NAME)
        for j, r in enumerate(rows):
            k = keep_count(density, n)
            a = delta(ws, j).abs()
            assert r["kept"] == k and r["numel"] == n and r["density"] == density and r["index"] == j
            assert r["threshold"] == float(a.reshape(-1).sort(descending=True).values[k - 1])
            assert int((a > r["threshold"]).sum()) < k <= int((a >= r["threshold"]).sum())
        if prev is not None:        # a higher prune rate raises every threshold
            assert all(r["threshold"] > p["threshold"] for r, p in zip(rows, prev))
        prev = rows


def test_dp_threshold_uses_the_module_density(ws):
    c = cfg(ws, preset="dp", density=0.3, dp_outlier_m=4.0, dp_lambda=0.1)
    assert all(r["pending"] for r in analysis.thresholds(ws, c, NAME))      # M = 4 not computed yet
    full = ws.stats.wait(4.0, timeout=60)
    rows = analysis.thresholds(ws, c, NAME)
    for j, r in enumerate(rows):
        d = full[j].dp_map(0.3, 0.1)[NAME].density
        assert r["density"] == pytest.approx(d) and r["kept"] == keep_count(d, delta(ws, j).numel())
        assert r["threshold"] == float(kth_largest(delta(ws, j).abs(), r["kept"]))
    norm = analysis.thresholds(ws, c, "model.layers.0.input_layernorm.weight")     # dp_others: keep
    assert all(r["threshold"] is None and r["kept"] == r["numel"] and r["prune"] == "none" for r in norm)


def test_dpa_band_edges(ws):
    c = cfg(ws, preset="dppa", density=0.4, band_shares=(0.25,), alphas=(2.0, 1.0))
    full = ws.stats.full(5.0)
    for j, r in enumerate(analysis.thresholds(ws, c, NAME)):
        off = full[j].dp_map(0.4, 0.08)[NAME].offset
        f = min(max(0.1 + off, 0.0), 1.0)
        assert r["band_fractions"] == [pytest.approx(f)]
        assert r["band_edges"] == [float(kth_largest(delta(ws, j).abs(), keep_count(f, delta(ws, j).numel())))]
        assert r["band_edges"][0] > r["threshold"]


def test_random_pruning_counts_the_real_mask(ws):
    rows = analysis.thresholds(ws, cfg(ws, preset="dare_ties", density=0.3, seed=7), NAME)
    for i, r in enumerate(rows):
        mask = random_mask(delta(ws, i).shape, 0.3, tensor_generator(7, i, NAME))
        assert r["threshold"] is None and r["kept"] == int(mask.sum())


def test_histogram_counts_every_entry_once_and_the_lines_follow_the_density(ws):
    c = cfg(ws, preset="dppa", density=0.3)
    data = analysis.histogram(ws, c, NAME)
    assert [s["part"] for s in data["series"]] == ["all"] * 3 + ["amplified"] * 3       # DPA: after its α too
    assert [sum(s["counts"]) for s in data["series"][:3]] == [int((delta(ws, j) != 0).sum()) for j in range(3)]
    fig = figures.histogram(data, c.method_name, c.prune, c.amplify)
    assert fig.layout.xaxis.type == "log" and NAME in fig.layout.title.text
    dashed = [t for t in fig.data if t.line.dash == "dash"]
    assert [t.x[0] for t in dashed] == [r["threshold"] for r in data["rows"]]
    assert [t.line.color for t in dashed] == [figures.color(j) for j in range(3)]      # one colour per fine-tune
    lower = figures.histogram(analysis.histogram(ws, cfg(ws, preset="dppa", density=0.1), NAME), "dppa", "dp", "dpa")
    assert all(a.x[0] < b.x[0] for a, b in zip(dashed, [t for t in lower.data if t.line.dash == "dash"]))


def test_random_pruning_histogram_splits_kept_and_dropped(ws):
    c = cfg(ws, preset="dare_linear", density=0.3)
    data = analysis.histogram(ws, c, NAME)
    rows = data["rows"]
    for j in range(3):
        kept, dropped = [s["counts"] for s in data["series"] if s["index"] == j]
        assert sum(kept) == rows[j]["kept"] and sum(kept) + sum(dropped) == rows[j]["numel"]


def test_mask_data_ties_winners_and_conflicts(ws):
    c = cfg(ws, preset="ties", density=0.3)
    d = analysis.mask_data(ws, c, NAME)
    # independently: magnitude masks, weighted deltas, elected sign, agreeing entries
    ds = [delta(ws, j) for j in range(3)]
    kept = [x.abs() >= float(kth_largest(x.abs(), keep_count(0.3, x.numel()))) for x in ds]
    pruned = torch.stack([x * k for x, k in zip(ds, kept)])
    sign = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    conflict = ((pruned != 0) & (pruned.sign() != sign)).any(0)
    assert d["conflict_pct"] == pytest.approx(100 * float(conflict.float().mean()))
    agree = pruned * (pruned.sign() == sign)
    winner = torch.where(agree.abs().amax(0) > 0, agree.abs().argmax(0), -1)
    for i, ref in enumerate(d["models"]):
        assert d["winner_pct"][ref] == pytest.approx(100 * float((winner == i).float().mean()))
        assert d["kept_pct"][ref] == pytest.approx(100 * keep_count(0.3, ds[i].numel()) / ds[i].numel())
    assert d["pcb"] is None and list(d["kept"][0].shape) == list(ds[0].shape)


def test_pool_downsamples_to_256():
    x = torch.zeros(1024, 600)
    x[:512] = 1
    p = analysis.pool(x)
    assert tuple(p.shape) == (256, 256) and float(p[:128].mean()) == 1.0 and float(p[128:].mean()) == 0.0
    assert tuple(analysis.pool(torch.ones(10)).shape) == (1, 10)


def test_heatmap_values(ws):
    blocks, types, z = analysis.heatmap_values(ws, cfg(ws, preset="dp", density=0.3), "dp_density", 1)
    full = ws.stats.full(5.0)
    dmap = full[1].dp_map(0.3, 0.08)
    assert blocks == [0, 1] and "mlp.up_proj" in types
    assert z[1][types.index("mlp.up_proj")] == pytest.approx(dmap[NAME].density)


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="no chromium for kaleido")
def test_figures_render_with_kaleido(ws):
    pytest.importorskip("kaleido")
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    c = cfg(ws, preset="ties", density=0.3)
    fig = figures.histogram(analysis.histogram(ws, c, NAME), "ties", "magnitude", "none")
    try:
        png = fig.to_image(format="png", width=600, height=400)
    except Exception as e:  # kaleido/chromium setup problems are not this module's
        pytest.skip(f"kaleido could not render: {e}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_apl_random_drop_is_shown_as_a_random_drop(tmp_path):
    """APL drops at random by default: the views count its real mask (as DARE's), with no threshold."""
    ws = Workspace(temp_root=tmp_path, stats_cache=DiskCache(tmp_path / "c")).load("demo:base", ["demo:reverse"])
    cfg = ws.config({"base_model": "demo:base", "prune": "apl", "combine": "sum", "seed": 3,
                     "models": [{"model": "demo:reverse", "parameters": {"density": 0.3}}]})
    ws.apl.wait(cfg, ws.align(cfg), timeout=120)
    name = "model.layers.1.mlp.up_proj.weight"
    (row,) = analysis.thresholds(ws, cfg, name)
    dens = ws.dp_maps(cfg)[0][name].density
    mask = torch.rand(ws.access.shape(name), generator=tensor_generator(3, 0, name)) < dens
    assert row["threshold"] is None and row["kept"] == int(mask.sum()) and row["density"] == pytest.approx(dens)
    data = analysis.histogram(ws, cfg, name)
    assert [s["part"] for s in data["series"]] == ["kept", "dropped"]
    ws.close()


# ------------------------------------------------------------------------------------ the seed methods (issue 16)

def test_dpa_views_show_the_kept_mass_after_each_bands_alpha(ws):
    """Moving α₁ moves what the views show: the kept entries after their band's α (histogram), and
    the kept Σ|δ| after over before (table), as DPA computes them on the pruned delta."""
    from dppa_ui.methods import dpa_amplify, magnitude_prune
    shown = {}
    for alpha in (1.8, 3.6):
        c = cfg(ws, preset="dppa", density=0.3, alphas=(alpha, 1.0), dp_lambda=0.0)
        data = analysis.histogram(ws, c, NAME)
        for j, r in enumerate(data["rows"]):
            m = c.for_tensor(NAME).models[j]
            pruned = magnitude_prune(delta(ws, j), r["density"])
            after = dpa_amplify(pruned, m.get("partitions"), m.get("amplification"))
            assert r["alphas"] == [alpha, 1.0]
            assert r["mass_ratio"] == pytest.approx(float(after.abs().sum() / pruned.abs().sum()), rel=1e-5)
        amp = [s["counts"] for s in data["series"] if s["part"] == "amplified"]
        assert [sum(x) for x in amp] == [r["kept"] for r in data["rows"]]          # every kept entry, once
        centre = [sum(n * x for n, x in zip(k, data["centers"])) / sum(k) for k in amp]
        shown[alpha] = ([r["mass_ratio"] for r in data["rows"]], centre)
    assert all(hi > lo > 1 for lo, hi in zip(shown[1.8][0], shown[3.6][0]))
    assert all(hi > lo for lo, hi in zip(shown[1.8][1], shown[3.6][1]))           # the kept mass moves right


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_pcb_views_show_its_drop_its_weights_and_its_scores(ws, scope):
    """PCB prunes nothing but drops in its combine: each fine-tune keeps the entries whose balancing
    weight is > 0 (its top pcb_ratio of scores, per tensor or of the whole model), as methods.pcb
    computes them."""
    from dppa_ui.methods.pcb import clip_abs, cut_position, pcb_scale, score_and_cut
    from dppa_ui.methods.select import row_kth_smallest
    c = cfg(ws, preset="pcb", pcb_ratio=0.1)
    c = c.with_settings({"pcb_scope": scope})
    flat = torch.stack([delta(ws, j).reshape(-1) for j in range(3)])
    stats = ws.pcb_stats(c)
    assert (stats is None) == (scope == "tensor")
    bounds = None if stats is None else (stats.lo, stats.hi)
    scale = pcb_scale(flat, 0.1, clip_ratio=c.get("clip_ratio"), stats=stats)
    score, cut, _ = score_and_cut(flat, clip_abs(flat, c.get("clip_ratio"), bounds), 0.1, stats)
    if scope == "tensor":      # this tensor's own rows: the cut is its sorted score at int(d * 0.9)
        assert torch.equal(cut, row_kth_smallest(score, cut_position(flat.shape[1], 0.1)))
    rows = analysis.thresholds(ws, c, NAME)
    for j, r in enumerate(rows):
        assert r["kept"] == int((scale[j] > 0).sum()) and r["kept"] > 0
        if scope == "tensor":
            assert r["kept"] == pytest.approx(0.1 * flat.shape[1], rel=0.01)
        assert r["pcb_cut"] == pytest.approx(float(cut[j]))
    data = analysis.histogram(ws, c, NAME)
    assert [s["part"] for s in data["series"]] == ["kept", "dropped"] * 3 and data["pcb_ratio"] == 0.1
    d = analysis.mask_data(ws, c, NAME)
    for j, ref in enumerate(d["models"]):
        kept = scale[j][scale[j] > 0]
        assert d["kept_pct"][ref] == pytest.approx(100 * kept.numel() / flat.shape[1])
        assert d["pcb_mean_weight"][ref] == pytest.approx(float(kept.mean()), rel=1e-5) and d["pcb_mean_weight"][ref] > 0
    mv = analysis.method_view(ws, c, NAME)
    assert mv["kind"] == "pcb" and [r["cut"] for r in mv["series"]] == pytest.approx(cut.reshape(-1).tolist())
    assert [r["kept"] for r in mv["series"]] == [r["kept"] for r in rows]
    assert "balancing scores" in figures.method_view(mv).layout.title.text


def test_merged_delta_is_the_merge_s_beside_task_arithmetic(ws):
    """The before / after view: task arithmetic's merged δ and the method's, as the merge builds it."""
    from dppa_ui.pipeline import merge_tensor
    c = cfg(ws, preset="ties", density=0.3, lambda_=0.7)
    d = analysis.merged_delta(ws, c, NAME)
    base = ws.fam.base_sd[NAME].float()
    after = merge_tensor(c, NAME, base, [ws.fam.ft_sds[j][NAME] for j in range(3)]) - base
    before = 0.7 * sum(delta(ws, j) for j in range(3))
    assert d["nonzero"][1] == pytest.approx(float((after != 0).float().mean()), abs=1e-3) and d["nonzero"][1] < 0.9
    assert d["nonzero"][0] == pytest.approx(float((before != 0).float().mean()))
    assert d["norm_ratio"] == pytest.approx(float(after.norm() / before.norm()), rel=1e-4)
    assert analysis.merged_delta(ws, cfg(ws, preset="linear"), NAME) is None         # an interpolation: none


@pytest.mark.parametrize("over", [{}, {"alpha1": 3.6, "alpha2": 0.5}, {"alpha1": 0.5, "alpha2": 2.0}, {"density": 0.05}])
def test_dpa_views_read_off_the_ranks_equal_the_pipeline_s_amplified_deltas(over, tiny_llama, tmp_path):
    """The DPA views (kept mass after / before, the amplified histogram) are read off the sorted |δ|
    and the cuts of its ranks instead of pruning and amplifying every fine-tune (1 s a slider move at
    0.5 B): they must equal the pipeline's own tensors, ties at the cuts included (bf16 deltas have
    many)."""
    fam = tiny_llama("dpa-ties", n_ft=3, dtype=torch.bfloat16)
    ws = Workspace(temp_root=tmp_path).load(str(fam.base), [str(p) for p in fam.fts], start_stats=False)
    try:
        ws.stats.start(5.0)
        ws.stats.wait(timeout=120)
        c = MethodControls(preset="dppa", density=over.get("density", 0.3),
                           alphas=(over.get("alpha1", 1.8), over.get("alpha2", 1.0)))
        cfg = analysis.fine_tunes(ws.config(c))
        ties = checked = 0
        for name in ws.access.matrix_names():
            idx, stp, _ = analysis.steps(ws, cfg, name)
            if not analysis.ranked_bands(cfg, cfg.for_tensor(name), stp):
                assert "layers" not in name          # DP keeps the embeddings and lm_head whole
                continue
            checked += 1
            rows = analysis.thresholds(ws, cfg, name)
            before, after = analysis.amplified_deltas(ws, cfg, name)
            samples = [analysis._log_sample(ws, name, j) for j in idx]
            fast = analysis.amplified_samples(ws, cfg, name, rows, samples)
            for i, row in enumerate(rows):
                a = ws.access.delta(name, idx[i]).abs()
                ties += int((a == row["threshold"]).sum()) - 1 if row["threshold"] is not None else 0
                mass = float(before[i].abs().double().sum())
                if mass == 0:
                    assert row["mass_ratio"] is None
                else:
                    assert row["mass_ratio"] == pytest.approx(float(after[i].abs().double().sum()) / mass, rel=1e-6)
                ref = analysis.sample_flat(after[i].reshape(-1), analysis.HIST_SAMPLE).abs().log10()
                assert torch.equal(torch.isfinite(fast[i]), torch.isfinite(ref))
                keep = torch.isfinite(ref)
                assert torch.allclose(fast[i][keep], ref[keep], atol=1e-5)
        assert checked >= 14 and ties > 0        # every block matrix, ties at the cuts among them
    finally:
        ws.close()
