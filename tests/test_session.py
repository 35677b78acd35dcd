"""Workspace, model cache, path safety, merge queue (dppa_ui.session).

Tiny random Llama families are built here (no hub): a base and fine-tunes = base + noise with a
few large outliers, each saved with a character-level tokenizer and a chat template.
test_analysis.py and test_chat.py import `make_family` from this file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from dppa_ui import session
from dppa_ui.config import load_config
from dppa_ui.methods import dp_densities_from_deltas
from dppa_ui.methods.dp import outlier_percent
from dppa_ui.pipeline import merge_state_dicts
from dppa_ui.session import (MergeQueue, MergeRefused, ModelCache, Workspace, check_path_allowed,
                             estimate_merge_bytes, resolve_ref)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("ABCDEFGHIJKLMNOPQRSTUV")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'] + eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def char_tokenizer(template: str | None = TEMPLATE):
    """A 64-token character-level fast tokenizer (ids 0-5 special)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == 64
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
                                   clean_up_tokenization_spaces=False)
    if template:
        fast.chat_template = template
    return fast


def tiny_llama(seed: int = 0, intermediate: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=intermediate, vocab_size=64, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Large logits for the characters and 0 for the specials: replies are never empty.
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[:6] = 0.0
    return model


def _save(model, path: Path, template: str | None = TEMPLATE) -> Path:
    model.save_pretrained(str(path))
    char_tokenizer(template).save_pretrained(str(path))
    return path


def make_family(root: Path, n_ft: int = 3, template: str | None = TEMPLATE) -> dict[str, Path]:
    """root/base and root/ft0.. (noise of growing size plus a few large outliers per tensor)."""
    root.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(0)
    paths = {"base": _save(base, root / "base", template)}
    sd = base.state_dict()
    for k in range(n_ft):
        g = torch.Generator().manual_seed(100 + k)
        ft = tiny_llama(0)
        with torch.no_grad():
            for name, p in ft.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.01 * (k + 1)
                flat = noise.view(-1)
                idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=g)
                flat[idx] += torch.randn(idx.numel(), generator=g).sign() * 0.5
                p.copy_(sd[name] + noise)
        paths[f"ft{k}"] = _save(ft, root / f"ft{k}", template)
    return paths


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, make_family(root)


@pytest.fixture
def ws(family):
    root, paths = family
    return Workspace.load(str(paths["base"]), [str(paths[f"ft{k}"]) for k in range(3)], roots=[root],
                          cache=ModelCache())


# ----------------------------------------------------------------------------- path safety

def test_check_path_allowed(tmp_path):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    assert check_path_allowed(root / "m", [root]) == (root / "m").resolve()
    assert check_path_allowed("m", [root]) == (root / "m").resolve()          # relative: under a root
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed(outside, [root])
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed(str(root / ".." / "secret"), [root])
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed("../secret", [root])
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed("/etc", [root])
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed(root / "link", [root])
    with pytest.raises(ValueError, match="outside the allowed model folders"):
        check_path_allowed("link", [root])


