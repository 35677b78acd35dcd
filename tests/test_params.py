"""Per-tensor parameters (gradient lists and `filter` entries) resolved as mergekit 0.1.5 resolves
them, checked against references written here from mergekit's semantics (numpy's interp for
gradients, first-matching substring for filters, model > slice > config precedence), and used by
the in-memory and streaming merges."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dppa_ui
from dppa_ui import ConfigError, load_config, merge_in_memory
from dppa_ui.params import gradient_curve, layer_of, layer_t, rename_layer


def ref_gradient(anchors, layer, n_layers):
    """mergekit: t = i / (L - 1) (1 for one layer); value = linear interpolation at t (n - 1)."""
    t = layer / (n_layers - 1) if n_layers > 1 else 1.0
    return float(np.interp(t * (len(anchors) - 1), np.arange(len(anchors)), anchors))


def cfg(method="task_arithmetic", models=None, params=None, **top):
    d = {"merge_method": method, "base_model": "base",
         "models": models if models is not None else [{"model": "a"}, {"model": "b"}]}
    if params is not None:
        d["parameters"] = params
    d.update(top)
    return load_config(d)


@pytest.mark.parametrize("anchors", [[0.0, 1.0], [0.0, 0.5, 0.3, 0.7, 1.0], [0.2], [1.0, -1.0, 3.0]])
@pytest.mark.parametrize("n_layers", [1, 2, 5, 32])
def test_gradient_matches_linear_interpolation_over_layers(anchors, n_layers):
    c = cfg(models=[{"model": "a", "parameters": {"weight": anchors}}]).with_layers(n_layers)
    for i in range(n_layers):
        v = c.for_tensor(f"model.layers.{i}.mlp.up_proj.weight").models[0].get("weight")
        assert v == pytest.approx(ref_gradient(anchors, i, n_layers), abs=1e-12)
    # outside the layers (embeddings, final norm, lm_head): t = 0, the first anchor
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert c.for_tensor(name).models[0].get("weight") == anchors[0]
    assert gradient_curve(anchors, "mlp", n_layers) == pytest.approx(
        [ref_gradient(anchors, i, n_layers) for i in range(n_layers)])


def test_filters_first_match_then_fallthrough_to_the_config_scope():
    c = cfg(models=[{"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                                             {"filter": "mlp", "value": 0.3}]}},
                    {"model": "b"}],
            params={"weight": [{"filter": "norm", "value": 2.0}, {"value": 0.7}]}).with_layers(3)
    a = lambda name: c.for_tensor(name).models[0].get("weight")  # noqa: E731
    b = lambda name: c.for_tensor(name).models[1].get("weight")  # noqa: E731
    assert a("model.layers.1.self_attn.q_proj.weight") == pytest.approx(0.5)
    assert a("model.layers.2.mlp.down_proj.weight") == 0.3
    assert a("model.layers.0.input_layernorm.weight") == 2.0      # no model filter matches: config scope
    assert a("model.embed_tokens.weight") == 0.7
    assert b("model.layers.1.self_attn.q_proj.weight") == 0.7 and b("model.norm.weight") == 2.0


def test_star_filter_and_bool_and_choice_gradients():
    c = load_config({"merge_method": "model_stock", "base_model": "base", "models": ["a", "b"],
                     "parameters": {"filter_wise": [{"filter": "*", "value": [False, True]}]}}).with_layers(4)
    vals = [c.for_tensor(f"model.layers.{i}.mlp.up_proj.weight").get("filter_wise") for i in range(4)]
    assert vals == [False, False, False, True]           # discrete values pick v[int(t (n - 1))]


def test_constant_configs_resolve_to_themselves():
    c = cfg(params={"weight": 0.5})
    assert c.varying() == [] and c.for_tensor("model.layers.0.mlp.up_proj.weight") is c


def test_gradient_needs_the_layer_count():
    c = cfg(params={"weight": [0.0, 1.0]})
    with pytest.raises(ValueError, match="with_layers"):
        c.for_tensor("model.layers.3.mlp.up_proj.weight")


def test_required_value_without_a_matching_filter_is_refused():
    c = load_config({"merge_method": "slerp", "base_model": "base", "models": ["a"],
                     "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]}}).with_layers(2)
    assert c.for_tensor("model.layers.0.self_attn.q_proj.weight").get("t") == 0.5
    with pytest.raises(ConfigError, match="no `filter` entry matches"):
        c.for_tensor("model.layers.0.mlp.up_proj.weight")


def test_layer_helpers():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12 and layer_of("lm_head.weight") is None
    assert rename_layer("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert layer_t(None, 10) == 0.0 and layer_t(3, 4) == 1.0 and layer_t(0, 1) == 1.0


def test_round_trip_keeps_settings():
    c = cfg(models=[{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 1}]}},
                    {"model": "b", "parameters": {"weight": [0.0, 0.5]}}])
    again = load_config(c.to_yaml())
    assert again.to_dict() == c.to_dict() and again.models == c.models


def test_breadcrumbs_constraint_checked_per_tensor():
    c = load_config({"merge_method": "breadcrumbs", "base_model": "base", "models": ["a"],
                     "parameters": {"density": [0.5, 0.95], "gamma": 0.1}}).with_layers(2)
    c.for_tensor("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match="density \\+ gamma <= 1"):
        c.for_tensor("model.layers.1.mlp.up_proj.weight")


# --------------------------------------------------------------------------- merges use the resolved values

@pytest.mark.slow
def test_in_memory_merge_uses_per_tensor_weights(tiny_family):
    """task_arithmetic with a weight gradient on one model and filters on the other:
    merged = base + sum_i w_i(tensor) delta_i, with w_i from the reference resolution."""
    fam = tiny_family
    n_layers = 2
    c = {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "a", "parameters": {"weight": [0.0, 1.0]}},
                    {"model": "b", "parameters": {"weight": [{"filter": "self_attn", "value": -0.5}, {"value": 0.25}]}}]}
    out = merge_in_memory(fam.base_sd, fam.ft_sds, c)
    for k, base in fam.base_sd.items():
        layer = layer_of(k)
        wa = 0.0 if layer is None else ref_gradient([0.0, 1.0], layer, n_layers)
        wb = -0.5 if "self_attn" in k else 0.25
        ref = base + wa * (fam.ft_sds[0][k] - base) + wb * (fam.ft_sds[1][k] - base)
        assert torch.allclose(out[k], ref, atol=1e-6), k


def test_streaming_merge_equals_in_memory_with_gradients(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    c = {"merge_method": "ties", "base_model": str(fam.base),
         "models": [{"model": str(fam.fts[0]), "parameters": {"density": [0.2, 0.8], "weight": 1.0}},
                    {"model": str(fam.fts[1]), "parameters": {"density": [{"filter": "mlp", "value": 0.3},
                                                                          {"value": 0.6}], "weight": 0.5}}]}
    dppa_ui.merge(c, tmp_path / "out")
    on_disk = read_weights(tmp_path / "out")
    mem = merge_in_memory(fam.base_sd, fam.ft_sds, c)
    assert all(torch.equal(on_disk[k], mem[k]) for k in mem)
    # the density really varies: layer 0 keeps less of model 0's delta than layer 1
    k0, k1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    single = merge_in_memory(fam.base_sd, fam.ft_sds[:1], {**c, "models": c["models"][:1]})
    kept0 = (single[k0] != fam.base_sd[k0]).float().mean().item()
    kept1 = (single[k1] != fam.base_sd[k1]).float().mean().item()
    assert kept0 == pytest.approx(0.2, abs=0.02) and kept1 == pytest.approx(0.8, abs=0.02)


def test_dry_run_lists_resolved_values(tiny_family, tmp_path):
    c = {"merge_method": "slerp", "base_model": str(tiny_family.base), "models": [str(tiny_family.fts[0])],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}}
    res = dppa_ui.merge(c, None, dry_run=True)
    lines = {ln.split()[1]: ln for ln in res.report.splitlines() if ln.startswith("tensor ")}
    assert "t=0" in lines["model.layers.0.self_attn.q_proj.weight"]
    assert "t=1" in lines["model.layers.1.self_attn.q_proj.weight"]
    assert "t=0.5" in lines["model.layers.1.mlp.up_proj.weight"]
