"""Tokenizer surgery (`tokenizer: {source, tokens, pad_to_multiple_of}`, `tokenizer_source`): the
output vocabulary and every model's embedding / lm_head rows re-ordered by token text, checked
against a reference that looks each token up in each model's own tokenizer."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import dppa_ui
from dppa_ui import ConfigError

WORDS_A = ["<unk>"] + [f"w{i}" for i in range(1, 64)]
WORDS_B = ["<unk>"] + [f"w{i}" for i in range(1, 60)] + ["x0", "x1", "x2", "x3"]


def save_tokenizer(folder, words, seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    order = list(words[1:])
    g = torch.Generator().manual_seed(seed)
    order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(order)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))
    return vocab


@pytest.fixture(scope="module")
def two_vocabs(tiny_llama, tmp_path_factory):
    fam = tiny_llama("vocab", n_ft=1)
    root = tmp_path_factory.mktemp("vocab-models")
    a, b = root / "a", root / "b"
    shutil.copytree(fam.base, a)
    shutil.copytree(fam.fts[0], b)
    va = save_tokenizer(a, WORDS_A, 1)
    vb = save_tokenizer(b, WORDS_B, 2)
    return a, b, va, vb, fam.base_sd, fam.ft_sds[0]


def rows_by_token(sd, vocab, name):
    return {w: sd[name][i] for w, i in vocab.items()}


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_union_vocabulary_rows(two_vocabs, read_weights, tmp_path, name):
    a, b, va, vb, sda, sdb = two_vocabs
    c = {"merge_method": "linear", "models": [str(a), str(b)], "tokenizer": {"source": "union"}}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    vocab = tok.get_vocab()
    assert set(vocab) == set(WORDS_A) | set(WORDS_B) and len(vocab) == 68
    ra, rb = rows_by_token(sda, va, name), rows_by_token(sdb, vb, name)
    for w, i in vocab.items():
        have = [r[w] for r in (ra, rb) if w in r]
        assert torch.allclose(out[name][i], sum(have) / len(have), atol=1e-6), w    # only one: its row
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 68
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = tok("w3 x1 w62", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_base_source_reorders_the_other_models_rows(two_vocabs, read_weights, tmp_path):
    a, b, va, vb, sda, sdb = two_vocabs
    c = {"merge_method": "task_arithmetic", "base_model": str(a), "models": [str(b)], "tokenizer_source": "base"}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    name = "model.embed_tokens.weight"
    ra, rb = rows_by_token(sda, va, name), rows_by_token(sdb, vb, name)
    for w, i in va.items():
        # base + (b - base): b's own row for its tokens; tokens b lacks get the base's row (delta 0)
        assert torch.allclose(out[name][i], rb.get(w, ra[w]), atol=1e-6), w


def test_token_sources_force_and_padding(two_vocabs, read_weights, tmp_path):
    a, b, va, vb, sda, sdb = two_vocabs
    c = {"merge_method": "linear", "models": [str(a), str(b)],
         "tokenizer": {"source": "base", "pad_to_multiple_of": 32,
                       "tokens": {"w5": {"source": str(b), "force": True},
                                  "w63": {"source": {"kind": "zero"}},
                                  "new": {"source": {"kind": "model_token", "model": str(a), "token": "w7"}}}}}
    dppa_ui.merge(c, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    from transformers import AutoTokenizer
    vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    name = "model.embed_tokens.weight"
    e = out[name]
    assert e.shape[0] == 96 and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 96
    ra, rb = rows_by_token(sda, va, name), rows_by_token(sdb, vb, name)
    assert torch.allclose(e[vocab["w5"]], rb["w5"], atol=1e-6)                 # forced: b's row in both
    assert torch.allclose(e[vocab["w63"]], ra["w63"] / 2, atol=1e-6)           # b lacks it: zero row for b
    assert torch.allclose(e[vocab["new"]], ra["w7"], atol=1e-6)                # both take a's w7 row
    assert torch.allclose(e[65:], e[:65].mean(dim=0).expand(31, -1), atol=1e-6)   # padding: mean of the real rows


def test_union_without_tokenizers_is_refused(tiny_family, tmp_path):
    bare = []
    for p in tiny_family.fts:                       # copies without tokenizer files
        shutil.copytree(p, tmp_path / p.name, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*",
                                                                          "chat_template*"))
        bare.append(tmp_path / p.name)
    c = {"merge_method": "linear", "models": [str(p) for p in bare], "tokenizer": {"source": "union"}}
    with pytest.raises(ConfigError, match="union.*tokenizer"):
        dppa_ui.merge(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_config_refusals():
    from dppa_ui import load_config
    base = {"merge_method": "linear", "models": ["a", "b"]}
    for bad, needle in [({"tokenizer": {"source": "union", "extra": 1}}, "extra"),
                        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "model": "a"}}}}}, "token_id"),
                        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "other"}}}}}, "kind"),
                        ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
                        ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of")]:
        with pytest.raises(ConfigError, match=needle):
            load_config({**base, **bad})
