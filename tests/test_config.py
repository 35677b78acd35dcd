"""Config contract (issue 2, "Config and CLI"): defaults, overrides, mergekit compatibility, and one
refusal test per bad input, each asserting the offending key or value is named. No tensors here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dppa_ui import PRESETS, ConfigError, load_config

BASE = "org/base"


def c(method="ties", models=None, params=None, **top):
    d = {"base_model": BASE, "models": models if models is not None else [{"model": "org/a"}, {"model": "org/b"}]}
    if method is not None:
        d["merge_method"] = method
    if params is not None:
        d["parameters"] = params
    d.update(top)
    return d


def refused(d, *needles):
    with pytest.raises(ConfigError) as e:
        load_config(d)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not named in: {msg}"
    return msg


# --------------------------------------------------------------------------- presets and defaults

def test_presets_are_the_issue_table():
    assert PRESETS == {"task_arithmetic": ("none", "none", "sum"), "ties": ("magnitude", "none", "ties"),
                       "dare_linear": ("random", "none", "sum"), "dare_ties": ("random", "none", "ties"),
                       "dp": ("dp", "none", "sum"), "dppa": ("dp", "dpa", "sum"), "pcb": ("none", "none", "pcb")}
    for name, stages in PRESETS.items():
        assert load_config(c(name)).stages == stages


def test_defaults():
    cfg = load_config(c("task_arithmetic"))
    assert [(m.get("weight"), m.get("density")) for m in cfg.models] == [(1.0, 1.0), (1.0, 1.0)]
    assert cfg.dtype is None                       # output dtype = the base's
    assert cfg.get("lambda") == 1.0 and cfg.seed == 0
    assert cfg.get("dp_lambda") == 0.08 and cfg.get("dp_outlier_m") == 5.0 and cfg.get("dp_others") == "keep"
    assert cfg.get("pcb_ratio") == 0.1 and cfg.get("pcb_scope") == "model"
    # rescale: mergekit's defaults (dare_*: true = L1 norm; ties / breadcrumbs: false)
    assert [m.get("rescale") for m in load_config(c("dare_linear")).models] == ["l1", "l1"]
    assert [m.get("rescale") for m in load_config(c("dare_ties")).models] == ["l1", "l1"]
    assert [m.get("rescale") for m in load_config(c("ties")).models] == ["none", "none"]


@pytest.mark.parametrize("method,norm", [("ties", True), ("dare_ties", False), ("task_arithmetic", False),
                                         ("dare_linear", False), ("dp", False), ("dppa", False),
                                         ("breadcrumbs", False), ("breadcrumbs_ties", False), ("della", True),
                                         ("della_linear", False), ("linear", True)])
def test_normalize_defaults(method, norm):
    """mergekit 0.1.5's per-method defaults (registry.py)."""
    assert load_config(c(method)).get("normalize") is norm
    assert load_config(c(method, params={"normalize": not norm})).get("normalize") is (not norm)


def test_parameter_of_another_method_is_a_notice_not_an_error():
    cfg = load_config(c("pcb", params={"normalize": True}))      # pcb has no normalize: mergekit ignores it too
    assert any("normalize" in n and "ignored" in n for n in cfg.notices)


def test_per_model_parameters_override_global():
    cfg = load_config(c("ties", models=[{"model": "org/a", "parameters": {"density": 0.3, "weight": 0.5}},
                                        {"model": "org/b"}], params={"density": 0.6, "weight": 2.0}))
    assert [(m.get("weight"), m.get("density")) for m in cfg.models] == [(0.5, 0.3), (2.0, 0.6)]


def test_dpa_partitions_amplification_global_and_per_model():
    cfg = load_config(c("dppa", models=[{"model": "org/a", "parameters": {"density": 0.3, "partitions": [0.1, 0.3],
                                                                         "amplification": [2.0, 1.1]}},
                                        {"model": "org/b"}],
                        params={"density": 0.2, "partitions": [0.1, 0.2], "amplification": [1.8, 1.0]}))
    assert cfg.models[0].get("partitions") == [0.1, 0.3] and cfg.models[0].get("amplification") == [2.0, 1.1]
    assert cfg.models[1].get("partitions") == [0.1, 0.2] and cfg.models[1].get("amplification") == [1.8, 1.0]


def test_explicit_stages_override_preset():
    cfg = load_config(c("ties", combine="sum"))
    assert cfg.stages == ("magnitude", "none", "sum")
    cfg = load_config(c(None, prune="dp", amplify="none", combine="pcb"))
    assert cfg.stages == ("dp", "none", "pcb")
    cfg = load_config(c("dppa", prune="magnitude"))
    assert cfg.stages == ("magnitude", "dpa", "sum")


