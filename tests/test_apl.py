"""APL (issue 9): importance by causal intervention against a hand-computed loss difference, the
gradient approximation against δ·∇L computed independently, densities that average to the target,
the row-level prune against plain loops, the cache, the merge paths, and bad input refused before
any compute."""
from __future__ import annotations

import json

import pytest
import torch

import dppa_ui
from dppa_ui import apl, io
from dppa_ui.cli import main
from dppa_ui.config import ConfigError, load_config
from dppa_ui.refs import resolve_model
from dppa_ui.methods.apl import (apl_prune, calibrated_densities, density_map, gradient_importance,
                                 importance_weights, intervention_importance, partition_groups)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own on-disk importance cache and an empty memory cache."""
    monkeypatch.setenv(apl.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(apl, "_MEMORY", {})


def _model(path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return m.eval()


def _loss_on(tokens):
    def loss(model):
        logits = model(input_ids=tokens).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    fam = tiny_llama("apl", n_ft=2, scale=0.05)
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(7))
    return fam, tokens


# ------------------------------------------------------------------------------------- importance

def test_intervention_equals_hand_computed_loss_difference(tiny):
    fam, tokens = tiny
    loss = _loss_on(tokens)
    model = _model(fam.fts[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = {k: v.float() for k, v in fam.base_sd.items()}
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    modules = partition_groups(shapes, "module")
    blocks = partition_groups(shapes, "block")
    got_m = intervention_importance(model, loss, base, modules)
    got_b = intervention_importance(model, loss, base, blocks)
    # the fine-tune is untouched afterwards, bit for bit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # by hand: a fresh copy with the partition's weights replaced by the base's
    with torch.no_grad():
        ref = float(loss(_model(fam.fts[0])))
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]:
            m = _model(fam.fts[0])
            m.get_parameter(name).copy_(fam.base_sd[name])
            assert got_m[name] == pytest.approx(float(loss(m)) - ref, abs=1e-6)
        m = _model(fam.fts[0])
        for name in blocks[1]:
            m.get_parameter(name).copy_(fam.base_sd[name])
        assert got_b[1] == pytest.approx(float(loss(m)) - ref, abs=1e-6)
    assert set(got_m) == {n for n in shapes if len(shapes[n]) == 2 and ".layers." in n}
    assert set(got_b) == {0, 1}


@pytest.mark.parametrize("at, alpha", [("finetune", 1.0), ("midpoint", 0.5), ("base", 0.0)])
def test_gradient_approximation_is_minus_delta_dot_grad(tiny, at, alpha):
    fam, tokens = tiny
    loss = _loss_on(tokens)
    base = {k: v.float() for k, v in fam.base_sd.items()}
    ft = {k: v.float() for k, v in fam.ft_sds[0].items()}
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    groups = partition_groups(shapes, "module")
    model = _model(fam.fts[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got, whole = gradient_importance(model, loss, base, groups, at=at)
    rows, _ = gradient_importance(model, loss, base, groups, at=at, rows=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # independently: a model at θ_b + α(θ_t − θ_b), one autograd.grad call, plain loops
    ref_model = _model(fam.fts[0])
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            p.copy_(base[n] + alpha * (ft[n] - base[n]))
    params = dict(ref_model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(ref_model), list(params.values()))))
    total = 0.0
    for n, g in grads.items():
        d = ft[n] - base[n]
        total += -float((d.double() * g.double()).sum())
        if n in groups:
            assert got[n] == pytest.approx(-float((d.double() * g.double()).sum()), rel=1e-6, abs=1e-9)
            for r in range(d.shape[0]):
                want = -sum(float(d[r, c]) * float(g[r, c]) for c in range(d.shape[1]))
                assert float(rows[n][r]) == pytest.approx(want, rel=1e-5, abs=1e-8)
    assert whole == pytest.approx(total, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------- densities

@pytest.mark.parametrize("seed", range(6))
def test_densities_average_to_the_target_and_follow_importance(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    imp = torch.randn(n, generator=g).exp() * (10 if seed % 2 else 0.01)    # heavy-tailed, any scale
    numel = torch.randint(10, 5000, (n,), generator=g)
    for density in (0.05, 0.2, 0.5, 0.9):
        for spread in (0.0, 0.1, 0.6, 1.0):            # large spreads clamp at 0 and 1
            d = calibrated_densities(imp, numel, density, spread)
            assert float((d * numel).sum() / numel.sum()) == pytest.approx(density, abs=1e-9)
            assert bool(((d >= 0) & (d <= 1)).all())
            order = imp.argsort()
            assert bool((d[order][1:] >= d[order][:-1] - 1e-12).all())     # more important keeps more
            if spread == 0.0:
                assert torch.allclose(d, torch.full_like(d, density))
    assert torch.allclose(calibrated_densities(torch.ones(5), torch.ones(5), 0.3, 0.5), torch.full((5,), 0.3,
                                                                                                     dtype=torch.float64))


def test_row_level_density_map_and_merge_keep_the_target(tiny):
    fam, tokens = tiny
    base = {k: v.float() for k, v in fam.base_sd.items()}
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    rows, _ = gradient_importance(_model(fam.fts[0]), _loss_on(tokens), base, partition_groups(shapes, "row"),
                                  rows=True)
    dmap = density_map(rows, shapes, "row", 0.3, 0.2)
    total = sum(float(d.rows.sum()) * shapes[n][1] for n, d in dmap.items())
    assert total / sum(shapes[n][0] * shapes[n][1] for n in dmap) == pytest.approx(0.3, abs=1e-9)
    assert all(d.rows.shape == (shapes[n][0],) for n, d in dmap.items())


def test_importance_weights():
    assert importance_weights([1.0, 3.0]) == [0.5, 1.5]
    assert importance_weights([-1.0, 2.0]) == [0.0, 2.0]
    assert importance_weights([-1.0, 0.0]) == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ prune

def test_row_magnitude_prune_against_a_loop():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 9, generator=g)
    delta[2, :4] = 0.5                     # ties: the lower column index wins
    rows = torch.tensor([0.0, 0.1, 0.45, 0.5, 0.99, 1.0], dtype=torch.float64)
    out = apl_prune(delta, 0.5, rows, "magnitude")
    for r in range(6):
        k = int(float(rows[r]) * 9)
        order = sorted(range(9), key=lambda c: (-abs(float(delta[r, c])), c))[:k]
        want = torch.zeros(9)
        want[order] = delta[r, order]
        assert torch.equal(out[r], want)


def test_row_random_prune_rescales_each_row_by_its_density():
    delta = torch.ones(3, 20000)
    rows = torch.tensor([0.0, 0.25, 0.8], dtype=torch.float64)
    out = apl_prune(delta, 0.5, rows, "random", torch.Generator().manual_seed(1))
    assert float(out[0].abs().sum()) == 0.0
    for r, d in ((1, 0.25), (2, 0.8)):
        kept = out[r][out[r] != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / d))
        assert kept.numel() / 20000 == pytest.approx(d, abs=0.02)


# ---------------------------------------------------------------------------- the demo and merges

def _demo_cfg(names, density=0.2, **params):
    return {"prune": "apl", "combine": "sum", "base_model": "demo:base",
            "models": [{"model": f"demo:{n}", "parameters": {"density": density}} for n in names],
            "parameters": {"apl_examples": 4, **params}}


def test_importance_is_cached_in_memory_and_on_disk(tmp_path):
    cfg = load_config(_demo_cfg(["sort"]))
    first = apl.merge_inputs(cfg)
    assert first.importance[0].cached == "" and first.importance[0].examples == 4
    assert apl.merge_inputs(cfg).importance[0].cached == "memory"
    apl._MEMORY.clear()
    again = apl.merge_inputs(cfg).importance[0]
    assert again.cached == "disk" and again.values == first.importance[0].values
    assert list((tmp_path / "cache" / "apl").glob("*.safetensors"))


def test_importance_table_for_the_app():
    t = apl.importance_table("demo:base", "demo:reverse", examples=4, density=0.2)
    assert t["blocks"] == [0, 1, 2, 3] and len(t["modules"]) == 7 and "self_attn.q_proj" in t["modules"]
    for key in ("exact", "gradient", "density"):
        assert len(t[key]) == 4 and all(len(r) == 7 and all(isinstance(v, float) for v in r) for r in t[key])
    assert sum(t["block_gradient"]) == pytest.approx(sum(map(sum, t["gradient"])), rel=1e-6)
    assert t["model_exact"] == pytest.approx(t["loss_base"] - t["loss_finetune"]) and t["model_exact"] > 1
    size = {m: (3 if m.startswith("mlp.") else 1) for m in t["modules"]}        # 384x128 vs 128x128 matrices
    kept = sum(d * size[m] for row in t["density"] for d, m in zip(row, t["modules"]))
    assert kept / (4 * sum(size.values())) == pytest.approx(0.2, abs=1e-9)
    assert t["data"] == "demo dev split: reverse" and t["examples"] == 4


def test_apl_merge_in_memory_equals_disk_and_records_importance(tmp_path, read_weights):
    cfg = _demo_cfg(["reverse", "sort"], apl_level="row", apl_drop="magnitude", apl_weights=True)
    mem = dppa_ui.merge_in_memory(io.read_state_dict(resolve_model("demo:base")),
                                  [io.read_state_dict(resolve_model(f"demo:{n}")) for n in ("reverse", "sort")], cfg)
    res = dppa_ui.merge(cfg, tmp_path / "out")
    disk = read_weights(tmp_path / "out")
    assert all(torch.equal(mem[k], disk[k]) for k in disk)
    rec = json.loads((tmp_path / "out" / "dppa_apl.json").read_text())
    assert [m["model"] for m in rec["models"]] == ["demo:reverse", "demo:sort"]
    weights = [m["merge_weight"] for m in rec["models"]]
    assert sum(weights) == pytest.approx(2.0) and weights[0] != weights[1]
    # the saved YAML reruns to the same tensors (the importance, hence the weights, are recomputed)
    dppa_ui.merge(str(tmp_path / "out" / "dppa_merge.yaml"), tmp_path / "again")
    assert all(torch.equal(disk[k], v) for k, v in read_weights(tmp_path / "again").items())
    # magnitude drop: the block matrices keep the target share, up to one entry per row (int(d·cols));
    # the other tensors (embeddings, norms, lm_head) are kept whole
    shapes = {k: tuple(v.shape) for k, v in disk.items()}
    targets = sum(a * b for n, (a, *rest) in shapes.items() for b in rest if len(shapes[n]) == 2 and ".layers." in n)
    rows = sum(s[0] for n, s in shapes.items() if len(s) == 2 and ".layers." in n)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    for kept in res.kept_fraction:
        assert kept * total == pytest.approx(0.2 * targets + total - targets, abs=rows + 1)


def test_apl_composes_with_every_combine():
    base = io.read_state_dict(resolve_model("demo:base"))
    fts = [io.read_state_dict(resolve_model(f"demo:{n}")) for n in ("cipher", "brackets")]
    outs = {}
    for combine in ("sum", "ties", "pcb"):
        cfg = _demo_cfg(["cipher", "brackets"], 0.3)
        cfg["combine"] = combine
        outs[combine] = dppa_ui.merge_in_memory(base, fts, cfg)
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(outs["sum"][name], outs["ties"][name]) and not torch.equal(outs["sum"][name], outs["pcb"][name])


# ------------------------------------------------------------------------------------- bad input

def test_apl_without_data_for_a_non_demo_model_is_refused_before_compute(tiny_family, tmp_path, monkeypatch,
                                                                         capsys):
    def boom(*a, **k):
        raise AssertionError("a tensor was read or a model loaded")
    monkeypatch.setattr(io.CheckpointReader, "get", boom)
    monkeypatch.setattr(io.CheckpointReader, "view", boom)
    monkeypatch.setattr("dppa_ui.modelbuild.load", boom)
    cfg = {"prune": "apl", "base_model": str(tiny_family.base),
           "models": [{"model": str(p), "parameters": {"density": 0.3}} for p in tiny_family.fts]}
    with pytest.raises(ConfigError, match="apl_data"):
        dppa_ui.merge(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match="apl_data"):
        dppa_ui.merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, cfg)
    assert not (tmp_path / "out").exists()
    path = tmp_path / "apl.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), "--out", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "apl_data" in err and "\n" not in err


def test_apl_data_file_is_used_and_checked(tiny_family, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "p", "answer": "a"}\n' * 3)
    td = apl.task_data(tiny_family.fts[0], "ft0", str(data), examples=2)
    assert len(td.items) == 2 and td.source == str(data)
    with pytest.raises(ConfigError, match="not a file"):
        apl.task_data(tiny_family.fts[0], "ft0", str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("params, needle", [
    ({"apl_level": "row", "apl_importance": "exact"}, "apl_importance"),
    ({"apl_level": "layer"}, "apl_level"),
    ({"apl_examples": 0}, "apl_examples"),
    ({"apl_lambda": 2}, "apl_lambda"),
    ({"apl_drop": "sorted"}, "apl_drop"),
])
def test_bad_apl_keys_refused(params, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(_demo_cfg(["sort"], **params))


def test_apl_config_round_trip():
    cfg = load_config(_demo_cfg(["sort"], apl_level="block", apl_drop="magnitude", apl_weights=True,
                                 apl_gradient_at="base"))
    again = load_config(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()
    assert again.apl_importance_kind == "exact" and again.get("apl_examples") == 4
