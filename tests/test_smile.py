"""SMILE (issue 9): the layer against the paper's formulas written out here, full rank plus the right
expert reproduces the fine-tune, Llama (nn.Linear) and GPT-2 (Conv1D), the saved folder reloads to
identical logits and scores from the CLI, routing on the demo domains, bad input refused early."""
from __future__ import annotations

import json

import pytest
import torch

from dppa_ui import io, smile, smile_model
from dppa_ui.cli import main
from dppa_ui.config import ConfigError, load_config
from dppa_ui import modelbuild
from dppa_ui.evaluation import load_suite
from dppa_ui.methods.smile import SmileLinear, smile_linear
from dppa_ui.refs import resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


# ------------------------------------------------------------------------------- the layer itself

def _reference(x, w0, b0, deltas, bias_deltas, k, kr, top):
    """y = W0 x + b0 + Σ_{top-K} renormalised softmax(‖V_i[:, :kr]ᵀ x‖) (U_k Σ_k V_kᵀ x + δb_i), one token at a time."""
    svds = [torch.linalg.svd(d.double(), full_matrices=False) for d in deltas]
    out = []
    for t in x.double():
        logits = torch.stack([(vh[:kr] @ t).norm() for _, _, vh in svds])
        p = torch.softmax(logits, 0)
        chosen = sorted(range(len(deltas)), key=lambda i: -float(p[i]))[:top]
        total = sum(float(p[i]) for i in chosen)
        y = w0.double() @ t + b0.double()
        for i in chosen:
            u, s, vh = svds[i]
            y = y + float(p[i]) / total * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k] @ t + bias_deltas[i].double())
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("k, kr, top", [(3, 2, 1), (5, 4, 2), (6, 1, 3)])
def test_layer_matches_the_paper_formulas(k, kr, top):
    g = torch.Generator().manual_seed(k)
    base = torch.nn.Linear(6, 7)
    with torch.no_grad():
        base.weight.copy_(torch.randn(7, 6, generator=g))
        base.bias.copy_(torch.randn(7, generator=g))
    deltas = [torch.randn(7, 6, generator=g) * 0.3 for _ in range(3)]
    bias_deltas = [torch.randn(7, generator=g) * 0.1 for _ in range(3)]
    layer = smile_linear(base, deltas, bias_deltas, k, kr, top)
    x = torch.randn(2, 5, 6, generator=g)
    got = layer(x)
    want = _reference(x.reshape(-1, 6), base.weight, base.bias, deltas, bias_deltas, k, kr, top)
    assert torch.allclose(got.reshape(-1, 7).double(), want, atol=1e-4)
    with smile_model.recording(torch.nn.Sequential(layer)) as traces:
        layer(x)
    idx, w = next(iter(traces.values()))[0]
    assert idx.shape == (10, top) and torch.allclose(w.sum(1), torch.ones(10))


# ---------------------------------------------------------------------------- tiny families

