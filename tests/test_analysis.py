"""Inspect data and figures (dppa_ui.analysis) on a tiny random Llama family built in tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_session import make_family  # noqa: E402

from dppa_ui import analysis  # noqa: E402
from dppa_ui.config import load_config  # noqa: E402
from dppa_ui.methods import agreement_mask, keep_count, kth_largest, pcb_scale, random_mask, tensor_generator  # noqa: E402
from dppa_ui.pipeline import merge_state_dicts  # noqa: E402
from dppa_ui.session import ModelCache, Workspace  # noqa: E402
from test_session import _zoo_ready  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = make_family(root)
    return Workspace.load(str(paths["base"]), [str(paths[f"ft{k}"]) for k in range(3)], roots=[root],
                          cache=ModelCache())


def cfg(ws, method="ties", density=0.3, partitions=None, amplification=None, **params):
    models = []
    for r in ws.ft_refs:
        p = {"weight": 1.0, "density": density}
        if partitions:
            p.update(partitions=partitions, amplification=amplification)
        models.append({"model": r, "parameters": p})
    return {"merge_method": method, "base_model": ws.base_ref, "models": models, "parameters": params}


NAME = "model.layers.1.mlp.up_proj.weight"


# ----------------------------------------------------------------------------- thresholds

def test_magnitude_threshold_is_kth_largest_and_moves_with_density(ws):
    n = ws.shapes_numel[NAME]
    prev = None
    for density in (0.5, 0.2, 0.05):
        rows = analysis.thresholds(ws, cfg(ws, "ties", density), NAME)
        assert [r["model"] for r in rows] == ws.ft_refs
        for j, r in enumerate(rows):
            k = keep_count(density, n)
            a = ws.delta(NAME, j).abs()
            assert r["kept"] == k and r["numel"] == n and r["density"] == density
            assert r["threshold"] == pytest.approx(float(kth_largest(a, k)), rel=0, abs=0)
            assert int((a > r["threshold"]).sum()) < k <= int((a >= r["threshold"]).sum())
        if prev is not None:       # a higher prune rate raises every threshold
            assert all(r["threshold"] > p["threshold"] for r, p in zip(rows, prev))
        prev = rows


def test_dp_threshold_uses_module_density(ws):
    c = cfg(ws, "dp", 0.3, dp_outlier_m=4.0, dp_lambda=0.1)
    rows = analysis.thresholds(ws, c, NAME)
    n = ws.shapes_numel[NAME]
    for j, r in enumerate(rows):
        d = ws.dp_map(j, 0.3, 0.1, 4.0)[NAME].density
        assert r["density"] == pytest.approx(d) and r["kept"] == keep_count(d, n)
        assert r["threshold"] == float(kth_largest(ws.delta(NAME, j).abs(), keep_count(d, n)))
    # dp_others: keep -> norms and embeddings are not pruned
    norm = analysis.thresholds(ws, c, "model.layers.0.input_layernorm.weight")
    assert all(r["threshold"] is None and r["kept"] == r["numel"] and r["prune"] == "none" for r in norm)


def test_dpa_band_edges(ws):
    c = cfg(ws, "dppa", 0.4, partitions=[0.1, 0.4], amplification=[2.0, 1.0])
    n = ws.shapes_numel[NAME]
    for j, r in enumerate(analysis.thresholds(ws, c, NAME)):
        off = ws.dp_map(j, 0.4, 0.08, 5.0)[NAME].offset
        f = min(max(0.1 + off, 0.0), 1.0)
        assert r["band_fractions"] == [pytest.approx(f)]
        assert r["band_edges"] == [float(kth_largest(ws.delta(NAME, j).abs(), keep_count(f, n)))]
        assert r["band_edges"][0] > r["threshold"]


def test_random_pruning_has_no_threshold_and_counts_the_real_mask(ws):
    c = cfg(ws, "dare_ties", 0.3)
    c["seed"] = 7
    rows = analysis.thresholds(ws, c, NAME)
    for i, r in enumerate(rows):
        mask = random_mask(ws.shape(NAME), 0.3, tensor_generator(7, i, NAME))
        assert r["threshold"] is None and r["kept"] == int(mask.sum())
        assert 0.25 < r["kept"] / r["numel"] < 0.35


# ----------------------------------------------------------------------------- histogram

def _lines(fig, word):
    return [t for t in fig.data if word in t.name]


def test_histogram_figure_magnitude(ws):
    c = cfg(ws, "dppa", 0.3, partitions=[0.1, 0.3], amplification=[1.5, 1.0])
    fig = analysis.histogram_figure(ws, c, NAME)
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert NAME in fig.layout.title.text
    hists = [t for t in fig.data if "threshold" not in t.name and "band edge" not in t.name]
    assert len(hists) == 3
    nonzero = [int((ws.delta(NAME, j) != 0).sum()) for j in range(3)]
    assert [sum(h.y) for h in hists] == nonzero            # every entry lands in one bin
    th = analysis.thresholds(ws, c, NAME)
    lines = _lines(fig, "threshold")
    assert [ln.x[0] for ln in lines] == [r["threshold"] for r in th]
    assert [ln.x[0] for ln in _lines(fig, "band edge")] == [r["band_edges"][0] for r in th]
    # The slider moves the lines, not the histograms.
    fig2 = analysis.histogram_figure(ws, cfg(ws, "dppa", 0.1, partitions=[0.05, 0.1], amplification=[1.5, 1.0]), NAME)
    assert all(a.x[0] < b.x[0] for a, b in zip(lines, _lines(fig2, "threshold")))
    assert list(fig2.data[0].y) == list(hists[0].y)


def test_histogram_figure_random_kept_vs_dropped(ws):
    fig = analysis.histogram_figure(ws, cfg(ws, "dare_linear", 0.3), NAME)
    kept, dropped = _lines(fig, "kept"), _lines(fig, "dropped")
    assert len(kept) == len(dropped) == 3 and not _lines(fig, "threshold")
    rows = analysis.thresholds(ws, cfg(ws, "dare_linear", 0.3), NAME)
    for k, d, r in zip(kept, dropped, rows):
        assert sum(k.y) == r["kept"] and sum(k.y) + sum(d.y) == r["numel"]
        # DARE ignores magnitude: the kept share is about the same below and above the median |δ|.
        total = [a + b for a, b in zip(k.y, d.y)]
        half = next(b for b in range(len(total)) if sum(total[:b + 1]) >= r["numel"] / 2)
        lo = sum(k.y[:half]) / sum(total[:half])
        hi = sum(k.y[half:]) / sum(total[half:])
        assert abs(lo - 0.3) < 0.05 and abs(hi - 0.3) < 0.05


def test_histogram_uses_a_fixed_sample_on_large_tensors(ws, monkeypatch):
    monkeypatch.setattr(analysis, "HIST_SAMPLE", 1000)
    ws._samples.clear()
    fig = analysis.histogram_figure(ws, cfg(ws, "ties", 0.3), NAME)
    assert sum(fig.data[0].y) == 1000 and "sample of 1,000" in fig.layout.title.text
    ws._samples.clear()


# ----------------------------------------------------------------------------- heatmap

def test_heatmap_values_and_figure(ws):
    c = cfg(ws, "dp", 0.3, dp_outlier_m=4.0)
    blocks, types, z = analysis.heatmap_values(ws, c, "mean_abs", model_index=1)
    assert blocks == [0, 1] and "self_attn.q_proj" in types and "input_layernorm" not in types
    name = ws.tensor_name(1, types[0])
    assert z[1][0] == pytest.approx(float(ws.delta(name, 1).abs().mean()), rel=1e-5)
    _, _, zd = analysis.heatmap_values(ws, c, "dp_density", model_index=1)
    assert zd[1][0] == pytest.approx(ws.dp_map(1, 0.3, 0.08, 4.0)[name].density)
    _, _, zo = analysis.heatmap_values(ws, c, "outlier_pct", model_index=1)
    assert zo[1][0] == pytest.approx(ws.stats_at(4.0)[1].tensors[name].pct_outlier)
    fig = analysis.heatmap_figure(ws, c, "dp_density", model_index=1)
    assert len(fig.data[0].z) == 2 and len(fig.data[0].z[0]) == len(types)
    assert fig.layout.title.text and fig.layout.xaxis.title.text == "module type"
    with pytest.raises(ValueError, match="metric"):
        analysis.heatmap_figure(ws, c, "nope")


# ----------------------------------------------------------------------------- masks

def test_mask_figure_ties(ws):
    c = cfg(ws, "ties", 0.3)
    fig, info = analysis.mask_figure(ws, c, NAME)
    n = ws.shapes_numel[NAME]
    assert all(v == pytest.approx(100 * keep_count(0.3, n) / n) for v in info["kept_pct"].values())
    assert sum(info["winner_pct"].values()) + info["no_winner_pct"] == pytest.approx(100)
    # Sign conflicts, recomputed from the pruned deltas.
    pruned = torch.stack([ws.delta(NAME, j) * (ws.delta(NAME, j).abs() >= analysis.thresholds(ws, c, NAME)[j]["threshold"])
                          for j in range(3)])
    agree = agreement_mask(pruned)
    want = 100 * float(((pruned != 0) & ~agree).any(0).sum()) / n
    assert info["conflict_pct"] == pytest.approx(want)
    assert 0 < info["conflict_pct"] < 100
    # Winners are consistent with the merge: the merged delta has the winner's sign.
    merged = merge_state_dicts(ws.base_sd, ws.ft_sds, load_config(c))[NAME] - ws.base_sd[NAME]
    winner = analysis.combine_maps(ws, c, NAME)["winner"]
    for i in range(3):
        sel = winner == i
        assert torch.equal(torch.sign(merged[sel]), torch.sign(pruned[i][sel]))
    assert len(fig.data) == 3 + 2 and info["pcb_mean_weight"] is None
    assert fig.layout.title.text and info["downsampled_to"] == list(ws.shape(NAME))


def test_mask_figure_pcb_and_random(ws):
    c = cfg(ws, "pcb", 1.0, pcb_ratio=0.2)
    fig, info = analysis.mask_figure(ws, c, NAME)
    flat = torch.stack([ws.delta(NAME, j).reshape(-1) for j in range(3)])
    want = pcb_scale(flat, 0.2).mean(dim=1)
    assert list(info["pcb_mean_weight"].values()) == pytest.approx(want.tolist(), rel=1e-5)
    assert len(fig.data) == 3 + 2 + 3
    assert all(v == 100.0 for v in info["kept_pct"].values())
    _, info = analysis.mask_figure(ws, cfg(ws, "dare_ties", 0.3), NAME)
    rows = analysis.thresholds(ws, cfg(ws, "dare_ties", 0.3), NAME)
    assert list(info["kept_pct"].values()) == [100 * r["kept"] / r["numel"] for r in rows]


def test_pool_downsamples_to_256():
    mask = torch.zeros(600, 300, dtype=torch.bool)
    mask[:300] = True
    p = analysis._pool(mask)
    assert tuple(p.shape) == (256, 256)
    assert float(p.mean()) == pytest.approx(0.5, abs=0.01) and float(p[0, 0]) == 1.0 and float(p[-1, -1]) == 0.0
    assert tuple(analysis._pool(torch.ones(1000)).shape) == (1, 256)


# ----------------------------------------------------------------------------- scores, configs

def test_scores_figure():
    rows = [{"model": "merged", "scores": {"reverse": {"em": 0.5, "smooth": 0.7}, "sort": {"em": 0.2, "smooth": 0.4}},
             "objective": 0.61},
            {"model": "base", "scores": {"reverse": {"em": 0.0, "smooth": 0.1}, "sort": {"em": 0.1, "smooth": 0.2}}}]
    fig = analysis.scores_figure(rows, metric="smooth")
    assert [t.name for t in fig.data] == ["merged (objective 0.610)", "base"]
    assert list(fig.data[0].x) == ["reverse", "sort"] and list(fig.data[0].y) == [0.7, 0.4]
    assert "0.610" in fig.layout.title.text and fig.layout.yaxis.title.text == "smooth"
    fig = analysis.scores_figure({"a": rows[0]["scores"]}, metric="em")
    assert list(fig.data[0].y) == [0.5, 0.2]


def test_make_config_round_trips(ws):
    d = analysis.make_config(ws, "dppa", prune_rate=0.8, weights=[1, 0.5, 2], partitions=[0.05],
                             amplification=[2.0], dp_lambda=0.1, seed=3)
    c = load_config(d)
    assert c.method_name == "dppa" and c.seed == 3 and c.dp_lambda == 0.1
    assert [m.weight for m in c.models] == [1, 0.5, 2]
    assert c.models[0].partitions == [0.05, pytest.approx(0.2)] and c.models[0].amplification == [2.0, 1.0]
    assert load_config(analysis.make_config(ws, "task_arithmetic", prune_rate=0.9)).models[0].density == 1.0
    with pytest.raises(ValueError, match="unknown preset"):
        analysis.make_config(ws, "slerp")


@pytest.mark.skipif(not _zoo_ready(), reason="assets/zoo is not built")
def test_demo_family_inspect():
    from dppa_ui import zoo
    fts = [f"demo:{n}" for n in zoo.demo_names() if n != "base"]
    demo = Workspace.load("demo:base", fts, cache=ModelCache())
    name = demo.tensor_name(demo.blocks()[-1], "mlp.down_proj")
    lo = analysis.thresholds(demo, analysis.make_config(demo, "dp", prune_rate=0.5), name)
    hi = analysis.thresholds(demo, analysis.make_config(demo, "dp", prune_rate=0.9), name)
    assert [r["model"] for r in lo] == fts
    assert all(b["threshold"] > a["threshold"] for a, b in zip(lo, hi))
    fig = analysis.histogram_figure(demo, analysis.make_config(demo, "dppa", prune_rate=0.9, partitions=[0.05]), name)
    assert len([t for t in fig.data if "threshold" in t.name]) == len(fts)
    fig, info = analysis.mask_figure(demo, analysis.make_config(demo, "ties", prune_rate=0.9), name)
    assert all(v == pytest.approx(10, abs=0.1) for v in info["kept_pct"].values())
    heat = analysis.heatmap_figure(demo, analysis.make_config(demo, "dp", prune_rate=0.9), "dp_density", model_index=4)
    assert len(heat.data[0].z) == len(demo.blocks())


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="no chromium for kaleido")
def test_figures_render_with_kaleido(ws, tmp_path):
    pytest.importorskip("kaleido")
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    fig = analysis.histogram_figure(ws, cfg(ws, "ties", 0.3), NAME)
    try:
        png = fig.to_image(format="png", width=600, height=400)
    except Exception as e:  # kaleido/chromium setup problems are not this module's
        pytest.skip(f"kaleido could not render: {e}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