def test_resolve_ref_rules(family, tmp_path, monkeypatch):
    root, paths = family
    assert resolve_ref(str(paths["base"]), [root]) == paths["base"].resolve()
    assert resolve_ref("base", [root]) == paths["base"].resolve()
    with pytest.raises(ValueError, match="outside the allowed"):
        resolve_ref(str(paths["base"]), [tmp_path])
    with pytest.raises(ValueError, match="downloads are disabled"):
        resolve_ref("someone/some-model", [root], allow_downloads=False)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    secret = tmp_path / "token.json"
    secret.write_text("{}")
    (sneaky / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(ValueError, match="links outside"):
        resolve_ref(str(sneaky), [root])
    monkeypatch.setenv("DPPA_UI_ALLOW_DOWNLOADS", "0")
    with pytest.raises(ValueError, match="downloads are disabled"):
        resolve_ref("someone/some-model", [root])
    monkeypatch.setenv("DPPA_UI_ALLOW_DOWNLOADS", "1")
    with pytest.raises(ValueError, match="could not be fetched"):   # HF_HUB_OFFLINE=1 in tests
        resolve_ref("someone/surely-not-cached-model", [root])


# ----------------------------------------------------------------------------- loading

def test_load_summary_and_modules(ws, family):
    root, paths = family
    s = ws.summary()
    base = ws.base_sd
    assert s["parameters"] == sum(t.numel() for t in base.values())
    assert s["tensors"] == len(base) and s["dtype"] == "float32"
    ft = ws.ft_sds[1]
    want = (sum(float((ft[n] - base[n]).pow(2).sum()) for n in base) / sum(float(base[n].pow(2).sum())
                                                                         for n in base)) ** 0.5
    assert s["fine_tunes"][1]["delta_norm"] == pytest.approx(want, rel=1e-4)
    norms = [f["delta_norm"] for f in s["fine_tunes"]]
    assert norms == sorted(norms) and norms[0] > 0          # noise grows with k
    assert ws.blocks() == [0, 1]
    types = ws.module_types()
    assert {"self_attn.q_proj", "mlp.up_proj", "input_layernorm"} <= set(types)
    assert "input_layernorm" not in ws.module_types(matrices_only=True)
    assert ws.tensor_name(1, "mlp.up_proj") == "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="no module"):
        ws.tensor_name(5, "mlp.up_proj")
    assert "model.embed_tokens.weight" in ws.matrix_names()
    assert all(base[n].dim() == 2 for n in ws.matrix_names())
    assert "model.norm.weight" in ws.other_names()


def test_cache_reads_each_model_once(family):
    root, paths = family
    cache = ModelCache()
    refs = [str(paths["ft0"]), str(paths["ft1"])]
    a = Workspace.load(str(paths["base"]), refs, roots=[root], cache=cache)
    assert cache.loads == 3
    b = Workspace()
    b.load(str(paths["base"]), refs, roots=[root], cache=cache)
    assert cache.loads == 3
    assert b.base_sd is a.base_sd                     # shared, read-only
    assert b.stats[0].tensors.keys() == a.stats[0].tensors.keys()
    small = ModelCache(max_bytes=1)                   # bound: keeps only the latest dict
    Workspace.load(str(paths["base"]), refs, roots=[root], cache=small)
    assert len(small) == 1 and small.loads == 3


def test_load_errors_keep_previous_models(ws, family, tmp_path):
    root, paths = family
    before = list(ws.ft_refs)
    with pytest.raises(ValueError, match="at least one fine-tuned"):
        ws.load(str(paths["base"]), [])
    _save(tiny_llama(1, intermediate=48), root / "other")
    with pytest.raises(ValueError, match="mlp.*shape differs|shape differs"):
        ws.load(str(paths["base"]), [str(root / "other")])
    with pytest.raises(ValueError, match="outside the allowed"):
        ws.load(str(paths["base"]), [str(tmp_path)])
    with pytest.raises(ValueError, match="listed twice"):
        ws.load(str(paths["base"]), [str(paths["ft0"])] * 2)
    assert ws.ft_refs == before and ws.summary()["parameters"] > 0


def test_stats_at_other_m_and_dp_maps(ws):
    deltas = {n: ws.delta(n, 2) for n in ws.float_names}
    st = ws.stats_at(3.0)[2]
    name = ws.tensor_name(0, "self_attn.v_proj")
    assert st.tensors[name].pct_outlier == pytest.approx(outlier_percent(deltas[name].abs(), 3.0), abs=1e-9)
    assert st.tensors[name].pct_outlier != ws.stats[2].tensors[name].pct_outlier
    for m in (5.0, 3.0):
        want = dp_densities_from_deltas(deltas, 0.3, 0.08, m)
        got = ws.dp_map(2, 0.3, 0.08, m)
        assert set(got) == set(want)
        for n in want:
            assert got[n].density == pytest.approx(want[n].density, abs=1e-9)
            assert got[n].offset == pytest.approx(want[n].offset, abs=1e-9)


# ----------------------------------------------------------------------------- merge, save, chat models

def _cfg(ws, method="ties", density=0.3, **extra):
    return {"merge_method": method, "base_model": ws.base_ref,
            "models": [{"model": r, "parameters": {"weight": 1.0, "density": density}} for r in ws.ft_refs],
            **extra}


@pytest.mark.parametrize("method", ["ties", "dp", "dare_ties", "pcb"])
def test_merge_matches_pipeline(ws, method):
    cfg = _cfg(ws, method, parameters={"dp_outlier_m": 4.0} if method == "dp" else {})
    out = ws.merge(cfg)
    want = merge_state_dicts(ws.base_sd, ws.ft_sds, load_config(cfg))
    assert set(out.state_dict) == set(want)
    for n in want:
        torch.testing.assert_close(out.state_dict[n], want[n], rtol=0, atol=0)
    assert ws.merged is out and out.device == "cpu" and out.seconds > 0
    if method in ("ties", "dp"):
        assert all(0.2 < k < 0.5 for k in out.kept_fraction)   # 2-D weights at ~0.3, norms kept by dp
    # The same merge listed in another order gives the same tensors.
    rev = _cfg(ws, method, parameters={"dp_outlier_m": 4.0} if method == "dp" else {})
    rev["models"] = rev["models"][::-1]
    if method == "ties":
        again = ws.merge(rev)
        name = ws.tensor_name(0, "mlp.down_proj")
        torch.testing.assert_close(again.state_dict[name], out.state_dict[name], rtol=1e-6, atol=1e-7)


def test_merge_config_defaults_and_unknown_model(ws):
    out = ws.merge({"merge_method": "task_arithmetic"})
    assert [m.model for m in out.config.models] == ws.ft_refs
    with pytest.raises(ValueError, match="not loaded"):
        ws.merge({"merge_method": "ties", "models": [{"model": "nope"}]})


def test_merge_refused_when_memory_short(ws, monkeypatch):
    need = estimate_merge_bytes(ws, _cfg(ws))
    assert need >= sum(t.numel() * 4 for t in ws.base_sd.values())
    monkeypatch.setattr(session, "available_memory", lambda: need - 1)
    with pytest.raises(MergeRefused, match="GB of memory"):
        ws.merge(_cfg(ws))
    assert ws.merged is None


def test_merge_queue_limit_and_cancel(ws):
    q = MergeQueue(limit=1)
    with q.slot():
        with pytest.raises(MergeRefused, match="busy"):
            with q.slot(timeout=0.05):
                pass
    seen = []
    with pytest.raises(InterruptedError):
        ws.merge(_cfg(ws), progress=lambda d, t: seen.append((d, t)), cancel=lambda: len(seen) >= 3, queue=q)
    assert len(seen) == 3 and seen[-1][1] == len(ws.names)
    with q.slot(timeout=0.05):          # the cancelled merge gave its slot back
        pass


def test_save_round_trip(ws, tmp_path):
    from transformers import AutoModelForCausalLM

    from dppa_ui.engine import CONFIG_FILE

    with pytest.raises(ValueError, match="run a merge first"):
        ws.save(tmp_path / "x")
    out = ws.merge(_cfg(ws, "dppa", density=0.4))
    folder = ws.save(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, out.state_dict[n], rtol=0, atol=0)
    assert (folder / "README.md").is_file() and (folder / "tokenizer.json").is_file()
    cfg = load_config(folder / CONFIG_FILE)
    assert cfg.method_name == "dppa" and [m.model for m in cfg.models] == ws.ft_refs
    with pytest.raises(FileExistsError):
        ws.save(tmp_path / "merged")
    folder, z = ws.save_archive()
    assert z.is_file() and z.parent == ws.temp_dir
    temp = ws.temp_dir
    ws.close()
    assert not temp.exists() and not ws.loaded


def test_model_for(ws):
    with pytest.raises(ValueError, match="run a merge first"):
        ws.model_for("merged")
    ws.merge(_cfg(ws, "ties"))
    model, tok = ws.model_for("merged")
    name = ws.tensor_name(1, "self_attn.o_proj")
    torch.testing.assert_close(model.state_dict()[name], ws.merged.state_dict[name])
    assert ws.model_for("merged")[0] is model                    # cached
    ft, _ = ws.model_for(ws.ft_refs[0])
    torch.testing.assert_close(ft.state_dict()[name], ws.ft_sds[0][name])
    base, _ = ws.model_for("base")
    torch.testing.assert_close(base.state_dict()[name], ws.base_sd[name])
    assert tok("ab")["input_ids"] == [6, 7]
    ws.merge(_cfg(ws, "task_arithmetic"))
    assert ws.model_for("merged")[0] is not model                # a new merge, a new model
    with pytest.raises(ValueError, match="unknown model"):
        ws.model_for("nope")
    current = ws.model_for("merged")[0]
    elsewhere = merge_state_dicts(ws.base_sd, ws.ft_sds, load_config(_cfg(ws, "ties", density=0.1)))
    adopted = ws.adopt(session.MergeOutcome(elsewhere, 0.1, "cuda", [0.1] * 3, load_config(_cfg(ws, "ties", 0.1)),
                                            run=ws.merged.run))
    assert ws.merged is adopted and ws.model_for("merged")[0] is not current
    torch.testing.assert_close(ws.model_for("merged")[0].state_dict()[name], elsewhere[name])


# ----------------------------------------------------------------------------- the demo family

def _zoo_ready() -> bool:
    try:
        from dppa_ui import zoo
        return all((zoo.ZOO_DIR / n / "config.json").is_file() for n in zoo.demo_names())
    except Exception:
        return False


@pytest.mark.skipif(not _zoo_ready(), reason="assets/zoo is not built")
def test_demo_family_load_and_merge():
    from dppa_ui import zoo
    fts = [f"demo:{n}" for n in zoo.demo_names() if n != "base"]
    ws = Workspace.load("demo:base", fts, cache=ModelCache())
    s = ws.summary()
    assert s["parameters"] == sum(t.numel() for t in ws.base_sd.values()) and len(s["fine_tunes"]) == len(fts)
    assert all(f["delta_norm"] > 0 for f in s["fine_tunes"])
    assert ws.tensor_name(0, "self_attn.q_proj") in ws.matrix_names()
    out = ws.merge({"merge_method": "dppa", "models": [{"model": r, "parameters": {"density": 0.1}} for r in fts]})
    assert len(out.state_dict) == s["tensors"]
    assert all(0.0 < k < 0.5 for k in out.kept_fraction)
    model, tok = ws.model_for("merged")
    assert tok.apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True,
                                   tokenize=False) == "<bos><|user|>abc<|assistant|>"



