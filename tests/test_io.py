"""Tests for dppa_ui.io: refs, lazy reader, streaming sharded writer, output folder helpers.

Tiny random Llama models are built here (no hub); everything runs on CPU in a few seconds.
"""
from __future__ import annotations

import json
import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from dppa_ui import io
from dppa_ui.io import (CheckpointReader, IncompatibleModels, NotEnoughDiskSpace, ShardedWriter, atomic_output_dir,
                        check_compatible, check_free_disk, copy_model_files, write_model_card)
from dppa_ui.refs import ModelRefError, resolve_model


def _llama(path, *, seed=0, vocab=64, intermediate=64, max_shard_size=None, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=intermediate, vocab_size=vocab,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = _llama(root / "single")
    sd_sharded = _llama(root / "sharded", seed=1, max_shard_size="20KB")
    return root, sd, sd_sharded


def _read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


# ----------------------------------------------------------------------------------- reader

def test_reader_single_file_round_trip(models):
    root, sd, _ = models
    with CheckpointReader(root / "single") as r:
        assert len(r.files) == 1 and r.files[0].name == "model.safetensors"
        assert set(r.names) == set(sd)  # tied/untied: whatever the checkpoint holds
        for name in r.names:
            assert r.shape(name) == tuple(sd[name].shape)
            assert r.dtype(name) == sd[name].dtype
            assert r.numel(name) == sd[name].numel()
            assert r.nbytes(name) == sd[name].numel() * sd[name].element_size()
            assert torch.equal(r.get(name), sd[name])
        assert "model.embed_tokens.weight" in r and "nope" not in r
        assert torch.equal(r.get("model.embed_tokens.weight", rows=10), sd["model.embed_tokens.weight"][:10])
        assert r.total_bytes == sum(t.numel() * t.element_size() for t in sd.values())
        with pytest.raises(KeyError, match="nope"):
            r.shape("nope")


def test_reader_sharded_round_trip(models):
    root, _, sd = models
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    r = CheckpointReader(root / "sharded")
    assert len(r.files) > 1
    assert sorted(r.names) == sorted(sd)
    for name in r.names:
        assert torch.equal(r.get(name), sd[name])
    r.close()


def test_reader_order_is_natural_within_file(tmp_path):
    save_file({f"layers.{i}.w": torch.zeros(2) for i in (10, 2, 1)}, tmp_path / "model.safetensors")
    assert CheckpointReader(tmp_path).names == ["layers.1.w", "layers.2.w", "layers.10.w"]


def test_reader_refuses_pickle_unless_allowed(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5).to(torch.bfloat16)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="--allow-pickle") as e:
        CheckpointReader(tmp_path)
    assert "pytorch_model.bin" in str(e.value)
    r = CheckpointReader(tmp_path, allow_pickle=True)
    assert r.names == ["a.weight", "b.weight"]
    assert r.dtype("b.weight") == torch.bfloat16 and r.shape("a.weight") == (3, 4)
    assert torch.equal(r.get("a.weight"), sd["a.weight"])


def test_reader_no_weights_error_names_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        CheckpointReader(tmp_path)
    assert "--allow-pickle" in str(e.value)


# ----------------------------------------------------------------------------------- writer

def _specs_and_tensors():
    torch.manual_seed(0)
    tensors = {
        "emb.weight": torch.randn(16, 8).to(torch.bfloat16),
        "norm.weight": torch.randn(3),                      # f32, odd size
        "odd.bf16": torch.randn(5).to(torch.bfloat16),      # odd bf16 before f32 in plan order
        "layers.0.w": torch.randn(8, 8),
        "layers.1.w": torch.randn(8, 8).to(torch.bfloat16),
        "big.weight": torch.randn(40, 8),                   # 1280 bytes: larger than small shards
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(7, dtype=torch.int64),
    }
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return specs, tensors