def test_negative_weights_allowed():
    cfg = load_config(c("task_arithmetic", models=[{"model": "org/a", "parameters": {"weight": -1.0}}]))
    assert cfg.models[0].get("weight") == -1.0


def test_rescale_options():
    def r(v):
        return load_config(c("dare_linear", params={"density": 0.5, "rescale": v})).models[0].get("rescale")
    assert r(True) == "l1"          # mergekit's rescale: true
    assert r(False) == "none"
    assert r("l1") == "l1" and r("none") == "none" and r("paper") == "paper"


def test_seed_and_yaml_round_trip():
    cfg = load_config(c("dppa", params={"density": 0.2, "dp_lambda": 0.1}, seed=9, dtype="bf16"))
    assert cfg.seed == 9 and cfg.dtype == "bfloat16"
    again = load_config(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()
    assert again.stages == cfg.stages and again.models == cfg.models


def test_yaml_text_and_path(tmp_path):
    text = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters: {density: 0.5}\n"
    assert load_config(text).models[0].get("density") == 0.5
    p = tmp_path / "m.yaml"
    p.write_text(text)
    assert load_config(str(p)).models[0].get("density") == 0.5
    assert load_config(p).models[0].get("density") == 0.5


# --------------------------------------------------------------------------- mergekit compatibility

MERGEKIT_TIES = """
models:
  - model: org/base
  - model: org/math
    parameters:
      density: 0.5
      weight: 0.5
  - model: org/code
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_mergekit_ties_yaml_runs_unchanged():
    cfg = load_config(MERGEKIT_TIES)
    assert cfg.stages == ("magnitude", "none", "ties") and cfg.get("normalize") is True
    assert [m.model for m in cfg.models] == ["org/math", "org/code"]      # base listed: skipped
    assert [(m.get("weight"), m.get("density")) for m in cfg.models] == [(0.5, 0.5), (0.3, 0.5)]
    assert cfg.dtype == "bfloat16"
    assert any("int8_mask" in n for n in cfg.notices)
    assert any("base" in n for n in cfg.notices)


@pytest.mark.parametrize("extra", [
    {"out_dtype": "float16"}, {"tokenizer_source": "base"}, {"tokenizer_source": "org/a"},
    {"tokenizer": {"source": "org/b"}}, {"chat_template": "chatml"}, {"chat_template": "auto"},
    {"name": "my-merge"}, {"parameters": {"int8_mask": False}},
])
def test_mergekit_keys_accepted(extra):
    load_config(c("ties", **extra))


def test_mergekit_named_chat_template_accepted():
    # mergekit ships named templates (alpaca, chatml, llama3, mistral, ...). The issue: mergekit's
    # `chat_template` is "honoured or, where meaningless here, accepted with a notice".
    load_config(c("ties", chat_template="llama3"))


MERGEKIT_CHAT = json.loads((Path(__file__).parent / "data" / "mergekit_chat_templates.json").read_text())


@pytest.mark.parametrize("name", list(MERGEKIT_CHAT["rendered"]))
@pytest.mark.parametrize("conversation", list(MERGEKIT_CHAT["conversations"]))
def test_named_chat_templates_render_as_mergekit(name, conversation):
    # `chat_template: NAME` writes a template that renders, through transformers' apply_chat_template,
    # exactly what mergekit 0.1.5's template of that name renders: one- and multi-turn, with and
    # without a system message, ending on a user or an assistant turn, generation prompt off / on.
    from conftest import char_tokenizer
    template = load_config(c("ties", chat_template=name)).chat_template
    tok = char_tokenizer(None)                 # bos <bos>, eos <eos>, as the expected strings were rendered
    messages = MERGEKIT_CHAT["conversations"][conversation]
    got = [tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
           for gen in (False, True)]
    assert got == MERGEKIT_CHAT["rendered"][name][conversation]


def test_named_chat_template_refusals_as_mergekit():
    # mergekit's mistral template refuses turns that do not alternate, and roles other than user /
    # assistant after a first system message; alpaca renders a user_context turn as "### Input:"
    from conftest import char_tokenizer
    tok = char_tokenizer(None)
    mistral = load_config(c("ties", chat_template="mistral")).chat_template
    for messages in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "system", "content": "c"}]):
        with pytest.raises(Exception, match="mistral chat template"):
            tok.apply_chat_template(messages, chat_template=mistral, tokenize=False)
    alpaca = load_config(c("ties", chat_template="alpaca")).chat_template
    messages = [{"role": "user", "content": "Sum these."}, {"role": "user_context", "content": " 2 and 3 "}]
    assert tok.apply_chat_template(messages, chat_template=alpaca, tokenize=False, add_generation_prompt=True) == \
        "\n\n### Instruction:\nSum these.\n\n### Input:\n2 and 3### Response:\n"


def test_out_dtype_wins_over_dtype():
    assert load_config(c("ties", dtype="bfloat16", out_dtype="float16")).dtype == "float16"
    assert load_config({"out_dtype": "float16", "dtype": "bfloat16", **c("ties")}).dtype == "float16"


def test_base_among_models_skipped_but_only_base_refused():
    cfg = load_config(c("ties", models=[{"model": BASE}, {"model": "org/a"}]))
    assert [m.model for m in cfg.models] == ["org/a"]
    refused(c("ties", models=[{"model": BASE}]), "models")


# --------------------------------------------------------------------------- refusals, one per bad input

def test_refuse_unknown_top_key():
    refused(c("ties", frobnicate=1), "frobnicate")


def test_refuse_unknown_parameters_key():
    refused(c("ties", params={"densty": 0.5}), "densty")


def test_refuse_unknown_model_parameters_key():
    refused(c("ties", models=[{"model": "org/a", "parameters": {"wieght": 1}}]), "wieght")


MERGEKIT_METHODS = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion",
                    "sce", "ram", "ramplus_tl", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                    "passthrough", "task_arithmetic", "ties", "dare_ties", "dare_linear"]


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_every_mergekit_method_loads(method):
    from dppa_ui.registry import METHODS
    models = {"slerp": [{"model": "org/a"}], "nearswap": [{"model": "org/a"}], "arcee_fusion": [{"model": "org/a"}],
              "passthrough": [{"model": "org/a"}]}.get(method)
    params = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.01}, "della": {"density": 0.5}}.get(method)
    top = {"base_model": None} if method == "passthrough" else {}
    d = c(method, models=models, params=params)
    d.update(top)
    cfg = load_config(d)
    assert cfg.merge_method == method and METHODS[method].mergekit
    assert load_config(cfg.to_yaml()).to_dict() == cfg.to_dict()


def test_refuse_unknown_method():
    refused(c("frankenmerge"), "frankenmerge")


def test_refuse_missing_method_and_stages():
    refused(c(None), "merge_method")


def test_refuse_bad_gradients_and_filters():
    refused(c("ties", models=[{"model": "org/a", "parameters": {"weight": []}}]), "weight", "empty")
    refused(c("ties", params={"density": [1.0, 0.7, 0.0]}), "density[2]", "0.0")     # every anchor in range
    refused(c("ties", params={"weight": [{"filter": "mlp", "value": 0.5}, 1.0]}), "weight[1]", "filter")
    refused(c("ties", params={"weight": [{"filter": "mlp", "valu": 0.5}]}), "weight[0]", "valu")
    refused(c("ties", params={"weight": [{"filter": 3, "value": 0.5}]}), "weight[0].filter")
    refused(c("ties", params={"weight": [{"filter": "a", "value": [{"filter": "b", "value": 1}]}]}), "nested")
    refused(c("dp", params={"dp_lambda": [0.1, 0.2]}), "dp_lambda", "one value")
    refused(c("dp", params={"density": [0.1, 0.2]}), "density", "DP")
    refused(c("dppa", params={"density": [0.1, 0.2]}), "density", "dpa")


def test_refuse_slices_without_layer_range_and_with_models():
    refused({"merge_method": "ties", "base_model": BASE,
             "slices": [{"sources": [{"model": "org/a"}]}]}, "slices[0].sources[0]", "layer_range")
    refused({"merge_method": "passthrough", "models": [{"model": "org/a"}],
             "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]}, "slices", "models")


def test_lora_refs_accepted_and_malformed_refused():
    cfg = load_config(c("ties", models=[{"model": "org/a+org/lora"}, {"model": {"model": "org/b", "lora": "org/l2"}}]))
    assert [m.model for m in cfg.models] == ["org/a+org/lora", "org/b+org/l2"]
    refused(c("ties", models=[{"model": "org/a+org/l+x"}]), "models[0].model", "MODEL+ADAPTER")
    refused(c("ties", models=[{"model": {"model": "org/a", "adapter": "x"}}]), "models[0].model", "adapter")


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.2])
def test_refuse_density_out_of_range(density):
    refused(c("ties", models=[{"model": "org/a", "parameters": {"density": density}}]), "density", str(density))


def test_refuse_global_density_out_of_range():
    refused(c("ties", params={"density": 0}), "density")


def test_refuse_partitions_not_ascending():
    refused(c("dppa", models=[{"model": "org/a", "parameters": {"density": 0.2, "partitions": [0.2, 0.1]}}]),
            "partitions")


def test_refuse_partitions_not_ending_at_density():
    msg = refused(c("dppa", models=[{"model": "org/a", "parameters": {"density": 0.2, "partitions": [0.1, 0.15]}}]),
                  "partitions")
    assert "0.2" in msg


def test_refuse_partitions_amplification_length_mismatch():
    refused(c("dppa", models=[{"model": "org/a", "parameters": {"density": 0.2, "partitions": [0.1, 0.2],
                                                                "amplification": [1.8]}}]), "amplification")


@pytest.mark.parametrize("stages", [{"merge_method": "task_arithmetic", "amplify": "dpa"},
                                    {"prune": "none", "amplify": "dpa", "combine": "ties"}])
def test_refuse_dpa_without_a_prune(stages):
    d = c(None)
    d.update(stages)
    refused(d, "dpa")


@pytest.mark.parametrize("prune", ["random", "della", "breadcrumbs", "magnitude", "dp"])
def test_dpa_composes_with_every_prune(prune):
    cfg = load_config(c(None, prune=prune, amplify="dpa", combine="sum", params={"density": 0.4}))
    assert cfg.stages == (prune, "dpa", "sum") and cfg.models[0].get("partitions") == [0.2, 0.4]


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_refuse_bad_dtype(key):
    refused(c("ties", **{key: "int4"}), key, "int4")


def test_refuse_bad_stage_names():
    refused(c(None, prune="topk"), "prune", "topk")
    refused(c(None, combine="mean"), "combine", "mean")


def test_refuse_bad_enums_and_ranges():
    refused(c("dp", params={"dp_others": "drop"}), "dp_others", "drop")
    refused(c("pcb", params={"scope": "layer"}), "scope", "layer")
    refused(c("ties", params={"normalize": "yes"}), "normalize")
    refused(c("dare_linear", params={"rescale": "l2"}), "rescale", "l2")
    refused(c("ties", seed=-1), "seed")
    refused(c("ties", params={"lambda": "big"}), "lambda")


def test_refuse_missing_base_and_models():
    refused({"merge_method": "ties", "models": [{"model": "org/a"}]}, "base_model")
    refused({"merge_method": "ties", "base_model": BASE, "models": []}, "models")


def test_refuse_unknown_model_entry_key():
    refused(c("ties", models=[{"model": "org/a", "layer_range": [0, 4]}]), "layer_range")


def test_refuse_missing_config_file(tmp_path):
    refused(str(tmp_path / "missing.yaml"), "missing.yaml")


def test_refuse_invalid_yaml():
    refused("merge_method: [ties\nbase_model: x\n", "YAML")


# --------------------------------------------------------------------------- mergekit 0.1.5's whole merge-YAML schema

def test_every_mergekit_schema_key_is_accepted():
    """MergeConfiguration (modules/slices/models, merge_method, base_model, dtype, out_dtype,
    tokenizer_source / tokenizer{source, tokens{source, force}, pad_to_multiple_of}, chat_template,
    parameters), slice (sources, base_model, residual_weight, parameters), source (model,
    layer_range, parameters), model mapping (model, lora, override_architecture), conditional
    parameters (filter, value) and mergekit-multimerge's `name`."""
    d = {"name": "x", "merge_method": "ties", "base_model": {"model": "org/base", "override_architecture": "Llama"},
         "dtype": "bfloat16", "out_dtype": "float16", "chat_template": "auto",
         "tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                       "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True}}},
         "parameters": {"normalize": True, "int8_mask": True, "rescale": False, "lambda": 0.9,
                        "density": [{"filter": "mlp", "value": [0.2, 0.5]}, {"value": 0.4}]},
         "modules": {"text": {"parameters": {"weight": 0.5},
                              "slices": [{"base_model": "org/base", "residual_weight": 0.1,
                                          "parameters": {"lambda": 1.0},
                                          "sources": [{"model": "org/base", "layer_range": [0, 4]},
                                                      {"model": {"model": "org/a", "lora": "org/l"},
                                                       "layer_range": [0, 4], "parameters": {"weight": 1.0}}]}]}}}
    cfg = load_config(d)
    assert cfg.slices[0].sources[1].model == "org/a+org/l" and cfg.auto_chat_template
    assert cfg.vocab.source == "union" and cfg.vocab.pad_to_multiple_of == 8
    assert any("override_architecture" in n for n in cfg.notices)
    assert any("residual_weight" in n for n in cfg.notices)


