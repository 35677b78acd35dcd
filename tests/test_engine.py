"""The streaming engine end to end on tiny random Llama checkpoints (dppa_ui.merge): on-disk
results against merge_in_memory, sharded inputs and outputs, dtypes, tied embeddings, output
folder safety, dry runs, the model card and the saved YAML, DARE seeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import dppa_ui
from dppa_ui import ConfigError, merge_in_memory
from dppa_ui.engine import CONFIG_FILE, STATS_FILE


def config(fam, method="ties", params=None, model_params=None, **top):
    models = [{"model": str(p), "parameters": dict((model_params or [{}] * len(fam.fts))[i])}
              for i, p in enumerate(fam.fts)]
    d = {"merge_method": method, "base_model": str(fam.base), "models": models,
         "parameters": dict(params or {}), **top}
    return d


def ties_cfg(fam, **top):
    return config(fam, "ties", {"density": 0.4}, [{"weight": 1.0}, {"weight": 0.6}], **top)


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def no_temp_left(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def load_and_generate(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        logits = model(ids).logits
    assert out.shape == (1, 7)
    assert torch.isfinite(logits).all()
    return model


# --------------------------------------------------------------------------- results

def test_disk_equals_in_memory_and_loads(tiny_family, read_weights, tmp_path):
    res = dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "out")
    assert res.out == tmp_path / "out" and res.tensors == len(tiny_family.base_sd)
    on_disk = read_weights(tmp_path / "out")
    assert_same(on_disk, merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, ties_cfg(tiny_family)))
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()
    load_and_generate(tmp_path / "out")
    assert not no_temp_left(tmp_path)


@pytest.mark.parametrize("method,params", [("dp", {"density": 0.3}), ("dppa", {"density": 0.2}),
                                           ("pcb", {"pcb_ratio": 0.2, "scope": "model"})])
def test_disk_equals_in_memory_two_pass_methods(tiny_family, read_weights, tmp_path, method, params):
    c = config(tiny_family, method, params)
    dppa_ui.merge(c, tmp_path / "out")
    assert_same(read_weights(tmp_path / "out"), merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, c))
    if method.startswith("dp"):    # the statistics are kept for the app
        stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
        assert len(stats) == 2 and stats[0]["block_pct"]


def test_sharded_input_gives_same_result(tiny_llama, read_weights, tmp_path):
    flat = tiny_llama()
    sharded = tiny_llama(max_shard_size="20KB")
    assert len(list(sharded.base.glob("*.safetensors"))) > 1
    assert (sharded.base / "model.safetensors.index.json").is_file()
    assert_same(flat.base_sd, sharded.base_sd)      # same seeds: same weights, other file layout
    dppa_ui.merge(ties_cfg(flat), tmp_path / "a")
    dppa_ui.merge(ties_cfg(sharded), tmp_path / "b")
    assert_same(read_weights(tmp_path / "a"), read_weights(tmp_path / "b"))


def test_multi_shard_output_loads(tiny_family, read_weights, tmp_path):
    dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "one")
    dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "many", shard_bytes=20_000)
    files = sorted((tmp_path / "many").glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_family.base_sd)
    assert_same(read_weights(tmp_path / "one"), read_weights(tmp_path / "many"))
    load_and_generate(tmp_path / "many")


# --------------------------------------------------------------------------- dtypes

def _dtypes(read_weights, path):
    return {v.dtype for v in read_weights(path).values()}


def _config_dtype(path):
    c = json.loads((Path(path) / "config.json").read_text())
    return c.get("dtype", c.get("torch_dtype"))


def test_output_dtype_rules(tiny_family, read_weights, tmp_path):
    dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "default")
    assert _dtypes(read_weights, tmp_path / "default") == {torch.float32}     # the base's
    dppa_ui.merge(ties_cfg(tiny_family, dtype="bfloat16"), tmp_path / "bf16")
    assert _dtypes(read_weights, tmp_path / "bf16") == {torch.bfloat16}
    assert _config_dtype(tmp_path / "bf16") == "bfloat16"
    dppa_ui.merge(ties_cfg(tiny_family, dtype="bfloat16", out_dtype="float16"), tmp_path / "f16")
    assert _dtypes(read_weights, tmp_path / "f16") == {torch.float16}        # out_dtype wins
    assert _config_dtype(tmp_path / "f16") == "float16"
    # the math is float32 either way: bf16 output = float32 result rounded once
    f32 = read_weights(tmp_path / "default")
    bf = read_weights(tmp_path / "bf16")
    assert all(torch.equal(bf[k], f32[k].to(torch.bfloat16)) for k in f32)


def test_bf16_inputs(tiny_llama, read_weights, tmp_path):
    fam = tiny_llama(dtype=torch.bfloat16)
    assert fam.base_sd["model.norm.weight"].dtype == torch.bfloat16
    c = config(fam, "dare_ties", {"density": 0.5}, seed=3)
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert _config_dtype(tmp_path / "out") == "bfloat16"
    assert_same(out, merge_in_memory(fam.base_sd, fam.ft_sds, c))
    load_and_generate(tmp_path / "out")


def test_mixed_input_dtypes(tiny_llama, read_weights, tmp_path):
    from conftest import write_tiny_llama
    fam = tiny_llama()
    ft_bf16 = write_tiny_llama(tmp_path / "ft_bf16", fam.ft_sds[0], dtype=torch.bfloat16)
    c = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
         "models": [{"model": str(tmp_path / "ft_bf16")}, {"model": str(fam.fts[1])}]}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    assert {v.dtype for v in out.values()} == {torch.float32}
    assert_same(out, merge_in_memory(fam.base_sd, [ft_bf16, fam.ft_sds[1]], c))


def test_tied_embeddings(tiny_llama, read_weights, tmp_path):
    fam = tiny_llama(tie=True)
    assert "lm_head.weight" not in fam.base_sd
    c = config(fam, "dppa", {"density": 0.2})
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    assert "lm_head.weight" not in out
    assert_same(out, merge_in_memory(fam.base_sd, fam.ft_sds, c))
    model = load_and_generate(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight, out["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- output folder safety

def test_non_empty_out_refused_and_left_intact(tiny_family, read_weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        dppa_ui.merge(ties_cfg(tiny_family), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not no_temp_left(tmp_path)
    dppa_ui.merge(ties_cfg(tiny_family), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not no_temp_left(tmp_path)


def test_empty_existing_out_is_fine(tiny_family, tmp_path):
    (tmp_path / "out").mkdir()
    dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failure_mid_merge_leaves_nothing(tiny_family, tmp_path):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(InterruptedError):
        dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "out", cancel=cancel)
    assert len(calls) > 5
    assert not (tmp_path / "out").exists()
    assert not no_temp_left(tmp_path)


def test_incompatible_model_refused_before_output(tiny_llama, tmp_path):
    from conftest import write_tiny_llama
    fam = tiny_llama()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=48, vocab_size=64))
    odd.save_pretrained(str(tmp_path / "odd"))
    c = {"merge_method": "ties", "base_model": str(fam.base),
         "models": [{"model": str(fam.fts[0]), "parameters": {"density": 0.5}},
                    {"model": str(tmp_path / "odd"), "parameters": {"density": 0.5}}]}
    with pytest.raises(ValueError) as e:
        dppa_ui.merge(c, tmp_path / "out")
    assert "mlp.up_proj.weight" in str(e.value) and "48" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not no_temp_left(tmp_path)
    # vocabulary-only difference: named, with the flag to use
    write_tiny_llama(tmp_path / "vocab", seed=0, vocab=80)
    c["models"][1]["model"] = str(tmp_path / "vocab")
    with pytest.raises(ValueError, match="allow-vocab-trim"):
        dppa_ui.merge(c, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not no_temp_left(tmp_path)


def test_bad_config_refused_before_reading_models(tmp_path):
    # the model folders do not exist: the config error must come first (nothing is read)
    c = {"merge_method": "ties", "base_model": str(tmp_path / "nope"),
         "models": [{"model": str(tmp_path / "nope2"), "parameters": {"density": 1.5}}]}
    with pytest.raises(ConfigError, match="density"):
        dppa_ui.merge(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(tiny_family, tmp_path):
    res = dppa_ui.merge(ties_cfg(tiny_family), tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    assert "model.layers.1.mlp.down_proj.weight" in res.report
    assert "memory" in res.report and "disk" in res.report and "time" in res.report


# --------------------------------------------------------------------------- card, YAML, seeds

def test_model_card_lists_every_parent(tiny_family, tmp_path):
    c = config(tiny_family, "dare_ties", {"density": 0.5}, seed=11)
    dppa_ui.merge(c, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    parents = [str(tiny_family.base)] + [str(p) for p in tiny_family.fts]
    assert set(parents) <= set(front["base_model"])
    assert "merge" in front["tags"] and "dare_ties" in front["tags"]
    assert "11" in text and "torch" in text and "transformers" in text   # seed and versions
    assert "merge_method: dare_ties" in text                              # the YAML that reproduces it


@pytest.mark.parametrize("method,params", [("dare_ties", {"density": 0.5}), ("dppa", {"density": 0.3})])
def test_saved_yaml_reruns_to_identical_tensors(tiny_family, read_weights, tmp_path, method, params):
    dppa_ui.merge(config(tiny_family, method, params, seed=7, dtype="bfloat16"), tmp_path / "a")
    saved = tmp_path / "a" / CONFIG_FILE
    assert saved.is_file()
    assert yaml.safe_load(saved.read_text())["seed"] == 7
    dppa_ui.merge(str(saved), tmp_path / "b")
    assert_same(read_weights(tmp_path / "a"), read_weights(tmp_path / "b"))


def test_dare_same_seed_same_files_other_seed_differs(tiny_family, read_weights, tmp_path):
    c = config(tiny_family, "dare_linear", {"density": 0.5}, seed=1)
    dppa_ui.merge(c, tmp_path / "a")
    dppa_ui.merge(c, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    res = dppa_ui.merge(c, tmp_path / "c", seed=2)         # the --seed override
    assert res.config.seed == 2
    assert yaml.safe_load((tmp_path / "c" / CONFIG_FILE).read_text())["seed"] == 2
    a, cc = read_weights(tmp_path / "a"), read_weights(tmp_path / "c")
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[k], cc[k])
    assert_same(cc, merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, {**c, "seed": 2}))


def test_base_listed_among_models_is_skipped(tiny_family, read_weights, tmp_path):
    c = ties_cfg(tiny_family)
    with_base = {**c, "models": [{"model": str(tiny_family.base)}] + c["models"]}
    dppa_ui.merge(c, tmp_path / "a")
    res = dppa_ui.merge(with_base, tmp_path / "b")
    assert any("base" in n for n in res.notices)
    assert_same(read_weights(tmp_path / "a"), read_weights(tmp_path / "b"))


def _digest(folder):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_inputs_are_never_modified(tiny_family, tmp_path):
    before = [_digest(p) for p in [tiny_family.base, *tiny_family.fts]]
    for method, params in [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}), ("dppa", {"density": 0.2}),
                           ("pcb", {}), ("task_arithmetic", {})]:
        dppa_ui.merge(config(tiny_family, method, params), tmp_path / method)
    assert [_digest(p) for p in [tiny_family.base, *tiny_family.fts]] == before


def test_vocab_trim_output_loads(tmp_path, read_weights):
    from conftest import write_tiny_llama
    write_tiny_llama(tmp_path / "base", seed=0, vocab=96)
    ft = write_tiny_llama(tmp_path / "ft", seed=1, vocab=64)
    c = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
         "models": [{"model": str(tmp_path / "ft")}]}
    with pytest.raises(ValueError, match="allow-vocab-trim"):
        dppa_ui.merge(c, tmp_path / "out")
    dppa_ui.merge(c, tmp_path / "out", allow_vocab_trim=True)
    out = read_weights(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape == (64, 32)
    # one fine-tune, weight 1: the merge is the fine-tune itself on the common rows
    assert torch.allclose(out["model.embed_tokens.weight"], ft["model.embed_tokens.weight"], atol=1e-6)
    load_and_generate(tmp_path / "out")


@pytest.mark.parametrize("rows", [(64, 72), (72, 64), (64, 72, 80), (80, 64, 72), (72, 80, 64)],
                         ids=lambda r: "-".join(map(str, r)))
def test_vocab_trim_any_model_smallest(tmp_path, read_weights, rows):
    """--allow-vocab-trim merges the rows every model has, whichever model (the base, a fine-tune)
    has the fewest: the result is the in-memory merge of the models cut to those rows."""
    from conftest import write_tiny_llama
    sds = [write_tiny_llama(tmp_path / f"m{i}", seed=i, vocab=v) for i, v in enumerate(rows)]
    c = {"merge_method": "ties", "base_model": str(tmp_path / "m0"), "parameters": {"density": 0.5},
         "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 0.7}} for i in range(1, len(rows))]}
    dppa_ui.merge(c, tmp_path / "out", allow_vocab_trim=True)
    out = read_weights(tmp_path / "out")
    n = min(rows)
    cut = [{k: (t[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else t) for k, t in sd.items()}
           for sd in sds]
    want = merge_in_memory(cut[0], cut[1:], c)
    assert out["model.embed_tokens.weight"].shape == (n, 32) and out["lm_head.weight"].shape == (n, 32)
    assert_same(out, want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == n
    load_and_generate(tmp_path / "out")


def test_chat_template_and_tokenizer_source(tiny_family, tmp_path):
    tok = tmp_path / "tok"                     # any model folder whose tokenizer files are used
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    c = ties_cfg(tiny_family, chat_template="chatml", tokenizer_source=str(tok))
    dppa_ui.merge(c, tmp_path / "out")
    assert "<|im_start|>" in (tmp_path / "out" / "chat_template.jinja").read_text()
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_kept_fraction_counts_only_floating_tensors(tiny_family, tmp_path):
    """A checkpoint may carry integer buffers; they have no delta to prune, so the reported kept
    share is over the floating tensors only (as the app reports it), not diluted by them."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dppa_ui.config import load_config
    from dppa_ui.pipeline import kept_fraction

    dirs = []
    for src in [tiny_family.base, *tiny_family.fts]:
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        (f,) = dst.glob("*.safetensors")
        sd = load_file(str(f))
        sd["extra.steps"] = torch.arange(5000, dtype=torch.int64)
        save_file(sd, str(f), metadata={"format": "pt"})
        dirs.append(dst)
    cfg = ties_cfg(tiny_family)
    cfg["base_model"] = str(dirs[0])
    for m, d in zip(cfg["models"], dirs[1:]):
        m["model"] = str(d)
    res = dppa_ui.merge(cfg, tmp_path / "out")
    floats = {n: tuple(t.shape) for n, t in tiny_family.base_sd.items() if t.is_floating_point()}
    assert res.kept_fraction == pytest.approx(kept_fraction(load_config(cfg), floats, None))
    assert all(0.35 < k < 0.45 for k in res.kept_fraction)      # density 0.4, not diluted toward 1
