"""LoRA inputs (`MODEL+ADAPTER`, mergekit's {model, lora}): PEFT adapters on a tiny Llama merged into
their base before the merge, checked against W + (alpha / r) B A computed here; adapters of
several ranks; the LoRA merge cache; refusal of an adapter made for another model."""
from __future__ import annotations

import json

import pytest
import torch

import dppa_ui
from dppa_ui import merge_in_memory
from dppa_ui.refs import ModelRefError


def make_adapter(base_dir, out_dir, r: int, seed: int, alpha: int = 8, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(out_dir))
    from safetensors.torch import load_file
    return load_file(str(out_dir / "adapter_model.safetensors"))


def apply_by_hand(base_sd, adapter_sd, r, alpha):
    """W + (alpha / r) B A for every adapted weight (the LoRA definition)."""
    out = dict(base_sd)
    for k, a in adapter_sd.items():
        if ".lora_A." not in k:
            continue
        b = adapter_sd[k.replace(".lora_A.", ".lora_B.")]
        name = k.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        out[name] = base_sd[name] + (alpha / r) * (b @ a)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    fam = tiny_llama()
    root = tmp_path_factory.mktemp("adapters")
    a2 = make_adapter(fam.base, root / "r2", r=2, seed=1)
    a8 = make_adapter(fam.base, root / "r8", r=8, seed=2, alpha=16)
    return fam, root, {"r2": (a2, 2, 8), "r8": (a8, 8, 16)}


def test_adapters_of_two_ranks_merged_into_their_base(adapters, read_weights, tmp_path):
    fam, root, ad = adapters
    cache = tmp_path / "cache"
    c = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
         "models": [{"model": f"{fam.base}+{root / 'r2'}", "parameters": {"weight": 1.0}},
                    {"model": {"model": str(fam.base), "lora": str(root / "r8")}, "parameters": {"weight": 0.5}}]}
    dppa_ui.merge(c, tmp_path / "out", lora_cache=cache)
    out = read_weights(tmp_path / "out")
    lo2 = apply_by_hand(fam.base_sd, *ad["r2"])
    lo8 = apply_by_hand(fam.base_sd, *ad["r8"])
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(lo2[k], fam.base_sd[k])
    for name, base in fam.base_sd.items():
        ref = base + (lo2[name] - base) + 0.5 * (lo8[name] - base)
        assert torch.allclose(out[name], ref, atol=1e-5), name
    merged_dirs = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(merged_dirs) == 2 and all("+" in n for n in merged_dirs)


def test_lora_cache_is_reused(adapters, tmp_path):
    fam, root, _ = adapters
    cache = tmp_path / "cache"
    c = {"merge_method": "task_arithmetic", "base_model": str(fam.base), "models": [f"{fam.base}+{root / 'r2'}"]}
    dppa_ui.merge(c, tmp_path / "o1", lora_cache=cache)
    (merged,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    logs = []
    dppa_ui.merge(c, tmp_path / "o2", lora_cache=cache, log=logs.append)
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any("merging adapter" in m for m in logs)


def test_cli_flag(adapters, tmp_path, capsys):
    import yaml

    from dppa_ui.cli import main
    fam, root, _ = adapters
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "linear", "models": [f"{fam.base}+{root / 'r8'}", str(fam.fts[0])]}))
    assert main(["merge", str(p), "--out", str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert any((tmp_path / "c").iterdir())


def test_adapter_for_another_model_is_refused(adapters, tiny_llama, tmp_path):
    fam, root, _ = adapters
    other = tiny_llama("wide", n_ft=1, vocab=96)              # same shapes, another name
    c = {"merge_method": "task_arithmetic", "base_model": str(other.base),
         "models": [f"{other.base}+{root / 'r2'}"]}
    with pytest.raises(ModelRefError, match="was trained on"):
        dppa_ui.merge(c, tmp_path / "out", lora_cache=tmp_path / "c")
    # recorded base matches by name but the weights do not fit: refused from the shapes
    cfg = json.loads((root / "r2" / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((root / "r2" / "adapter_model.safetensors").read_bytes())
    cfg["base_model_name_or_path"] = str(other.base)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    from conftest import write_tiny_llama
    write_tiny_llama(tmp_path / "small", seed=0)
    import transformers
    small_cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, vocab_size=64)
    transformers.LlamaForCausalLM(small_cfg).save_pretrained(str(tmp_path / "narrow"))
    cfg["base_model_name_or_path"] = str(tmp_path / "narrow")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelRefError, match="does not fit"):
        dppa_ui.merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "narrow"),
                       "models": [f"{tmp_path / 'narrow'}+{bad}"]}, tmp_path / "out2", lora_cache=tmp_path / "c")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_adapter_folder_given_as_a_model_names_the_fix(adapters, tmp_path):
    fam, root, _ = adapters
    with pytest.raises(ValueError, match=r"BASE_MODEL\+"):
        dppa_ui.merge({"merge_method": "task_arithmetic", "base_model": str(fam.base),
                       "models": [str(root / "r2")]}, tmp_path / "out")


def test_in_memory_merge_of_adapter_state(adapters):
    fam, _, ad = adapters
    lo2 = apply_by_hand(fam.base_sd, *ad["r2"])
    out = merge_in_memory(fam.base_sd, [lo2], {"merge_method": "task_arithmetic", "base_model": "b", "models": ["a"]})
    k = "model.layers.1.self_attn.v_proj.weight"
    assert torch.allclose(out[k], lo2[k], atol=1e-6)
