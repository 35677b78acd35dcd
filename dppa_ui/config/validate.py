"""Loading and validating a merge config: mergekit 0.1.5's merge YAML, plus our own pipeline stages.

A merge is a method from `registry.METHODS`: a pipeline prune -> amplify -> combine on each
fine-tune's delta (`prune:` / `amplify:` / `combine:` override a preset's stages), an interpolation
on the weights, or passthrough layer stacking (`slices`). Every key mergekit's merge YAML has is
supported; everything is validated here, before any tensor is read, and every refusal names the
key or value and the fix. Each parameter's values are validated by its registry record
(params.parse_setting), a stage's cross-parameter constraints by the stage's own check. The
`search:` block is kept as written: whoever runs the config validates it (search.parse_search).
"""
from __future__ import annotations

import copy
import math

from .. import params as P
from ..registry import ALL_PARAM_KEYS, AMPLIFIES, COMBINES, METHODS, PRUNES, STAGES, Method
from .model import ConfigError, MergeConfig, MergeStage, ModelSpec, SliceSpec, VocabSpec, check_stage, slice_view
from .read import (DTYPE_ALIASES, NAMED_CHAT_TEMPLATES, apl_data_path, boolean, choice, floats, layer_range, model_ref,
                   number, read_documents, rescale_mode, single_document, token_entry)

TOP_KEYS = {"merge_method", "prune", "amplify", "combine", "base_model", "models", "parameters", "dtype",
            "out_dtype", "seed", "tokenizer_source", "tokenizer", "chat_template", "name",
            # layer stacking and mergekit's module wrapper
            "slices", "modules",
            "search"}   # the merge-parameter search block (dppa_ui/search.py)


MODEL_ENTRY_KEYS = ("model", "parameters", "domain")


SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")


SOURCE_KEYS = ("model", "layer_range", "parameters")


TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


def load_config(source) -> MergeConfig:
    """Parse and validate a config (dict, YAML text, or path). Raises ConfigError naming the problem."""
    try:
        return _load(single_document(source))
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
        stages = (choice(data.get("prune", stages[0]), "prune", PRUNES),
                  choice(data.get("amplify", stages[1]), "amplify", AMPLIFIES),
                  choice(data.get("combine", stages[2]), "combine", COMBINES))
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

    base = model_ref(data["base_model"], "base_model", notices) if data.get("base_model") is not None else None
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
                      combine=combine, seed=number(data.get("seed", 0), "seed", lo=0, integer=True),
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
            elif key in ALL_PARAM_KEYS:
                notices.append(f"`{where}.{key}` is not a parameter of {label}; ignored (as mergekit does)")
            else:
                known = sorted(allowed)
                raise ConfigError(f"unknown key `{where}.{key}`; {label} takes: {', '.join(known) or 'none'}")

    check_keys(params, "parameters", model_keys | global_keys, per_model=False)
    if params.get("int8_mask") is not None:
        boolean(params["int8_mask"], "parameters.int8_mask")
        if "int8_mask" in global_keys:
            notices.append("`int8_mask` only saves memory in mergekit; masks here are float already, so it is ignored")

    # Output dtype: mergekit's out_dtype wins over dtype; default = the base's.
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            cfg.dtype = DTYPE_ALIASES.get(str(data[key]).lower()) or choice(data[key], key, tuple(DTYPE_ALIASES))
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
        start = floats(cfg.get("alpha_start"), "parameters.alpha_start")
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
            spec.settings["rescale"] = p.default if raw is None else rescale_mode(raw, f"{where}.parameters.rescale"
                                                                  if "rescale" in own else "parameters.rescale")
            continue
        if p.key in ("partitions", "amplification", "domain"):
            continue
        if p.key == "apl_data":
            raw = own.get("apl_data", params.get("apl_data"))
            spec.settings["apl_data"] = apl_data_path(raw, f"{where}.parameters.apl_data")
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
    density = spec.get("density")
    parts = [density / 2, density] if parts is None else floats(parts, f"{where}.parameters.partitions")
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
        amp = floats(amp, f"{where}.parameters.amplification")
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
    ref = model_ref(item["model"], f"{where}.model", cfg.notices)
    own = item.get("parameters") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"`{where}.parameters` must be a mapping, got {own!r}")
    check_keys(own, f"{where}.parameters", {p.key for p in plist if p.scope == "model"}, per_model=True)
    return ref, own


def _load_slices(cfg: MergeConfig, items, params: dict, top_global: dict, plist, check_keys, label: str) -> None:
    if not isinstance(items, list) or not items:
        raise ConfigError("`slices` must list at least one slice (`- sources: [{model: PATH, layer_range: [0, N]}]`)")
    if cfg.prune == "dp" or (cfg.combine == "pcb" and cfg.get("pcb_scope") == "model" and "scope" in params):
        raise ConfigError(f"{label} needs whole-model statistics (DP outlier ratios / PCB model scope); it "
                          f"cannot run on `slices`: use `models`" + (", or `scope: tensor`" if cfg.prune != "dp" else ""))
    if cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":    # the default: slices have no one task vector
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
        slice_base = model_ref(s["base_model"], f"{where}.base_model", cfg.notices) if s.get("base_model") else cfg.base_model
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
                                            layer_range=layer_range(src["layer_range"], f"{w}.layer_range")))
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
    stage = STAGES["prune"][prune]
    if stage.check is not None and all(P.is_constant(m.get(p.name)) for p in stage.params
                                       if p.scope == "model" and p.per_tensor):
        check_stage(prune, m, where)


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
            pad = number(pad, "tokenizer.pad_to_multiple_of", lo=1, integer=True)
        if not isinstance(tokens, dict):
            raise ConfigError("`tokenizer.tokens` must map token text to {source: ..., force: ...}")
        tokens = {str(k): token_entry(v, f"tokenizer.tokens[{k!r}]", notices) for k, v in tokens.items()}
    else:
        return
    if src not in ("base", "union"):
        src = model_ref(src, where, notices)
        cfg.tokenizer_source = src
    cfg.vocab = VocabSpec(source=src, tokens=tokens, pad_to_multiple_of=pad)
