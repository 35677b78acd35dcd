"""The demo family: the committed models load, meet the issue's thresholds (scored here, never read
from a file), and the builder is deterministic."""
from __future__ import annotations

import itertools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from safetensors.torch import load_file

from dppa_ui import zoo
from dppa_ui import modelbuild
from dppa_ui.evaluation import load_suite, score_model, score_state_dict, relative_gain

DOMAINS = zoo.domain_names()
FINETUNES = DOMAINS
COMPLEX = "reverse_complex"


def _sd(name):
    return load_file(str(zoo.demo_path(name) / "model.safetensors"))


@pytest.fixture(scope="module")
def test_items():
    return load_suite("zoo", "test")


@pytest.fixture(scope="module")
def scores(test_items):
    """Test-split scores of the base and every fine-tune (EM + smooth), computed here."""
    out = {}
    for name in ["base", *FINETUNES]:
        items = test_items if name == "base" else [i for i in test_items if i["domain"] == name]
        out[name] = score_model(*modelbuild.load(f"demo:{name}", placed=False), items)
    return out


def _merge(config, names):
    import dppa_ui

    return dppa_ui.merge_in_memory(_sd("base"), [_sd(n) for n in names], config)



pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# ------------------------------------------------------------------------------------ the family

def test_names_paths_and_info():
    names = zoo.demo_names()
    assert names[0] == "base" and COMPLEX in names and len(DOMAINS) >= 4
    for name in names:
        info = zoo.model_info(name)
        assert info == zoo.model_info(f"demo:{name}") == zoo.model_info(zoo.demo_path(name))
        if name == "base":
            assert info["role"] == "base" and info["domain"] is None
        elif name == COMPLEX:
            assert info["role"] == "complex" and info["domain"] == "reverse"
        else:
            assert info["role"] == "finetune" and info["domain"] == name
    with pytest.raises(ValueError, match="valid names: base"):
        zoo.demo_path("nope")


def test_committed_family_is_standard_hf_and_small():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    total = sum(f.stat().st_size for f in zoo.ZOO_DIR.rglob("*") if f.is_file())
    assert total < 40 * 2**20
    for name in zoo.demo_names():
        path = zoo.demo_path(name)
        for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]:
            assert (path / f).is_file(), f
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.config.tie_word_embeddings is False
    tok = AutoTokenizer.from_pretrained(str(zoo.demo_path("base")))
    text = tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<bos><|user|>reverse: abc<|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == 2 + len("reverse: abc") + 1