@pytest.mark.skipif(not _zoo_ready(), reason="assets/zoo is not built")
def test_alpha_search_on_loaded_models_matches_the_engine_reading_from_disk(monkeypatch):
    """The app's alpha search hands the engine the state dicts and DP statistics it holds; the
    search must walk the same path to the same alpha as the engine reading the checkpoints."""
    from dppa_ui import engine, io as dio
    from dppa_ui.config import load_config
    ws = Workspace.load("demo:base", ["demo:reverse", "demo:sort"], cache=ModelCache())
    raw = {"merge_method": "dppa", "base_model": "demo:base",
           "models": [{"model": r, "parameters": {"density": 0.2, "amplification": "auto"}}
                      for r in ("demo:sort", "demo:reverse")]}         # not the load order: alignment
    idx = ws.align(ws.config(raw))
    from_disk = engine.search_amplification(load_config(raw), ws.base_path, [ws.ft_paths[j] for j in idx],
                                            log=lambda s: None, max_evals=4)
    reads = []
    monkeypatch.setattr(dio, "read_state_dict", lambda *a, **k: reads.append(a) or {})
    held = engine.search_amplification(load_config(raw), ws.base_path, [ws.ft_paths[j] for j in idx],
                                       log=lambda s: None, max_evals=4,
                                       **ws._search_inputs(idx, ws.stats_at(ws.config(raw).dp_outlier_m)))
    assert reads == []
    assert held == from_disk and len(from_disk) == 2 and all(len(r["path"]) == 4 for r in held.values())


if __name__ == "__main__":      # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