def _check_loads(out_dir, tensors):
    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                assert k not in got
                got[k] = h.get_tensor(k)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_writer_single_shard_out_of_order(tmp_path):
    specs, tensors = _specs_and_tensors()
    w = ShardedWriter(tmp_path, specs)
    for k in reversed(list(tensors)):
        w.write(k, tensors[k])
    files = w.close()
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    n, header = _read_header(tmp_path / "model.safetensors")
    assert (8 + n) % 8 == 0
    assert (tmp_path / "model.safetensors").stat().st_size == 8 + n + sum(
        v.numel() * v.element_size() for v in tensors.values())
    # every tensor starts at a multiple of its item size (mmap-friendly)
    for k, v in tensors.items():
        assert (8 + n + header[k]["data_offsets"][0]) % v.element_size() == 0
    _check_loads(tmp_path, tensors)


def test_writer_multi_shard_plan_and_index(tmp_path):
    specs, tensors = _specs_and_tensors()
    limit = 400
    w = ShardedWriter(tmp_path, specs, max_shard_bytes=limit)
    order = list(tensors)
    for k in order[1::2] + order[0::2]:
        w.write(k, tensors[k].float())      # cast to the planned dtype by the writer
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and [f.name for f in files[:-1]] == [s.name for s in shards]
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    # shards follow the spec order; a shard only exceeds the limit when it is one big tensor
    shard_of = [index["weight_map"][k] for k in order]
    assert shard_of == sorted(shard_of)
    for s in shards:
        members = [k for k in order if index["weight_map"][k] == s.name]
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in members)
        assert size <= limit or len(members) == 1
    assert [k for k in order if index["weight_map"][k] == index["weight_map"]["big.weight"]] == ["big.weight"]
    _check_loads(tmp_path, tensors)
    # a sharded output reads back through the reader too
    r = CheckpointReader(tmp_path)
    assert all(torch.equal(r.get(k), v) for k, v in tensors.items())