def test_fine_tune_generates_in_chat(tmp_path):
    """End to end through plain transformers: chat template, generate, decode."""
    model, tok = modelbuild.load("demo:reverse", placed=False)
    text = tok.apply_chat_template([{"role": "user", "content": "reverse: tiger"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == "regit"


def test_splits_sizes_and_disjoint():
    for d in DOMAINS:
        dev, test = load_suite("zoo", "dev", [d]), load_suite("zoo", "test", [d])
        assert len(dev) == 100 and len(test) == 200
        assert not {i["prompt"] for i in dev} & {i["prompt"] for i in test}
        assert len({i["prompt"] for i in test}) == 200


# ---------------------------------------------------------------------------- issue thresholds

def test_base_fails_and_fine_tunes_succeed(scores):
    for d in DOMAINS:
        assert scores["base"][d]["em"] <= 0.05, (d, scores["base"][d])
        assert scores[d][d]["em"] >= 0.9, (d, scores[d][d])
        assert scores[d][d]["smooth"] > scores["base"][d]["smooth"] + 0.3


def test_complex_fine_tune_shows_dppa_effect(test_items):
    """Pruned alone, the complex fine-tune survives magnitude/DP pruning but not DARE's random drop."""
    items = [i for i in test_items if i["domain"] == "reverse"]
    gaps = []
    for density in (0.1, 0.2):
        em = {}
        for method in ("dare_linear", "dp", "ties"):
            cfg = {"merge_method": method, "base_model": "demo:base", "seed": 0,
                   "models": [{"model": f"demo:{COMPLEX}", "parameters": {"density": density}}]}
            em[method] = score_state_dict("demo:base", _merge(cfg, [COMPLEX]), items)["reverse"]["em"]
        gaps.append(max(em["dp"], em["ties"]) - em["dare_linear"])
    assert max(gaps) >= 0.3, gaps


METHODS = ("task_arithmetic", "ties", "dare_ties", "dp", "dppa", "pcb")


def _pair_config(method, pair, density):
    models = [{"model": f"demo:{n}", "parameters": {"density": density}} for n in pair]
    params = {}
    if method == "dppa":
        for m in models:
            m["parameters"].update(partitions=[density / 2, density], amplification=[1.5, 1.0])
    if method == "pcb":
        params["pcb_ratio"] = density
    return {"merge_method": method, "base_model": "demo:base", "models": models, "parameters": params, "seed": 0}


@pytest.fixture(scope="module")
def pair_gains(scores, test_items):
    """{method: {pair: (smooth gain kept on the first domain, on the second)}} at density 0.2."""
    out = {m: {} for m in METHODS}
    for pair in itertools.combinations(FINETUNES, 2):
        items = [i for i in test_items if i["domain"] in pair]
        for method in METHODS:
            merged = _merge(_pair_config(method, pair, 0.2), pair)
            s = score_state_dict("demo:base", merged, items, generate=False)
            out[method][pair] = tuple(relative_gain(s[d]["smooth"], scores["base"][d]["smooth"],
                                                    scores[d][d]["smooth"]) for d in pair)
    return out


def test_pair_merges_keep_part_of_both_skills_and_methods_differ(pair_gains):
    """Every pair, merged by its best method at density 0.2, keeps a real share of both fine-tunes'
    smooth gain; and the six methods give six different results."""
    for pair in pair_gains["ties"]:
        best = max(min(pair_gains[m][pair]) for m in METHODS)
        assert best >= 0.25, (pair, {m: pair_gains[m][pair] for m in METHODS})
    results = {m: tuple(round(g, 6) for gs in pair_gains[m].values() for g in gs) for m in METHODS}
    assert len(set(results.values())) == len(METHODS), results


def test_pair_merges_keep_sixty_percent_of_both_gains(pair_gains):
    """Issue 3: with the best method at density 0.2, at least half of the pairs keep >= 0.6 of both
    fine-tunes' smooth-score gain on their own domains."""
    kept = {m: sum(min(g) >= 0.6 for g in pair_gains[m].values()) for m in METHODS}
    assert max(kept.values()) >= len(pair_gains["ties"]) / 2, kept


# ------------------------------------------------------------------------------------- builder

def _quiet(_):
    pass


def test_quick_build_is_deterministic(tmp_path):
    """Same seed, same weights, also when the fine-tunes train side by side in worker processes
    (the full build's default) instead of in this process (--quick's)."""
    lines = []
    a = zoo.build_zoo(tmp_path / "a", quick=True, seed=0, log=_quiet)
    b = zoo.build_zoo(tmp_path / "b", quick=True, seed=0, log=lines.append, workers=2)
    c = zoo.build_zoo(tmp_path / "c", quick=True, seed=1, log=_quiet)
    # The workers' progress lines reached the caller's log, one summary line per fine-tune.
    assert sorted(ln.split(":")[0] for ln in lines if "|delta|/|base|" in ln) == sorted(zoo.demo_names()[1:])
    for name in zoo.demo_names():
        fa, fb = (a / name / "model.safetensors").read_bytes(), (b / name / "model.safetensors").read_bytes()
        assert fa == fb, name
        assert json.loads((a / name / "dppa_zoo.json").read_text())["role"] == zoo.model_info(zoo.demo_path(name))["role"]
    assert (a / "base" / "model.safetensors").read_bytes() != (c / "base" / "model.safetensors").read_bytes()
    for d in DOMAINS:
        assert (a / "data" / d / "test.jsonl").read_bytes() == (b / "data" / d / "test.jsonl").read_bytes()
    # A quick build is a complete family: every model loads and scores with the same code.
    items = load_suite(a, "dev")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(a / "reverse"))
    tok = AutoTokenizer.from_pretrained(str(a / "reverse"))
    s = score_model(model, tok, items[:20])
    assert set(s) == {"reverse"} and s["reverse"]["n"] == 20


def test_build_refuses_zero_workers(tmp_path):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        zoo.build_zoo(tmp_path / "z", quick=True, log=_quiet, workers=0)
    assert not (tmp_path / "z").exists()


def test_build_never_overwrites_other_files(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo zoo"):
        zoo.build_zoo(target, quick=True, log=_quiet)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]      # the temp build dir was cleaned up
    # A previous zoo build is replaced.
    first = zoo.build_zoo(tmp_path / "z", quick=True, log=_quiet)
    zoo.build_zoo(first, quick=True, seed=3, log=_quiet)
    assert json.loads((first / "zoo.json").read_text())["seed"] == 3


def test_training_never_sees_held_out_inputs():
    import random

    from dppa_ui.zoo.builder import finetune_sources
    from dppa_ui.zoo.domains import DOMAINS as DOMS, SPLIT_SIZES, held_out_inputs, held_out_splits
    from dppa_ui.zoo.tokenizer import VOCAB

    held = held_out_inputs(held_out_splits(0))      # what the builder hands its samplers
    assert {d: len(h) for d, h in held.items()} == {d: sum(SPLIT_SIZES.values()) for d in DOMS}
    # A sampler restricted to a tiny alphabet would hit held-out inputs often if it did not reject them.
    inv = {v: k for k, v in VOCAB.items()}
    rng = random.Random(0)
    src = finetune_sources("brackets", held)[0]
    prefix = 2 + len("close: ")                     # <bos> <|user|> "close: "
    for _ in range(3000):
        ids, _ = src.make(rng)
        x = "".join(inv[i] for i in ids[prefix:ids.index(VOCAB["<|assistant|>"])])
        assert x not in held["brackets"]
    assert DOMS["brackets"].solve("([{<") == ">}])"
