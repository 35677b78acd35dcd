"""`slices` and `passthrough` (mergekit's layer stacking) end to end on tiny Llamas: which input
tensor lands where, the output's layer count, per-source `scale`, the refusals before any read,
and that the stacked model loads in transformers."""
from __future__ import annotations

import json

import pytest
import torch

import dppa_ui
from dppa_ui import ConfigError, load_config, merge_in_memory


def src(path, a, b, **params):
    d = {"model": str(path), "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


def frankenmerge(fam):
    # 2 + 1 layers: ft0's layers 0-1, then ft1's layer 1 (a 3-layer model from 2-layer ones)
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [src(fam.fts[0], 0, 2)]}, {"sources": [src(fam.fts[1], 1, 2)]}]}


def test_passthrough_frankenmerge_stacks_layers_and_loads(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    res = dppa_ui.merge(frankenmerge(fam), tmp_path / "out")
    out = read_weights(tmp_path / "out")
    ft0, ft1 = fam.ft_sds
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert res.tensors == len(out) == len(fam.base_sd) + 9          # one more layer of 9 tensors
    for k, v in ft0.items():
        if ".layers.1." in k:
            assert torch.equal(out[k], v) and torch.equal(out[k.replace(".layers.1.", ".layers.2.")],
                                                          ft1[k]), k
        elif ".layers.0." in k:
            assert torch.equal(out[k], v), k
    assert torch.equal(out["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])   # first slice
    assert torch.equal(out["model.norm.weight"], ft1["model.norm.weight"])                   # last slice
    assert torch.equal(out["lm_head.weight"], ft1["lm_head.weight"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert len(model.model.layers) == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the same in memory, from state dicts by ref
    mem = merge_in_memory(None, {str(fam.fts[0]): ft0, str(fam.fts[1]): ft1}, frankenmerge(fam))
    assert all(torch.equal(mem[k], out[k]) for k in out)


def test_passthrough_scale_per_source(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    c = {"merge_method": "passthrough",
         "slices": [{"sources": [src(fam.fts[0], 0, 1)]}, {"sources": [src(fam.fts[1], 0, 2, scale=0.5)]}]}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    ft0, ft1 = fam.ft_sds
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[k], ft0[k])
    assert torch.allclose(out["model.layers.1.self_attn.q_proj.weight"], 0.5 * ft1[k])
    assert torch.allclose(out["model.layers.2.mlp.up_proj.weight"], 0.5 * ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.allclose(out["lm_head.weight"], 0.5 * ft1["lm_head.weight"])          # last slice's source


def test_ties_on_slices_covering_all_layers_equals_models_form(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    params = {"density": 0.4}
    models_cfg = {"merge_method": "ties", "base_model": str(fam.base), "parameters": params,
                  "models": [str(p) for p in fam.fts]}
    sliced = {"merge_method": "ties", "base_model": str(fam.base), "parameters": params,
              "slices": [{"sources": [src(fam.base, a, b)] + [src(p, a, b) for p in fam.fts]} for a, b in ((0, 1), (1, 2))]}
    dppa_ui.merge(sliced, tmp_path / "s")
    dppa_ui.merge(models_cfg, tmp_path / "m")
    a, b = read_weights(tmp_path / "s"), read_weights(tmp_path / "m")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_slerp_gradient_runs_over_each_slice(tiny_llama, read_weights, tmp_path):
    fam = tiny_llama("slices4", n_ft=1)
    c = {"merge_method": "slerp", "base_model": str(fam.base), "parameters": {"t": [0.0, 1.0]},
         "slices": [{"sources": [src(fam.base, 0, 2), src(fam.fts[0], 0, 2)]},
                    {"sources": [src(fam.base, 0, 2), src(fam.fts[0], 0, 2)]}]}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    k = "model.layers.{}.mlp.up_proj.weight"
    # t restarts in every slice: layers 0 and 2 are the base (t = 0), layers 1 and 3 the fine-tune (t = 1)
    assert torch.allclose(out[k.format(0)], fam.base_sd[k.format(0)], atol=1e-6)
    assert torch.allclose(out[k.format(1)], fam.ft_sds[0][k.format(1)], atol=1e-6)
    assert torch.allclose(out[k.format(2)], fam.base_sd[k.format(0)], atol=1e-6)
    assert torch.allclose(out[k.format(3)], fam.ft_sds[0][k.format(1)], atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_layer_range_outside_the_model_is_refused_before_writing(tiny_family, tmp_path):
    c = {"merge_method": "passthrough", "slices": [{"sources": [src(tiny_family.fts[0], 0, 5)]}]}
    with pytest.raises(ConfigError, match=r"layer_range.*\[0, 5\].*2 layers"):
        dppa_ui.merge(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("slices,needles", [
    ([{"sources": [src("a", 0, 2), src("b", 0, 3)]}], ["same number of layers"]),
    ([{"sources": [src("a", 2, 1)]}], ["empty or reversed"]),
    ([{"sources": [{"model": "a", "layer_range": [0]}]}], ["layer_range", "[start, end]"]),
    ([{"sources": [src("a", 0, 2), src("b", 0, 2)]}], ["passthrough", "exactly 1"]),
    ([{"sources": [src("a", 0, 2)], "weight": 1}], ["slices[0].weight"]),
])
def test_slice_refusals(slices, needles):
    with pytest.raises(ConfigError) as e:
        load_config({"merge_method": "passthrough", "slices": slices})
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_pipeline_slices_need_the_base_among_sources():
    with pytest.raises(ConfigError, match="base model b among the slice's sources"):
        load_config({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [src("a", 0, 2)]}]})
    with pytest.raises(ConfigError, match="slices"):
        load_config({"merge_method": "dp", "base_model": "b",
                     "slices": [{"sources": [src("b", 0, 2), src("a", 0, 2)]}]})


def test_modules_with_one_module_is_read_as_the_config(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    c = {"merge_method": "passthrough", "modules": {"decoder": {"slices": frankenmerge(fam)["slices"]}}}
    cfg = load_config(c)
    assert cfg.slices is not None and any("modules.decoder" in n for n in cfg.notices)
    with pytest.raises(ConfigError, match="multi-module"):
        load_config({"merge_method": "passthrough", "modules": {"a": {"slices": []}, "b": {"slices": []}}})


def test_slices_round_trip_and_dry_run(tiny_family):
    cfg = load_config(frankenmerge(tiny_family))
    again = load_config(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()
    plan = dppa_ui.merge(frankenmerge(tiny_family), None, dry_run=True).report
    assert "3 layers" in plan and "model.layers.2.mlp.up_proj.weight" in plan and "slice 1:" in plan
