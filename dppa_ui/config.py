"""Merge configs: mergekit 0.1.5's merge YAML, plus our own pipeline stages.

A merge is a method from `registry.METHODS`: a pipeline prune -> amplify -> combine on each
fine-tune's delta (`prune:` / `amplify:` / `combine:` override a preset's stages), an interpolation
on the weights, or passthrough layer stacking (`slices`). Every key mergekit's merge YAML has is
supported; everything is validated here, before any tensor is read, and every refusal names the
key or value and the fix.

Any numeric parameter may be a gradient list or `filter` entries (params.py). The loaded config
keeps such settings as they are; `MergeConfig.for_tensor(name, t)` is the resolved view for one
tensor, whose ModelSpec and MergeConfig fields are plain values, so per-tensor code reads
`cfg.models[i].get("density")` unchanged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import params as P
from .registry import (AMPLIFIES, COMBINES, METHODS, PIPELINE_PRESETS, PRESETS, PRUNES, Method, Param, default,
                       stage_params)
from .registry import ALL_PARAM_KEYS as _ALL_PARAM_KEYS
from .registry import APL_EXAMPLES_DEFAULT as APL_EXAMPLES

__all__ = ["PRESETS", "PRESET_INFO", "PRUNES", "AMPLIFIES", "COMBINES", "METHODS", "ConfigError", "ModelSpec",
           "SliceSpec", "VocabSpec", "MergeConfig", "MergeStage", "load_config", "load_stages", "slice_view",
           "rename_refs"]

PRESET_INFO: dict[str, tuple[str, str]] = {n: (METHODS[n].doc, METHODS[n].paper) for n in PIPELINE_PRESETS}
UPSCALE_METHODS: dict[str, tuple[str, str]] = {n: (m.doc, m.paper) for n, m in METHODS.items() if m.family == "upscale"}

DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}

TOP_KEYS = {"merge_method", "prune", "amplify", "combine", "base_model", "models", "parameters", "dtype",
            "out_dtype", "seed", "tokenizer_source", "tokenizer", "chat_template", "name",
            # layer stacking and mergekit's module wrapper
            "slices", "modules",
            "search"}   # the merge-parameter search block (dppa_ui/search.py)
MODEL_ENTRY_KEYS = ("model", "parameters", "domain")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
# mergekit's named templates, written out here in our own Jinja: each renders, through transformers'
# apply_chat_template, exactly what mergekit 0.1.5's template of that name renders (its quirks
# included: llama3 trims every message; alpaca puts the last system message first, trims, and
# leaves no blank line before the generation prompt; mistral folds a first system message into
# the first user turn; exaone keeps the indentation of mergekit's file). Every piece of text is a
# string literal, so the output does not depend on the renderer's whitespace settings.
NAMED_CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% if messages %}{{ bos_token }}{% endif %}{% for m in messages %}"
              "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
              "{% endif %}",
    "alpaca": "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
              "{{ (system | last)['content'] | trim if system else '' }}{{ '\\n\\n' }}"
              "{% set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
              "'user_context': '### Input:\\n'} %}"
              "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + m['content'] | trim }}"
              "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
              "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}",
    "mistral": "{% set has_system = messages and messages[0]['role'] == 'system' %}"
               "{% set turns = messages[1:] if has_system else messages %}{{ bos_token }}{% for m in turns %}"
               "{% if (m['role'] == 'user') != (loop.index0 is even) %}"
               "{{ raise_exception('mistral chat template: after an optional first system message the turns must "
               "alternate user, assistant, user, ...') }}{% endif %}"
               "{% if m['role'] == 'user' %}{{ ' [INST] ' }}"
               "{% if loop.first and has_system %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
               "{{ m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
               "{% else %}{{ raise_exception('mistral chat template: only user and assistant turns after an optional "
               "first system message') }}{% endif %}{% endfor %}",
    "exaone": "{% for m in messages %}"
              "{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
              "{{ '    [|' + m['role'] + '|]' + m['content'] + '\\n' }}"
              "{{ '        \\n\\n' if m['role'] == 'user' else '        [|endofturn|]\\n\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}",
}


class ConfigError(ValueError):
    """A merge config that cannot run; the message names the key or value and the fix."""


class Settings:
    """Parameter settings by internal name (registry.PARAMS): what a method's record declares, read
    through `get` (a parameter this config's method lacks reads as its registry default)."""
    settings: dict[str, Any]

    def get(self, name: str):
        s = self.settings
        return s[name] if name in s else default(name)

    def with_settings(self, values: dict[str, Any]):
        """A copy with these settings changed."""
        return replace(self, settings={**self.settings, **values})


@dataclass
class ModelSpec(Settings):
    """One input model and its parameters (`settings`: weight, density, ... by internal name). In a
    loaded config a setting may still be a gradient list or filter entries; in a `for_tensor` view
    every one is a plain value."""
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    domain: str | list[str] | None = None              # the task(s) it was fine-tuned on (dev splits, APL)
    layer_range: tuple[int, int] | None = None       # slices: this source's layers [start, end)


@dataclass
class SliceSpec:
    """One output slice: sources with equal layer counts, merged layer by layer."""
    sources: list[ModelSpec]               # every source, the base's included (its params are unused)
    base_model: str | None                 # the slice's base (its own or the config's)
    params: dict[str, Any] = field(default_factory=dict)   # global-scope settings given on the slice

    @property
    def n_layers(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a


@dataclass
class VocabSpec:
    """mergekit's `tokenizer:` / `tokenizer_source:`: the output vocabulary and how embedding rows
    are rebuilt for it."""
    source: str                            # "base" | "union" | a model ref
    tokens: dict[str, dict] = field(default_factory=dict)   # token -> {"source": ..., "force": bool}
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig(Settings):
    """What every merge has; its method's parameters are `settings` (by internal name, registry.PARAMS),
    read with `get` (`cfg.get("pcb_ratio")`; per model `cfg.models[i].get("density")`)."""
    base_model: str | None
    models: list[ModelSpec]
    merge_method: str | None = None
    prune: str = "none"
    amplify: str = "none"
    combine: str = "sum"
    settings: dict[str, Any] = field(default_factory=dict)   # global parameters, by internal name
    lambda_auto: bool = False           # `lambda: auto`: PCB's per-model lambda search runs first (search.py)
    search: dict | None = None          # the raw `search:` block, validated by search.parse_search
    dtype: str | None = None            # output dtype; None = the base's
    seed: int = 0
    tokenizer_source: str | None = None   # a model whose tokenizer files are copied (None: the base's)
    chat_template: str | None = None      # None = the tokenizer source's; else a Jinja template
    name: str | None = None
    notices: list[str] = field(default_factory=list)
    # --- layer stacking (`slices`; None = `models`, every layer)
    slices: list[SliceSpec] | None = None
    # --- tokenizer surgery (`tokenizer:` / `tokenizer_source:`; None = copy the base's files)
    vocab: VocabSpec | None = None
    # --- chat_template: auto (the most common template among the inputs, as mergekit picks it)
    auto_chat_template: bool = False
    # --- runtime: layer count for gradient positions (set by the engine; not part of the YAML)
    n_layers: int | None = field(default=None, compare=False, repr=False)

    @property
    def stages(self) -> tuple[str, str, str]:
        return self.prune, self.amplify, self.combine

    @property
    def method(self) -> Method | None:
        """The registry record of `merge_method` (None for explicit stages without a preset)."""
        return METHODS.get(self.merge_method) if self.merge_method else None

    @property
    def family(self) -> str:
        m = self.method
        return m.family if m is not None and m.family != "pipeline" else "pipeline"

    @property
    def upscale(self) -> str | None:
        """The upscaling method (smile) this config runs instead of a merge, else None."""
        return self.merge_method if self.family == "upscale" else None

    @property
    def apl_importance_kind(self) -> str:
        """"exact" or "gradient": what `apl_importance` resolves to at `apl_level`."""
        if self.get("apl_importance") != "auto":
            return self.get("apl_importance")
        return "gradient" if self.get("apl_level") == "row" else "exact"

    @property
    def method_name(self) -> str:
        if self.family != "pipeline":
            return self.merge_method
        if self.merge_method and PIPELINE_PRESETS.get(self.merge_method) == self.stages:
            return self.merge_method
        return "+".join(self.stages)

    @property
    def params(self) -> tuple[Param, ...]:
        """The parameters this config's method (or stage pipeline) uses, with its defaults."""
        m = self.method
        if self.family != "pipeline":
            return m.params
        # a preset's defaults hold even when a stage is overridden (ties + combine: sum normalizes)
        return stage_params(*self.stages, m.defaults if m is not None else None)

    @property
    def parents(self) -> list[str]:
        """Every model the merge reads, base first (for the model card)."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for s in self.slices or []:
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    # -------------------------------------------------------------------- per-tensor views

    def varying(self) -> list[str]:
        """Names of the parameters that are gradients or filters somewhere in this config."""
        out = {p.name for p in self.params if p.scope == "global" and not P.is_constant(self.get(p.name))}
        for m in self.models:
            out |= {p.name for p in self.params if p.scope == "model" and p.per_tensor
                    and not P.is_constant(m.get(p.name))}
        return sorted(out)

    def with_layers(self, n_layers: int) -> "MergeConfig":
        """This config knowing the model's layer count (for gradient positions t = i / (L - 1))."""
        self.n_layers = n_layers
        return self

    def for_tensor(self, name: str, t: float | None = None, source_names: list[str] | None = None) -> "MergeConfig":
        """The resolved view for tensor `name`: every parameter a plain value.

        `t`: the gradient position (default: from the name's layer index and `n_layers`).
        `source_names`: each model's tensor name, which its own filters see (slices rename layers);
        default `name`. Returns self when nothing varies. Raises ConfigError when a required value
        (slerp's t) has no entry for this tensor or a resolved value breaks a constraint."""
        varying = self.varying()
        if not varying:
            return self
        if t is None:
            layer = P.layer_of(name)
            if layer is not None and self.n_layers is None:
                raise ValueError(f"config has per-layer gradients ({', '.join(varying)}): give t or call "
                                 f"cfg.with_layers(n_layers) before resolving {name!r}")
            t = P.layer_t(layer, self.n_layers or 1)
        g = {}
        for p in self.params:
            if p.scope == "global" and p.name in varying:
                g[p.name] = _resolve(self.get(p.name), p, name, t)
        models = []
        for i, m in enumerate(self.models):
            own = source_names[i] if source_names else name
            vals = {p.name: _resolve(m.get(p.name), p, own, t) for p in self.params
                    if p.scope == "model" and p.per_tensor and not P.is_constant(m.get(p.name))}
            models.append(m.with_settings(vals) if vals else m)
        view = replace(self, models=models, notices=self.notices, settings={**self.settings, **g})
        _check_view(view, name)
        return view

    # -------------------------------------------------------------------- YAML

    def to_dict(self) -> dict:
        """A plain dict that `load_config` turns back into this config (every value explicit, in
        mergekit's spelling where mergekit has the key)."""
        d: dict[str, Any] = {}
        if self.name is not None:
            d["name"] = self.name
        if self.merge_method:
            d["merge_method"] = self.merge_method
        if self.family == "pipeline":
            d.update(prune=self.prune, amplify=self.amplify, combine=self.combine)
        if self.base_model is not None:
            d["base_model"] = self.base_model
        params = self.params
        model_params = [p for p in params if p.scope == "model"]
        shared_rescale = None
        if any(p.key == "rescale" for p in model_params):
            values = {m.get("rescale") for m in (self.models or [s for sl in self.slices or [] for s in sl.sources])}
            if len(values) == 1:
                shared_rescale = values.pop()

        def model_entry(m: ModelSpec, base: bool = False) -> dict:
            entry: dict[str, Any] = {"model": m.model}
            if m.layer_range is not None:
                entry["layer_range"] = list(m.layer_range)
            p: dict[str, Any] = {}
            if not base:
                for prm in model_params:
                    v = m.get(prm.name)
                    if prm.key == "rescale":
                        if shared_rescale is None:
                            p["rescale"] = _rescale_out(v)
                    elif prm.key in ("partitions", "amplification"):
                        if v is not None:
                            p[prm.key] = v if isinstance(v, str) else list(v)
                    elif prm.key in ("domain", "scale", "apl_data"):
                        if v is not None:
                            p[prm.key] = v
                    else:
                        p[prm.key] = copy.deepcopy(v)
            if p:
                entry["parameters"] = p
            return entry

        g: dict[str, Any] = {}
        for prm in params:
            if prm.scope != "global":
                continue
            v = self.get(prm.name)
            if prm.key == "int8_mask" and not v:
                continue
            if v is None:
                continue
            g[prm.key] = copy.deepcopy(v)
        if shared_rescale is not None:
            g["rescale"] = _rescale_out(shared_rescale)
        if self.lambda_auto:
            g["lambda"] = "auto"
        if self.upscale and self.get("rank_of_expert") is None:
            g["rank_of_expert"] = "full"
        if self.slices is not None:
            d["slices"] = []
            for s in self.slices:
                sd: dict[str, Any] = {"sources": [model_entry(src, base=src.model == s.base_model)
                                                  for src in s.sources]}
                if s.base_model is not None and s.base_model != self.base_model:
                    sd["base_model"] = s.base_model
                if s.params:
                    sd["parameters"] = copy.deepcopy(s.params)
                d["slices"].append(sd)
        else:
            d["models"] = [model_entry(m) for m in self.models]
        if g:
            d["parameters"] = g
        if self.dtype:
            d["dtype"] = self.dtype
        d["seed"] = self.seed
        if self.vocab is not None:
            tok: dict[str, Any] = {"source": self.vocab.source}
            if self.vocab.tokens:
                tok["tokens"] = copy.deepcopy(self.vocab.tokens)
            if self.vocab.pad_to_multiple_of:
                tok["pad_to_multiple_of"] = self.vocab.pad_to_multiple_of
            d["tokenizer"] = tok
        elif self.tokenizer_source is not None:
            d["tokenizer_source"] = self.tokenizer_source
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        elif self.auto_chat_template:
            d["chat_template"] = "auto"
        if self.search is not None:
            d["search"] = copy.deepcopy(self.search)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


@dataclass
class MergeStage:
    """One document of a multi-stage config: its name (None = the final merge) and config."""
    name: str | None
    config: MergeConfig
    depends: list[str] = field(default_factory=list)     # earlier stages it reads, by name


def rename_refs(cfg: MergeConfig, mapping: dict[str, str]) -> MergeConfig:
    """A copy of `cfg` with model refs renamed (MODEL or the MODEL part of MODEL+ADAPTER): how a
    multi-stage merge points a later stage at an earlier one's output folder."""
    def ren(r):
        if r is None:
            return None
        model, plus, lora = r.partition("+")
        return mapping.get(model, model) + plus + lora
    out = copy.deepcopy(cfg)
    out.base_model = ren(out.base_model)
    for m in out.models:
        m.model = ren(m.model)
    for s in out.slices or []:
        s.base_model = ren(s.base_model)
        for x in s.sources:
            x.model = ren(x.model)
    out.tokenizer_source = ren(out.tokenizer_source)
    if out.vocab is not None and out.vocab.source not in ("base", "union"):
        out.vocab.source = ren(out.vocab.source)
    return out


def _rescale_out(v: str):
    return {"l1": True, "none": False}.get(v, v)


def _resolve(setting, p: Param, name: str, t: float):
    v = P.evaluate(setting, name, t)
    if v is None:
        if p.required:
            raise ConfigError(f"`{p.key}` has no value for tensor {name}: no `filter` entry matches it; "
                              f"add a last entry without `filter` (the value for every other tensor)")
        v = p.default
    if p.kind == "int" and v is not None:
        if abs(v - round(v)) > 1e-9:
            raise ConfigError(f"`{p.key}` resolves to {v:g} at tensor {name}; it must be a whole number there")
        v = int(round(v))
    return v


def _check_view(cfg: MergeConfig, name: str) -> None:
    """Constraints between resolved values of one tensor (the constant case is checked at load)."""
    for i, m in enumerate(cfg.models):
        _check_prune_values(cfg.prune, m, f"models[{i}] ({m.model}) at tensor {name}")


def _check_prune_values(prune: str, m: ModelSpec, where: str) -> None:
    if prune == "breadcrumbs" and m.get("density") < 1 and m.get("density") + m.get("gamma") > 1 + 1e-12:
        raise ConfigError(f"`{where}`: breadcrumbs needs density + gamma <= 1 (the kept band plus the dropped "
                          f"outliers), got density {m.get('density'):g} + gamma {m.get('gamma'):g}; lower one of them")
    if prune == "della" and m.get("density") < 1 and not (0 < m.get("density") - m.get("della_epsilon") and m.get("density") + m.get("della_epsilon") < 1):
        raise ConfigError(f"`{where}`: della needs density - epsilon > 0 and density + epsilon < 1 (keep "
                          f"probabilities), got density {m.get('density'):g}, epsilon {m.get('della_epsilon'):g}; lower epsilon")


# ----------------------------------------------------------------------------- parsing helpers

def _num(value, key: str, *, lo=None, hi=None, lo_open=False, integer=False) -> float:
    """One number for the whole merge (no gradient), read and bounds-checked as params reads one."""
    if isinstance(value, (list, dict)):
        raise ConfigError(f"`{key}` is one value for the whole merge; it cannot be a gradient list or "
                          f"filter entries ({value!r})")
    try:
        return P.check_scalar(value, Param(key, "int" if integer else "float", None, "", lo=lo, hi=hi,
                                           lo_open=lo_open), key)
    except P.SettingError as e:
        raise ConfigError(str(e)) from None


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{key}` must be true or false, got {value!r}")
    return value


def _choice(value, key: str, options) -> str:
    if value not in options:
        raise ConfigError(f"`{key}` = {value!r} is not one of {', '.join(options)}")
    return value


def _rescale(value, key: str) -> str:
    # mergekit's `rescale: true` rescales to the L1 norm; false = none; "paper" = DARE's 1/density
    # (DELLA's 1/p per entry).
    if value is True:
        return "l1"
    if value is False:
        return "none"
    if isinstance(value, (list, dict)):
        raise ConfigError(f"`{key}` is one value per model; it cannot be a gradient or filters")
    return _choice(value, key, ("l1", "none", "paper"))


def _floats(value, key: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"`{key}` must be a non-empty list of numbers, got {value!r}")
    return [_num(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _ref(value, key: str, notices: list[str] | None = None) -> str:
    """A model reference: path, hub id[@rev], demo:NAME, MODEL+LORA, or mergekit's mapping
    {model, lora, override_architecture}. Returned as one string (MODEL or MODEL+LORA)."""
    if isinstance(value, dict):
        extra = set(value) - {"model", "lora", "override_architecture"}
        if extra or "model" not in value:
            raise ConfigError(f"`{key}`: a model mapping has `model` and optionally `lora` (and "
                              f"`override_architecture`), got keys {', '.join(sorted(value))}")
        if value.get("override_architecture") and notices is not None:
            notices.append(f"`{key}.override_architecture` only picks mergekit's architecture table; "
                           f"ignored here (tensors are matched by name)")
        model = value["model"]
        if isinstance(model, dict):     # mergekit's dumped form {path, revision}
            model = model.get("path", "") + (f"@{model['revision']}" if model.get("revision") else "")
        lora = value.get("lora")
        if isinstance(lora, dict):
            lora = lora.get("path", "") + (f"@{lora['revision']}" if lora.get("revision") else "")
        value = f"{model}+{lora}" if lora else model
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be a model path, hub id or demo:NAME, got {value!r}")
    value = value.strip()
    if value.count("+") > 1 or value.startswith("+") or value.endswith("+"):
        raise ConfigError(f"`{key}` = {value!r}: write a LoRA reference as MODEL+ADAPTER (one `+`)")
    return value


def _read(source) -> dict:
    docs = read_documents(source)
    if len(docs) != 1:
        raise ConfigError(f"this config has {len(docs)} YAML documents (a multi-stage merge, as "
                          f"mergekit-multimerge runs): load it with load_stages, or run it with "
                          f"`python -m dppa_ui merge FILE --out DIR`")
    return docs[0]


def read_documents(source) -> list[dict]:
    if isinstance(source, MergeConfig):
        return [source.to_dict()]
    if isinstance(source, dict):
        return [copy.deepcopy(source)]
    if isinstance(source, (list, tuple)) and all(isinstance(d, dict) for d in source):
        return copy.deepcopy(list(source))
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    elif isinstance(source, str):
        text = source
    else:
        raise ConfigError(f"a config must be a dict, YAML text or a .yaml path, got {type(source).__name__}")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"the config is not valid YAML{where}: {problem}") from None
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise ConfigError("the config must be a YAML mapping with at least `merge_method`, `base_model` and `models`")
    return docs


# ----------------------------------------------------------------------------- load

def load_config(source) -> MergeConfig:
    """Parse and validate a config (dict, YAML text, or path). Raises ConfigError naming the problem."""
    try:
        return _load(_read(source))
    except P.SettingError as e:
        raise ConfigError(str(e)) from None


def load_stages(source) -> list[MergeStage]:
    """A multi-stage config (several YAML documents, mergekit-multimerge's format): each document a
    merge, `name:` naming its output; a later stage uses an earlier one by giving its name as a
    model. Returned in an order where every stage follows the stages it reads; the unnamed
    document (at most one) is the final merge, else the last document is. One document = one stage."""
    docs = read_documents(source)
    stages, names = [], set()
    for i, d in enumerate(docs):
        try:
            cfg = _load(d)
        except P.SettingError as e:
            raise ConfigError(f"document {i + 1}: {e}") from None
        except ConfigError as e:
            label = f" ({d['name']})" if d.get("name") else ""
            raise ConfigError(f"document {i + 1}{label}: {e}") from None
        if cfg.name is not None:
            if not isinstance(cfg.name, str) or not cfg.name.strip():
                raise ConfigError(f"document {i + 1}: `name` must be text, got {cfg.name!r}")
            if cfg.name in names:
                raise ConfigError(f"two documents are named {cfg.name!r}; stage names must be unique")
            names.add(cfg.name)
        stages.append(MergeStage(cfg.name, cfg))
    if sum(s.name is None for s in stages) > 1 and len(stages) > 1:
        raise ConfigError("more than one document has no `name`; only the final merge may be unnamed")
    for s in stages:
        s.depends = [r for r in s.config.parents if r in names and r != s.name]
        if s.name in s.config.parents:
            raise ConfigError(f"stage {s.name!r} uses its own output as an input")
    # order: depth-first so every stage follows its inputs; refuse cycles
    by_name = {s.name: s for s in stages if s.name is not None}
    done, order, visiting = set(), [], set()

    def visit(s: MergeStage):
        key = s.name if s.name is not None else id(s)
        if key in done:
            return
        if key in visiting:
            raise ConfigError(f"stages depend on each other in a cycle (through {s.name!r})")
        visiting.add(key)
        for dep in s.depends:
            visit(by_name[dep])
        visiting.discard(key)
        done.add(key)
        order.append(s)
    final = next((s for s in stages if s.name is None), stages[-1])
    for s in stages:
        if s is not final:
            visit(s)
    visit(final)
    return order


def _method_and_stages(data: dict) -> tuple[str | None, Method | None, tuple[str, str, str]]:
    method = data.get("merge_method")
    m = None
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown merge_method `{method}`; supported: {', '.join(METHODS)} "
                              f"(or explicit prune/amplify/combine stages)")
        m = METHODS[method]
        stages = m.stages or ("none", "none", "sum")
        if m.stages is None:
            for k in ("prune", "amplify", "combine"):
                if k in data:
                    raise ConfigError(f"`{k}` is a pipeline stage; merge_method `{method}` is an {m.family} "
                                      f"method without stages: drop `{k}` or use a pipeline method")
    elif not any(k in data for k in ("prune", "amplify", "combine")):
        raise ConfigError(f"the config needs `merge_method` (one of {', '.join(METHODS)}) or explicit "
                          f"`prune`/`amplify`/`combine` stages")
    else:
        stages = ("none", "none", "sum")
    if m is None or m.stages is not None:
        stages = (_choice(data.get("prune", stages[0]), "prune", PRUNES),
                  _choice(data.get("amplify", stages[1]), "amplify", AMPLIFIES),
                  _choice(data.get("combine", stages[2]), "combine", COMBINES))
    if stages[1] == "dpa" and stages[0] == "none":
        raise ConfigError("amplify `dpa` needs a prune stage (its bands are magnitude ranks of the kept "
                          "entries), got prune `none`")
    return method, m, stages


def _unwrap_modules(data: dict, notices: list[str]) -> dict:
    mods = data.pop("modules")
    if not isinstance(mods, dict) or not mods:
        raise ConfigError("`modules` must map a module name to its `models` or `slices`")
    if len(mods) > 1:
        raise ConfigError(f"`modules` lists {len(mods)} modules ({', '.join(mods)}); multi-module models "
                          f"(vision-language) are not supported: merge the text model with `models` or `slices`")
    (name, mod), = mods.items()
    if not isinstance(mod, dict):
        raise ConfigError(f"`modules.{name}` must be a mapping with `models` or `slices`")
    extra = set(mod) - {"models", "slices", "parameters"}
    if extra:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(extra))} in `modules.{name}`; known: models, slices, "
                          f"parameters")
    for k in ("models", "slices"):
        if k in mod:
            if k in data:
                raise ConfigError(f"`{k}` is given both at the top and in `modules.{name}`")
            data[k] = mod[k]
    if mod.get("parameters"):
        # a module's parameters sit between the slice's and the config's in mergekit's precedence
        top = data.get("parameters") or {}
        if not isinstance(top, dict) or not isinstance(mod["parameters"], dict):
            raise ConfigError("`parameters` must be a mapping")
        merged = dict(top)
        for k, v in mod["parameters"].items():
            merged[k] = P.fold(v, top.get(k)) if k in top and isinstance(v, (list, dict)) else v
        data["parameters"] = merged
    notices.append(f"`modules.{name}` read as the model's only module")
    return data


def _load(data: dict) -> MergeConfig:
    notices: list[str] = []
    data = dict(data)
    if "modules" in data:
        data = _unwrap_modules(data, notices)
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key `{key}`; known keys: {', '.join(sorted(TOP_KEYS))}")
    method, mrec, (prune, amplify, combine) = _method_and_stages(data)
    family = mrec.family if mrec is not None and mrec.stages is None else "pipeline"

    base = _ref(data["base_model"], "base_model", notices) if data.get("base_model") is not None else None
    if base is None and family == "pipeline":
        raise ConfigError("`base_model` is required: the model the fine-tunes were trained from (the deltas "
                          "are taken from it)")
    if base is None and mrec is not None and mrec.base == "required":
        raise ConfigError(f"`base_model` is required for {method}: {mrec.doc}")

    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"`parameters` must be a mapping, got {params!r}")
    lambda_auto = params.get("lambda") == "auto"
    if lambda_auto:          # PCB's lambda search fills the weights; the merge's lambda stays 1
        params = {k: v for k, v in params.items() if k != "lambda"}
    cfg = MergeConfig(base_model=base, models=[], merge_method=method, prune=prune, amplify=amplify,
                      combine=combine, seed=_num(data.get("seed", 0), "seed", lo=0, integer=True),
                      name=data.get("name"), notices=notices, lambda_auto=lambda_auto)
    plist = cfg.params
    model_keys = {p.key for p in plist if p.scope == "model"}
    global_keys = {p.key for p in plist if p.scope == "global"}
    label = method or "+".join(cfg.stages)

    def check_keys(d: dict, where: str, allowed: set, per_model: bool):
        for key in d:
            if key in allowed:
                continue
            if per_model and key in global_keys:
                notices.append(f"`{where}.{key}` is one value for the whole merge in {label}; ignored under a "
                               f"model (as mergekit does): set it under `parameters`")
            elif key in ("partitions", "amplification"):
                notices.append("`partitions`/`amplification` are ignored: this pipeline has no dpa amplify stage")
            elif key in _ALL_PARAM_KEYS:
                notices.append(f"`{where}.{key}` is not a parameter of {label}; ignored (as mergekit does)")
            else:
                known = sorted(allowed)
                raise ConfigError(f"unknown key `{where}.{key}`; {label} takes: {', '.join(known) or 'none'}")

    check_keys(params, "parameters", model_keys | global_keys, per_model=False)
    if params.get("int8_mask") is not None:
        _bool(params["int8_mask"], "parameters.int8_mask")
        if "int8_mask" in global_keys:
            notices.append("`int8_mask` only saves memory in mergekit; masks here are float already, so it is ignored")

    # Output dtype: mergekit's out_dtype wins over dtype; default = the base's.
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            cfg.dtype = DTYPES.get(str(data[key]).lower()) or _choice(data[key], key, tuple(DTYPES))
    _load_tokenizer(cfg, data, notices)
    ct = data.get("chat_template")
    if ct is not None:
        if not isinstance(ct, str):
            raise ConfigError(f"`chat_template` must be `auto`, `chatml` or a Jinja template, got {ct!r}")
        if ct in NAMED_CHAT_TEMPLATES:
            cfg.chat_template = NAMED_CHAT_TEMPLATES[ct]
        elif ct == "auto":
            cfg.chat_template, cfg.auto_chat_template = None, True
        elif "{{" in ct or "{%" in ct:
            cfg.chat_template = ct
        else:
            raise ConfigError(f"chat_template {ct!r} is neither `auto`, a named template "
                              f"({', '.join(NAMED_CHAT_TEMPLATES)}) nor a Jinja template")

    top_global = {p.key: P.parse_setting(params[p.key], p, f"parameters.{p.key}")
                  for p in plist if p.scope == "global" and p.key in params and p.kind not in ("rescale",)}
    for p in plist:
        if p.scope == "global":
            v = top_global.get(p.key)
            cfg.settings[p.name] = (None if p.required else p.default) if v is None else v

    if "slices" in data and "models" in data:
        raise ConfigError("give either `models` (whole models) or `slices` (layer ranges), not both")
    if "slices" in data:
        _load_slices(cfg, data["slices"], params, top_global, plist, check_keys, label)
    else:
        _load_models(cfg, data.get("models"), params, plist, check_keys, label)
    if cfg.slices is None:
        _check_required(cfg, plist, "parameters", label)
    _validate_method(cfg, mrec, label)
    _validate_official(cfg, params, data, label)
    return cfg


def _apl_data(value, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be the path of a JSONL file of {{\"prompt\", \"answer\"}} lines, got {value!r}")
    return value.strip()


def _validate_official(cfg: MergeConfig, params: dict, data: dict, label: str) -> None:
    """Checks of the DPPA / PCB details (issue 8), APL and SMILE (issue 9) beyond one value's bounds."""
    if cfg.prune == "apl":
        if cfg.slices is not None:
            raise ConfigError(f"{label} measures each fine-tune's importance on whole models; it cannot run on "
                              f"`slices`: use `models`")
        if cfg.get("apl_level") == "row" and cfg.get("apl_importance") == "exact":
            raise ConfigError("`parameters.apl_importance` = exact at `apl_level: row` would need one forward pass "
                              "per row of every matrix; use `apl_importance: gradient` (or auto) for rows")
        for i, m in enumerate(cfg.models):
            if not P.is_constant(m.get("density")):
                raise ConfigError(f"`models[{i}]` ({m.model}): APL sets per-partition densities itself; give one "
                                  f"target `density`, not a gradient or filters")
    if cfg.upscale:
        if cfg.get("rank_of_expert") == "full":
            cfg.settings["rank_of_expert"] = None
        if cfg.get("num_experts_per_tok") > len(cfg.models):
            raise ConfigError(f"`parameters.num_experts_per_tok` = {cfg.get('num_experts_per_tok')} is more than the "
                              f"{len(cfg.models)} fine-tune(s) listed (one expert each); use at most "
                              f"{len(cfg.models)}")
    if cfg.get("alpha_start") is not None:
        start = _floats(cfg.get("alpha_start"), "parameters.alpha_start")
        if any(a < 0 for a in start):
            raise ConfigError(f"`parameters.alpha_start` {start} must be >= 0")
        for i, m in enumerate(cfg.models):
            if cfg.amplify == "dpa" and m.get("amplification") == "auto" and len(start) != len(m.get("partitions")):
                raise ConfigError(f"`parameters.alpha_start` has {len(start)} values but models[{i}] has "
                                  f"{len(m.get('partitions'))} partitions")
        cfg.settings["alpha_start"] = start
    if data.get("search") is not None:      # kept as written: whoever runs it validates it (search.parse_search)
        cfg.search = copy.deepcopy(data["search"])


def _model_spec(ref: str, own: dict, where: str, params: dict, slice_params: dict | None, plist, amplify: str,
                layer_range=None, domain=None) -> ModelSpec:
    spec = ModelSpec(model=ref, layer_range=layer_range)
    for p in plist:
        if p.scope != "model":
            continue
        if p.kind == "rescale":
            raw = own.get("rescale", (slice_params or {}).get("rescale", params.get("rescale")))
            spec.settings["rescale"] = p.default if raw is None else _rescale(raw, f"{where}.parameters.rescale"
                                                                  if "rescale" in own else "parameters.rescale")
            continue
        if p.key in ("partitions", "amplification", "domain"):
            continue
        if p.key == "apl_data":
            raw = own.get("apl_data", params.get("apl_data"))
            spec.settings["apl_data"] = _apl_data(raw, f"{where}.parameters.apl_data")
            continue
        scopes = [P.parse_setting(d[p.key], p, w) if d is not None and p.key in d else None
                  for d, w in ((own, f"{where}.parameters.{p.key}"),
                               (slice_params, f"slice parameters.{p.key}"),
                               (params, f"parameters.{p.key}"))]
        v = P.fold(*scopes)
        spec.settings[p.name] = p.default if v is None else v
    spec.domain = own.get("domain", domain)
    if amplify == "dpa":
        _load_dpa(spec, own, params, where)
    return spec


def _load_dpa(spec: ModelSpec, own: dict, params: dict, where: str) -> None:
    if not P.is_constant(spec.get("density")):
        raise ConfigError(f"`{where}`: `density` cannot be a gradient or filters with amplify dpa (its "
                          f"partitions end at the density); give one density")
    parts = own.get("partitions", params.get("partitions"))
    parts = [spec.get("density") / 2, spec.get("density")] if parts is None else _floats(parts, f"{where}.parameters.partitions")
    if any(b <= a for a, b in zip(parts, parts[1:])) or parts[0] <= 0:
        raise ConfigError(f"`{where}` partitions {parts} must be positive and strictly ascending")
    if not math.isclose(parts[-1], spec.get("density"), rel_tol=0, abs_tol=1e-9):
        raise ConfigError(f"`{where}` partitions {parts} must end at the model's density {spec.get('density')}")
    if len(parts) > 3:
        raise ConfigError(f"`{where}` has {len(parts)} partitions; at most 3 are supported")
    amp = own.get("amplification", params.get("amplification"))
    if amp is None:
        amp = [1.8] + [1.0] * (len(parts) - 1)
    elif amp == "auto":
        pass
    else:
        amp = _floats(amp, f"{where}.parameters.amplification")
        if len(amp) != len(parts):
            raise ConfigError(f"`{where}` has {len(amp)} amplification factors for {len(parts)} partitions")
        if any(a < 0 for a in amp):
            raise ConfigError(f"`{where}` amplification {amp} must be >= 0")
    spec.settings["partitions"], spec.settings["amplification"] = parts, amp


def _load_models(cfg: MergeConfig, items, params: dict, plist, check_keys, label: str) -> None:
    if not isinstance(items, list) or not items:
        raise ConfigError("`models` must list at least one model (`- model: PATH`)")
    family = cfg.family
    keep_base = family != "pipeline" and (cfg.method.base in ("input", "none"))
    seen = set()
    for i, item in enumerate(items):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise ConfigError(f"`{where}` must be a mapping with a `model:` key, got {item!r}")
        ref, own = _entry(item, where, MODEL_ENTRY_KEYS, cfg, plist, check_keys,
                          " (layer ranges go under `slices`)" if "layer_range" in item else "")
        if ref in seen:
            raise ConfigError(f"`{where}`: {ref} is listed twice; list each model once")
        seen.add(ref)
        if ref == cfg.base_model and not keep_base:
            # mergekit YAMLs often list the base among the models; it is the origin, not an input.
            cfg.notices.append(f"{where} is the base model; it is the origin of the deltas, not one more input")
            continue
        cfg.models.append(_model_spec(ref, own, where, params, None, plist, cfg.amplify, domain=item.get("domain")))
    if keep_base and cfg.base_model is not None and cfg.base_model not in seen:
        if cfg.method.base == "none":
            raise ConfigError(f"passthrough copies one model per tensor; `base_model` {cfg.base_model} would be "
                              f"a second input: drop `base_model`, list only it, or stack layers with `slices`")
        # mergekit adds the base as one more input of methods that do not treat it specially.
        cfg.models.append(_model_spec(cfg.base_model, {}, "base_model", params, None, plist, cfg.amplify))
        cfg.notices.append(f"{label} treats base_model as one more input (as mergekit does); its parameters "
                           f"are the config's (`parameters:`)")
    if not cfg.models:
        raise ConfigError("`models` lists only the base model; add at least one fine-tuned model")
    if "partitions" in params or "amplification" in params:
        if cfg.amplify != "dpa" and not any("dpa" in n for n in cfg.notices):
            cfg.notices.append("`partitions`/`amplification` are ignored: this pipeline has no dpa amplify stage")


def _entry(item: dict, where: str, keys, cfg: MergeConfig, plist, check_keys, hint: str = "") -> tuple[str, dict]:
    """(model ref, its own parameters) of a `models` entry or a slice source, keys checked."""
    for key in item:
        if key not in keys:
            raise ConfigError(f"unknown key `{where}.{key}`; known: {', '.join(keys)}{hint}")
    ref = _ref(item["model"], f"{where}.model", cfg.notices)
    own = item.get("parameters") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"`{where}.parameters` must be a mapping, got {own!r}")
    check_keys(own, f"{where}.parameters", {p.key for p in plist if p.scope == "model"}, per_model=True)
    return ref, own


def _layer_range(value, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"`{where}` must be [start, end] (two layer numbers, end excluded), got {value!r}")
    a, b = value
    if a < 0 or b <= a:
        raise ConfigError(f"`{where}` = [{a}, {b}] is empty or reversed: give 0 <= start < end (end excluded)")
    return a, b


def _load_slices(cfg: MergeConfig, items, params: dict, top_global: dict, plist, check_keys, label: str) -> None:
    if not isinstance(items, list) or not items:
        raise ConfigError("`slices` must list at least one slice (`- sources: [{model: PATH, layer_range: [0, N]}]`)")
    if cfg.prune == "dp" or (cfg.combine == "pcb" and cfg.get("pcb_scope") == "model" and "scope" in params):
        raise ConfigError(f"{label} needs whole-model statistics (DP outlier ratios / PCB model scope); it "
                          f"cannot run on `slices`: use `models`" + (", or `scope: tensor`" if cfg.prune != "dp" else ""))
    if cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":     # the default: a stack of slices has no one task vector
        cfg.settings["pcb_scope"] = "tensor"
        cfg.notices.append("PCB on `slices` runs at scope tensor (each tensor's own statistics): the official "
                           "whole-model flattening needs `models`")
    cfg.slices = []
    for k, s in enumerate(items):
        where = f"slices[{k}]"
        if not isinstance(s, dict) or "sources" not in s:
            raise ConfigError(f"`{where}` must be a mapping with `sources:`")
        for key in s:
            if key not in SLICE_KEYS:
                raise ConfigError(f"unknown key `{where}.{key}`; known: {', '.join(SLICE_KEYS)}")
        if s.get("residual_weight") is not None:
            cfg.notices.append(f"`{where}.residual_weight` is unused by mergekit too; ignored")
        sp = s.get("parameters") or {}
        if not isinstance(sp, dict):
            raise ConfigError(f"`{where}.parameters` must be a mapping")
        check_keys(sp, f"{where}.parameters", {p.key for p in plist}, per_model=False)
        slice_base = _ref(s["base_model"], f"{where}.base_model", cfg.notices) if s.get("base_model") else cfg.base_model
        srcs = s["sources"]
        if not isinstance(srcs, list) or not srcs:
            raise ConfigError(f"`{where}.sources` must list at least one source (model + layer_range)")
        spec = SliceSpec(sources=[], base_model=slice_base)
        for j, src in enumerate(srcs):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"`{w}` needs `model` and `layer_range`")
            ref, own = _entry(src, w, SOURCE_KEYS, cfg, plist, check_keys)
            spec.sources.append(_model_spec(ref, own, w, params, sp, plist, cfg.amplify,
                                            layer_range=_layer_range(src["layer_range"], f"{w}.layer_range")))
        lengths = {x.layer_range[1] - x.layer_range[0] for x in spec.sources}
        if len(lengths) > 1:
            raise ConfigError(f"`{where}`: every source of a slice needs the same number of layers, got "
                              + ", ".join(f"{x.model} {list(x.layer_range)}" for x in spec.sources))
        if len({x.model for x in spec.sources}) != len(spec.sources):
            raise ConfigError(f"`{where}` lists a model twice; each source of a slice is a different model")
        for p in plist:
            if p.scope == "global" and p.key in sp and p.kind != "rescale":
                spec.params[p.key] = P.parse_setting(sp[p.key], p, f"{where}.parameters.{p.key}")
        if cfg.combine == "pcb" and spec.params.get("scope") == "model":
            raise ConfigError(f"`{where}.parameters.scope` = model: PCB's whole-model statistics cannot run on "
                              f"`slices`; use `models`, or `scope: tensor`")
        cfg.slices.append(spec)
        _validate_inputs(cfg, spec.base_model, [x.model for x in spec.sources], where, label, slices=True)
        view = slice_view(cfg, k)
        _check_required(view, plist, f"{where}.parameters", label)
        for x in view.models:
            _check_constant_prune(cfg.prune, x, f"{where} {x.model}")


def slice_view(cfg: MergeConfig, k: int) -> MergeConfig:
    """Slice k of a slices config as a config of its own: models = its non-base sources, global
    parameters folded slice over config (mergekit's precedence)."""
    s = cfg.slices[k]
    keep_base = cfg.family != "pipeline" and cfg.method.base in ("input", "none")
    models = [x for x in s.sources if keep_base or x.model != s.base_model]
    g = {}
    for p in cfg.params:
        if p.scope == "global" and p.key in s.params:
            g[p.name] = P.fold(s.params[p.key], cfg.get(p.name))
    return replace(cfg, models=models, base_model=s.base_model, slices=None, settings={**cfg.settings, **g})


def _validate_inputs(cfg: MergeConfig, base: str | None, refs: list[str], where: str, label: str,
                     slices: bool = False) -> None:
    """mergekit's input contract of the method: the base's role and how many models it takes."""
    m = cfg.method
    policy = m.base if m is not None and m.stages is None else "required"
    others = [r for r in refs if r != base] if policy in ("required", "optional") else refs
    if policy == "required" and base is None:
        raise ConfigError(f"{label} needs a `base_model`")
    if slices and policy in ("required", "optional") and base is not None and base not in refs:
        raise ConfigError(f"`{where}`: {label} needs the base model {base} among the slice's sources (with its "
                          f"layer_range)")
    lo = m.min_models if m is not None and m.stages is None else 1
    hi = m.max_models if m is not None and m.stages is None else None
    what = "model besides the base" if policy in ("required", "optional") else "input"
    if len(others) < lo or (hi is not None and len(others) > hi):
        need = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        extra = ""
        if cfg.merge_method == "slerp":
            extra = " (slerp interpolates the base and one other model)"
        elif cfg.merge_method == "passthrough":
            extra = " (passthrough copies one model: use `slices` to stack layers of several)"
        raise ConfigError(f"`{where}`: {label} takes {need} {what}{'s' if lo != 1 or hi != 1 else ''}, got "
                          f"{len(others)} ({', '.join(others) or 'none'}){extra}")


def _check_constant_prune(prune: str, m: ModelSpec, where: str) -> None:
    """Prune constraints on constant values here; varying ones are checked per tensor (for_tensor),
    which the engine does for every tensor before reading any."""
    if prune in ("breadcrumbs", "della") and P.is_constant(m.get("density")) and P.is_constant(
            m.get("gamma") if prune == "breadcrumbs" else m.get("della_epsilon")):
        _check_prune_values(prune, m, where)


def _check_required(cfg: MergeConfig, plist, where: str, label: str) -> None:
    for p in plist:
        if p.scope == "global" and p.required and cfg.get(p.name) is None:
            raise ConfigError(f"{label} without `{where}.{p.key}` is not supported: give it ({p.doc})")


def _validate_method(cfg: MergeConfig, mrec: Method | None, label: str) -> None:
    if cfg.slices is None:
        refs = [m.model for m in cfg.models]
        if cfg.family == "pipeline" or mrec.base in ("required", "optional"):
            refs = refs + ([cfg.base_model] if cfg.base_model else [])
        _validate_inputs(cfg, cfg.base_model, refs, "models", label)
        for i, m in enumerate(cfg.models):
            _check_constant_prune(cfg.prune, m, f"models[{i}] ({m.model})")
    if cfg.family == "pipeline":
        if cfg.combine == "pcb" and cfg.get("pcb_scope") == "model" and not P.is_constant(cfg.get("pcb_ratio")):
            raise ConfigError("`parameters.pcb_ratio` must be one number at `scope: model` (the default: one cut "
                              "over the whole model, as the official code makes it); give one value, or "
                              "`scope: tensor` for a ratio per tensor")
        if cfg.prune == "dp":
            for i, m in enumerate(cfg.models):
                if not P.is_constant(m.get("density")):
                    raise ConfigError(f"`models[{i}]` ({m.model}): DP sets per-layer densities itself; give one "
                                      f"target `density`, not a gradient or filters")
        if cfg.prune != "none" and cfg.prune != "dp":
            for i, m in enumerate(cfg.models + [x for s in cfg.slices or [] for x in s.sources]):
                if m.get("rescale") == "paper" and cfg.prune in ("magnitude", "breadcrumbs"):
                    raise ConfigError(f"`rescale: paper` (1/density) belongs to random drops (DARE, DELLA); "
                                      f"{cfg.prune} pruning keeps values or rescales to the L1 norm (true)")
        return
    name = cfg.merge_method
    if name in ("slerp", "nearswap"):
        for v in P.anchors(cfg.get("t")) + [v for s in cfg.slices or [] for v in P.anchors(s.params.get("t", 0.5))]:
            if name == "slerp" and not 0 <= v <= 1:
                cfg.notices.append(f"slerp t = {v:g} is outside [0, 1]: it extrapolates beyond the "
                                   f"{'base' if v < 0 else 'other model'}")
                break
    if name == "linear" and P.is_constant(cfg.get("normalize")) and cfg.get("normalize"):
        ws = [m.get("weight") for m in cfg.models]
        if all(P.is_constant(w) for w in ws) and abs(sum(ws)) < 1e-12:
            raise ConfigError(f"linear with normalize divides by the sum of the weights, and {ws} sums to 0: "
                              f"change a weight or set `normalize: false`")


def _load_tokenizer(cfg: MergeConfig, data: dict, notices: list[str]) -> None:
    if "tokenizer" in data and "tokenizer_source" in data:
        raise ConfigError("give either `tokenizer_source` or `tokenizer: {source: ...}`, not both (as mergekit)")
    if data.get("tokenizer_source") is not None:
        src, tokens, pad = data["tokenizer_source"], {}, None
        where = "tokenizer_source"
    elif data.get("tokenizer") is not None:
        t = data["tokenizer"]
        if not isinstance(t, dict):
            raise ConfigError(f"`tokenizer` must be a mapping ({', '.join(TOKENIZER_KEYS)}), got {t!r}")
        extra = set(t) - set(TOKENIZER_KEYS)
        if extra:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(extra))} in `tokenizer`; known: "
                              f"{', '.join(TOKENIZER_KEYS)}")
        src = t.get("source", "union")       # mergekit's default
        tokens = t.get("tokens") or {}
        pad = t.get("pad_to_multiple_of")
        where = "tokenizer.source"
        if pad is not None:
            pad = _num(pad, "tokenizer.pad_to_multiple_of", lo=1, integer=True)
        if not isinstance(tokens, dict):
            raise ConfigError("`tokenizer.tokens` must map token text to {source: ..., force: ...}")
        tokens = {str(k): _token_cfg(v, f"tokenizer.tokens[{k!r}]", notices) for k, v in tokens.items()}
    else:
        return
    if src not in ("base", "union"):
        src = _ref(src, where, notices)
        cfg.tokenizer_source = src
    cfg.vocab = VocabSpec(source=src, tokens=tokens, pad_to_multiple_of=pad)


def _token_cfg(v, where: str, notices) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"`{where}` must be a mapping with `source` (a model, {{kind: model_token, model, "
                          f"token | token_id}} or {{kind: zero}}) and optionally `force`")
    extra = set(v) - set(TOKEN_KEYS)
    if extra:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(extra))} in `{where}`; known: source, force")
    out: dict[str, Any] = {"force": _bool(v.get("force", False), f"{where}.force")}
    s = v.get("source")
    if s is None:
        out["source"] = None
    elif isinstance(s, dict) and "kind" in s:
        if s["kind"] == "zero":
            if set(s) != {"kind"}:
                raise ConfigError(f"`{where}.source` of kind zero takes no other keys")
            out["source"] = {"kind": "zero"}
        elif s["kind"] == "model_token":
            extra = set(s) - {"kind", "model", "token", "token_id"}
            if extra or "model" not in s:
                raise ConfigError(f"`{where}.source` of kind model_token needs `model` and one of `token` / "
                                  f"`token_id`")
            if ("token" in s) == ("token_id" in s):
                raise ConfigError(f"`{where}.source`: give exactly one of `token` and `token_id`")
            d = {"kind": "model_token", "model": _ref(s["model"], f"{where}.source.model", notices)}
            if "token_id" in s:
                d["token_id"] = _num(s["token_id"], f"{where}.source.token_id", lo=0, integer=True)
            else:
                if not isinstance(s["token"], str):
                    raise ConfigError(f"`{where}.source.token` must be text")
                d["token"] = s["token"]
            out["source"] = d
        else:
            raise ConfigError(f"`{where}.source.kind` = {s['kind']!r} is not one of model_token, zero")
    else:
        out["source"] = _ref(s, f"{where}.source", notices)
    return out