def _family(tmp_path, kind: str, n_ft: int = 2):
    """A base and fine-tunes that differ from it only in the projections inside the blocks (so the
    tensors SMILE merges by task arithmetic are the base's in every model)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dppa_ui.methods.smile import is_projection
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=48, vocab_size=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64))
    model.save_pretrained(str(tmp_path / "base"))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    proj = [n for n, m in model.named_modules() if is_projection(m) and ".h." in n or ".layers." in n and is_projection(m)]
    paths = []
    for i in range(n_ft):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base_sd[n])
            for n in proj:
                mod = model.get_submodule(n)
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.05)
                if mod.bias is not None:
                    mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.05)
        model.save_pretrained(str(tmp_path / f"ft{i}"))
        paths.append(tmp_path / f"ft{i}")
    return tmp_path / "base", paths


def _cfg(base, fts, **params):
    return {"merge_method": "smile", "base_model": str(base), "models": [{"model": str(p)} for p in fts],
            "parameters": {"rank_of_expert": "full", "rank_of_router": 4, **params}}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_and_the_right_expert_give_that_fine_tune(tmp_path, kind):
    from transformers import AutoModelForCausalLM
    base, fts = _family(tmp_path, kind, 3)
    model, _ = smile.build(_cfg(base, fts, smile_others="base"))
    assert len(model.smile["modules"]) == (14 if kind == "llama" else 8)      # q k v o gate up down / c_attn c_proj c_fc c_proj
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    plain_base = _logits(AutoModelForCausalLM.from_pretrained(str(base)), ids)
    for i, path in enumerate(fts):
        want = _logits(AutoModelForCausalLM.from_pretrained(str(path)), ids)
        with smile_model.forced(model, i):
            got = _logits(model, ids)
        assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())
        assert not torch.allclose(want, plain_base, atol=1e-3)           # the experts really differ


def test_low_rank_expert_is_the_truncated_delta(tmp_path):
    base, fts = _family(tmp_path, "llama", 2)
    model, _ = smile.build(_cfg(base, fts, rank_of_expert=3))
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    delta = io.read_state_dict(fts[1])["model.layers.1.mlp.down_proj.weight"] - \
        io.read_state_dict(base)["model.layers.1.mlp.down_proj.weight"]
    u, s, vh = torch.linalg.svd(delta.double())
    want = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert torch.allclose((layer.expert_u[1] @ layer.expert_v[1]).double(), want, atol=1e-5)
    counts = smile_model.parameter_count(model)
    from transformers import AutoModelForCausalLM
    assert counts["plain"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(base)).parameters())
    assert counts["total"] == counts["plain"] + counts["experts"] + counts["routers"]
    assert counts["experts"] == sum(2 * 3 * sum(layer.weight.shape) for layer in smile_model.smile_layers(model).values())


@pytest.mark.parametrize("others", [None, "base", "task_arithmetic"])
def test_tensors_outside_the_experts(others):
    # FusionBench keeps the base's weights outside the upscaled layers: the default. The option
    # `task_arithmetic` adds the fine-tunes' weighted deltas there (summed, not averaged).
    params = {"rank_of_expert": 4, "rank_of_router": 4, **({"smile_others": others} if others else {})}
    cfg = {"merge_method": "smile", "base_model": "demo:base", "parameters": params,
           "models": [{"model": "demo:reverse", "parameters": {"weight": 1.0}},
                      {"model": "demo:sort", "parameters": {"weight": 0.5}}]}
    assert load_config(cfg).get("smile_others") == (others or "base")
    model, _ = smile.build(cfg)
    base = io.read_state_dict(resolve_model("demo:base"))
    fts = [io.read_state_dict(resolve_model(f"demo:{d}")) for d in ("reverse", "sort")]
    got = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert not torch.equal(fts[0][name], base[name]), name         # the fine-tunes did change it
        want = base[name] if others != "task_arithmetic" else \
            base[name] + 1.0 * (fts[0][name] - base[name]) + 0.5 * (fts[1][name] - base[name])
        assert torch.allclose(got[name], want.float(), atol=1e-6), name


# ---------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("scope", ["blocks", "embeddings"])
def test_saved_folder_reloads_to_identical_logits(tmp_path, scope):
    cfg = {"merge_method": "smile", "base_model": "demo:base",
           "models": [{"model": "demo:reverse"}, {"model": "demo:sort"}],
           "parameters": {"rank_of_expert": 8, "rank_of_router": 4, "num_experts_per_tok": 2, "smile_scope": scope}}
    model, tok = smile.build(cfg)
    out = smile.save(model, tok, tmp_path / "smile")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "smile.safetensors", "smile_config.json", "dppa_merge.yaml", "README.md"} <= files
    assert "model.safetensors" not in files
    again, tok2 = smile_model.load(out)
    ids = torch.tensor([tok("reverse: abcd")["input_ids"], tok("sort: 5432101")["input_ids"]])
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    spec = json.loads((out / "smile_config.json").read_text())
    assert spec["experts"] == ["demo:reverse", "demo:sort"] and spec["num_experts_per_tok"] == 2
    assert ("model.embed_tokens" in spec["modules"]) == (scope == "embeddings")
    assert modelbuild.load(str(out), placed=False)[0].smile["modules"] == spec["modules"]       # the one loader knows the folder
    from transformers import AutoModelForCausalLM
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(str(out))                    # not a plain model: refused, not half-loaded


def test_cli_writes_and_scores_a_smile_folder(tmp_path, capsys):
    path = tmp_path / "smile.yaml"
    path.write_text("merge_method: smile\nbase_model: demo:base\nmodels: [demo:cipher, demo:brackets]\n"
                    "parameters: {rank_of_expert: 4, rank_of_router: 2}\n")
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "upscaled 28 projections with smile" in capsys.readouterr().out
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"prompt": "encode: ABC", "answer": "QWE", "domain": "cipher"}\n')
    assert main(["score", str(tmp_path / "out"), "--suite", str(suite), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]["cipher"]["n"] == 1


# -------------------------------------------------------------------------------------- routing

@pytest.fixture(scope="module")
def demo_smile():
    cfg = {"merge_method": "smile", "base_model": "demo:base",
           "models": [{"model": f"demo:{d}"} for d in ("reverse", "cipher", "sort", "brackets")],
           "parameters": {"rank_of_expert": 16, "rank_of_router": 8}}
    return smile.build(cfg)


def test_routing_on_a_prompt_of_each_demo_domain(demo_smile):
    model, tok = demo_smile
    items = [it for d in ("reverse", "cipher", "sort", "brackets") for it in load_suite("zoo", "dev", [d])[:10]]
    acc = smile.routing_accuracy(model, tok, items)
    assert list(acc) == ["reverse", "cipher", "sort", "brackets"]
    for domain, a in acc.items():
        assert a["n"] == 10
        assert a["items"] >= 0.8, (domain, a)          # each prompt mostly goes to its own fine-tune's expert
        assert a["decisions"] > 0.4, (domain, a)       # chance is 0.25
    answer = smile.routing_accuracy(model, tok, items, positions="answer")
    assert all(a["decisions"] > 0.4 for a in answer.values()), answer


def test_reply_routing_for_the_chat_view(demo_smile):
    model, tok = demo_smile
    route = smile.reply_routing(model, tok, [], "sort: 4312", "1234")
    assert "".join(r["token"] for r in route) == "1234"
    for r in route:
        assert len(r["weights"]) == 4 and sum(r["weights"]) == pytest.approx(1.0, abs=1e-5)
        assert r["expert"] == max(range(4), key=lambda i: r["weights"][i])
        assert sum(r["share"]) == pytest.approx(1.0, abs=1e-5) and len(r["share"]) == 4
        assert r["name"] == ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"][r["expert"]]


# ------------------------------------------------------------------------------------ bad input

def test_rank_larger_than_the_matrix_is_refused_before_reading(tmp_path, monkeypatch):
    base, fts = _family(tmp_path, "llama", 2)

    def boom(*a, **k):
        raise AssertionError("weights were read")
    monkeypatch.setattr(io, "read_state_dict", boom)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)
    with pytest.raises(ConfigError, match="rank_of_expert.*32 x 32|rank_of_expert.*at most"):
        smile.build(_cfg(base, fts, rank_of_expert=33))
    with pytest.raises(ConfigError, match="rank_of_router"):
        smile.build(_cfg(base, fts, rank_of_router=40))


def test_top_k_larger_than_the_experts_is_refused():
    with pytest.raises(ConfigError, match="num_experts_per_tok.*2 fine-tune"):
        load_config({"merge_method": "smile", "base_model": "demo:base", "models": ["demo:sort", "demo:cipher"],
                     "parameters": {"num_experts_per_tok": 3}})
    with pytest.raises(ConfigError, match="`prune` is a pipeline stage; merge_method `smile` is an upscale method"):
        load_config({"merge_method": "smile", "prune": "magnitude", "base_model": "demo:base", "models": ["demo:sort"]})
    with pytest.raises(ValueError, match="between 1 and"):
        SmileLinear(torch.zeros(2, 2), None, torch.zeros(1, 2, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2),
                    num_experts_per_tok=2)


def test_smile_config_round_trip():
    cfg = load_config({"merge_method": "smile", "base_model": "demo:base", "models": ["demo:sort", "demo:cipher"],
                       "parameters": {"rank_of_expert": "full", "num_experts_per_tok": 2, "smile_scope": "embeddings"}})
    again = load_config(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict() and again.get("rank_of_expert") is None and again.method_name == "smile"
