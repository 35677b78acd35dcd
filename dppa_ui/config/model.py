"""The config model: what every merge has (base, models, method / stages, slices, tokenizer, dtype,
seed) and its method's parameters as settings by internal name (registry.PARAMS), read with
`get`. A loaded setting may still be a gradient list or `filter` entries (params.py);
`MergeConfig.for_tensor(name, t)` is the resolved view for one tensor, whose every setting is a
plain value, so per-tensor code reads `cfg.models[i].get("density")` the same either way.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from .. import params as P
from ..registry import METHODS, PIPELINE_PRESETS, STAGES, Method, Param, default, stage_params

PRESET_INFO: dict[str, tuple[str, str]] = {n: (METHODS[n].doc, METHODS[n].paper) for n in PIPELINE_PRESETS}


UPSCALE_METHODS: dict[str, tuple[str, str]] = {n: (m.doc, m.paper) for n, m in METHODS.items() if m.family == "upscale"}


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


def check_stage(prune: str, m: ModelSpec, where: str) -> None:
    """The prune stage's own check of one model's resolved settings (its registry record's)."""
    check = STAGES["prune"][prune].check
    if check is not None:
        try:
            check(m, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None


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
        check_stage(cfg.prune, m, f"models[{i}] ({m.model}) at tensor {name}")