def test_writer_errors(tmp_path):
    specs, tensors = _specs_and_tensors()
    w = ShardedWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="shape"):
        w.write("emb.weight", torch.zeros(15, 8))
    with pytest.raises(KeyError, match="not planned"):
        w.write("unknown", torch.zeros(1))
    w.write("emb.weight", tensors["emb.weight"])
    with pytest.raises(ValueError, match="twice"):
        w.write("emb.weight", tensors["emb.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_writer_plus_copy_loads_with_transformers(models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    root, _, sd = models
    src = root / "sharded"
    r = CheckpointReader(src)
    specs = [(n, r.shape(n), torch.bfloat16) for n in r.names]
    out = tmp_path / "out"
    with ShardedWriter(out, specs, max_shard_bytes=30_000) as w:
        for n in reversed(r.names):
            w.write(n, r.get(n))
    copy_model_files(src, out, dtype=torch.bfloat16)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.dtype == torch.bfloat16
    msd = m.state_dict()
    for n, t in sd.items():
        assert torch.equal(msd[n], t.to(torch.bfloat16)), n
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_tied_embeddings_round_trip(tmp_path):
    """A tied checkpoint has no lm_head tensor; written back it still loads (and stays tied)."""
    from transformers import AutoModelForCausalLM
    sd = _llama(tmp_path / "tied", tie=True)
    r = CheckpointReader(tmp_path / "tied")
    assert "lm_head.weight" not in r
    out = tmp_path / "out"
    with ShardedWriter(out, [(n, r.shape(n), torch.float32) for n in r.names]) as w:
        for n in r.names:
            w.write(n, r.get(n))
    copy_model_files(tmp_path / "tied", out, dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(m.lm_head.weight, sd["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- model files, card

def _fake_model_dir(d, *, inline_template="{{ 'inline' }}"):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32",
                                               "dtype": "float32", "vocab_size": 64}))
    (d / "generation_config.json").write_text(json.dumps({"max_length": 20}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": inline_template}))
    (d / "special_tokens_map.json").write_text("{}")
    (d / "tokenizer.model").write_bytes(b"sp")
    (d / "chat_template.jinja").write_text("{{ 'file' }}")
    save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    return d


def test_copy_model_files(tmp_path):
    src = _fake_model_dir(tmp_path / "src")
    out = tmp_path / "out"
    copy_model_files(src, out, dtype=torch.bfloat16, config_overrides={"vocab_size": 60})
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16" and cfg["vocab_size"] == 60
    assert (out / "chat_template.jinja").read_text() == "{{ 'file' }}"


def test_copy_model_files_tokenizer_source_and_template_override(tmp_path):
    src = _fake_model_dir(tmp_path / "src")
    tok = _fake_model_dir(tmp_path / "tok", inline_template="{{ 'tok' }}")
    (tok / "tokenizer.json").write_text('{"from": "tok"}')
    (tok / "generation_config.json").write_text('{"from": "tok"}')
    out = tmp_path / "out"
    copy_model_files(src, out, dtype=torch.float16, tokenizer_dir=tok, chat_template="{{ 'mine' }}")
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "tok"}
    assert json.loads((out / "generation_config.json").read_text()) == {"max_length": 20}
    assert (out / "chat_template.jinja").read_text() == "{{ 'mine' }}"
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_model_card(tmp_path):
    cfg_yaml = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n  - model: demo:b\n"
    p = write_model_card(tmp_path, base_ref="org/base", model_refs=["org/a", "demo:b"], method="ties",
                         seed=7, yaml_text=cfg_yaml, extra={"density": 0.2})
    text = p.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["org/base", "org/a", "demo:b"]
    assert front["tags"] == ["merge", "dppa-ui", "ties"]
    assert front["library_name"] == "transformers"
    block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == yaml.safe_load(cfg_yaml)
    for lib in ("torch", "transformers", "safetensors", "dppa-ui"):
        assert f"- {lib}: " in text
    assert "seed: `7`" in text and "density: `0.2`" in text


# ---------------------------------------------------------------------------- compatibility

def _ckpt(d, tensors):
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    return CheckpointReader(d)


def _base_tensors(vocab=64, inter=64):
    return {"model.embed_tokens.weight": torch.zeros(vocab, 8), "lm_head.weight": torch.zeros(vocab, 8),
            "model.layers.0.mlp.up_proj.weight": torch.zeros(inter, 8),
            "model.norm.weight": torch.zeros(8)}


def test_compatible_same_shapes_mixed_dtypes(tmp_path):
    base = _ckpt(tmp_path / "b", _base_tensors())
    ft = _ckpt(tmp_path / "f", {k: v.to(torch.bfloat16) for k, v in _base_tensors().items()})
    shapes = check_compatible(base, {"ft": ft})
    assert shapes == {k: tuple(v.shape) for k, v in _base_tensors().items()}
    assert list(shapes) == base.names


def test_incompatible_missing_extra_and_shape(tmp_path):
    base = _ckpt(tmp_path / "b", _base_tensors())
    t = _base_tensors()
    del t["model.norm.weight"]
    missing = _ckpt(tmp_path / "m", t)
    extra = _ckpt(tmp_path / "e", {**_base_tensors(), "model.extra.weight": torch.zeros(3)})
    wider = _ckpt(tmp_path / "w", _base_tensors(inter=96))
    with pytest.raises(IncompatibleModels, match=r"lacks 1 tensor.*\n  model.norm.weight \[8\]"):
        check_compatible(base, {"ft-missing": missing})
    with pytest.raises(IncompatibleModels, match=r"ft-extra has 1 tensor.*\n  model.extra.weight \[3\]"):
        check_compatible(base, {"ft-extra": extra})
    with pytest.raises(IncompatibleModels) as e:
        check_compatible(base, {"ft-wide": wider}, allow_vocab_trim=True)
    assert "model.layers.0.mlp.up_proj.weight: base [64, 8] vs [96, 8]" in str(e.value)
    assert "--allow-vocab-trim" not in str(e.value)


def test_vocab_only_mismatch_points_at_trim(tmp_path):
    base = _ckpt(tmp_path / "b", _base_tensors())
    big = _ckpt(tmp_path / "big", _base_tensors(vocab=72))
    small = _ckpt(tmp_path / "small", _base_tensors(vocab=60))
    with pytest.raises(IncompatibleModels, match="vocabulary size") as e:
        check_compatible(base, {"big": big, "small": small})
    assert "--allow-vocab-trim" in str(e.value) and "[64, 8] vs [72, 8]" in str(e.value)
    shapes = check_compatible(base, {"big": big, "small": small}, allow_vocab_trim=True)
    assert shapes["model.embed_tokens.weight"] == (60, 8) and shapes["lm_head.weight"] == (60, 8)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == (64, 8)


def test_compatible_real_llamas(models, tmp_path):
    root, _, _ = models
    _llama(tmp_path / "ft", seed=3)
    base, ft = CheckpointReader(root / "single"), CheckpointReader(tmp_path / "ft")
    assert check_compatible(base, {"ft": ft}) == {n: base.shape(n) for n in base.names}
    _llama(tmp_path / "ft_vocab", seed=4, vocab=80)
    with pytest.raises(IncompatibleModels, match="--allow-vocab-trim"):
        check_compatible(base, {"ft_vocab": CheckpointReader(tmp_path / "ft_vocab")})


# ------------------------------------------------------------------------------- output dir

def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_output_dir_success_and_cleanup(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not out.exists()
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x" and _leftovers(tmp_path, "out") == []

    out2 = tmp_path / "out2"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output_dir(out2) as tmp:
                (tmp / "partial").write_text("x")
                raise exc
        assert not out2.exists() and _leftovers(tmp_path, "out2") == []


def test_atomic_output_dir_refuses_non_empty_and_overwrites(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    ran = []
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_output_dir(out):
            ran.append(1)
    assert ran == [] and (out / "keep.txt").read_text() == "user data"
    # a failed overwrite leaves the old output untouched
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []
    # an existing empty folder is fine without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "f").write_text("1")
    assert (empty / "f").is_file()


def test_check_free_disk(tmp_path):
    free = check_free_disk(tmp_path / "not" / "yet", 0)
    assert free > 0
    with pytest.raises(NotEnoughDiskSpace, match="needs about .* GB, only .* GB is free"):
        check_free_disk(tmp_path, free + 10**15)


def test_estimate_bytes():
    assert io.estimate_bytes([("a", (2, 3), torch.bfloat16), ("b", (4,), torch.float32)]) == 28


# ----------------------------------------------------------------------------------- refs

def test_resolve_model_local_and_refusals(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelRefError, match=r"org/base"):      # MODEL+ADAPTER: the model is resolved first
        resolve_model("org/base+org/lora")
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelRefError, match="is a file"):
        resolve_model(str(f))


def test_resolve_model_through_a_registered_scheme(tmp_path, monkeypatch):
    from dppa_ui import refs
    monkeypatch.setitem(refs._SCHEMES, "toy", lambda name: tmp_path / name)
    assert resolve_model("toy:reverse") == tmp_path / "reverse"
    # the demo family registers `demo:` when dppa_ui is imported; the core modules never import it
    assert resolve_model("demo:reverse").name == "reverse"


def test_resolve_model_offline_unknown_hub_id(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so "nobody/..." is surely not a local folder
    with pytest.raises(ModelRefError, match=r"'nobody/no-such-model@v1' is not a local folder and "
                                            r"could not be fetched from the hub: this server has no copy of it "
                                            r"and cannot reach the hub \(offline") as e:
        resolve_model("nobody/no-such-model@v1")
    assert "LocalEntryNotFoundError" not in str(e.value)          # the reason in words, not the library's