@pytest.mark.parametrize("d,needle", [
    ({"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2], "weights": 1}]}]}, "weights"),
    ({"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}], "extra": 1}]}, "extra"),
    ({"models": [{"model": {"model": "org/a", "adapter": "b"}}]}, "adapter"),
    ({"tokenizer": {"source": "base", "vocab": 1}}, "vocab"),
    ({"tokenizer": {"tokens": {"t": {"source": "org/a", "strength": 1}}}}, "strength"),
    ({"chat_template": "not-a-template"}, "chat_template"),
    ({"modules": {"a": {"models": [{"model": "org/a"}], "layers": 2}}}, "layers"),
])
def test_unknown_keys_at_every_level_are_refused_by_name(d, needle):
    base = {"merge_method": "linear", "models": [{"model": "org/a"}]}
    base.update(d)
    if "slices" in d or "modules" in d:
        base.pop("models")
    refused(base, needle)


@pytest.mark.parametrize("text", ["weight: .inf", "weight: 1.0e400", "weight: -.inf", "weight: .nan",
                                  "density: .nan", "lambda: .inf"])
def test_refuse_every_non_finite_number(text):
    key, value = text.split(": ")
    where = "parameters" if key == "lambda" else "models[0].parameters"
    params = f"parameters: {{{key}: {value}}}\n" if key == "lambda" else ""
    model = f"  - model: a\n    parameters: {{{key}: {value}}}\n" if key != "lambda" else "  - model: a\n"
    with pytest.raises(ConfigError, match=rf"`{re.escape(where)}\.{key}` must be a finite number"):
        load_config(f"merge_method: ties\nbase_model: b\nmodels:\n{model}{params}")


def test_invalid_yaml_names_the_line_and_column():
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 1"):
        load_config("merge_method: ties\nmodels: [a, b\n")

# --------------------------------------------------------------------------- issue 8: official DPPA / PCB keys

def test_official_dppa_and_pcb_defaults_and_round_trip():
    cfg = load_config(c("dppa"))
    assert (cfg.get("dpa_whole"), cfg.get("alpha_search"), cfg.get("alpha_start"), cfg.get("alpha_step")) == ("amplify", "official", None, 0.1)
    assert cfg.get("dpa_bands") == "max"
    assert load_config(c("pcb")).get("clip_ratio") == 0.0001
    opts = {"dpa_whole": "keep", "alpha_search": "best", "alpha_start": [1.0, 1.0], "alpha_step": 0.05,
            "dpa_bands": "own"}
    cfg = load_config(c("dppa", params=opts))
    again = load_config(cfg.to_dict())
    assert (again.get("dpa_whole"), again.get("alpha_search"), again.get("alpha_start"), again.get("alpha_step")) == ("keep", "best", [1.0, 1.0], 0.05)
    assert again.get("dpa_bands") == "own"
    pcb = load_config(load_config(c("pcb", params={"clip_ratio": 0.01, "lambda": "auto"})).to_dict())
    assert pcb.get("clip_ratio") == 0.01 and pcb.lambda_auto and pcb.get("lambda") == 1.0
    # lambda: auto searches as pcb_ES.py (mean score, nevergrad's recommendation); ours are options
    assert (pcb.get("lambda_objective"), pcb.get("lambda_choice")) == ("mean", "recommendation")
    ours = load_config(load_config(c("ties", params={"lambda": "auto", "lambda_objective": "geometric",
                                                     "lambda_choice": "best"})).to_dict())
    assert ours.lambda_auto and (ours.get("lambda_objective"), ours.get("lambda_choice")) == ("geometric", "best")


def test_refuse_bad_official_keys():
    refused(c("dppa", params={"dpa_whole": "scale"}), "parameters.dpa_whole", "scale")
    refused(c("dppa", params={"dpa_bands": "min"}), "parameters.dpa_bands", "min")
    refused(c("dppa", params={"alpha_search": "greedy"}), "parameters.alpha_search")
    refused(c("dppa", params={"alpha_step": 0}), "parameters.alpha_step")
    refused(c("dppa", params={"alpha_start": [1.8, -0.1]}), "parameters.alpha_start")
    refused(c("dppa", params={"alpha_start": [1.8], "amplification": "auto"}), "alpha_start", "2 partitions")
    refused(c("pcb", params={"clip_ratio": 0.5}), "parameters.clip_ratio")
    refused(c("pcb", params={"lambda": "best"}), "parameters.lambda")
    refused(c("pcb", params={"lambda": "auto", "lambda_choice": "last"}), "parameters.lambda_choice", "last")
    refused(c("pcb", params={"lambda": "auto", "lambda_objective": "min"}), "parameters.lambda_objective", "min")
