"""Merge configs: a superset of mergekit's YAML for the methods we share.

A merge is one pipeline, prune -> amplify -> combine, applied to each fine-tune's delta. A preset
(`merge_method`) names a pipeline; `prune:` / `amplify:` / `combine:` override its stages.
Everything is validated here, before any tensor is read, and every refusal names the key or value.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRUNES = ("none", "magnitude", "random", "dp", "apl")
AMPLIFIES = ("none", "dpa")
COMBINES = ("sum", "ties", "pcb")

# preset -> (prune, amplify, combine); mergekit's names where mergekit has them.
PRESETS: dict[str, tuple[str, str, str]] = {
    "task_arithmetic": ("none", "none", "sum"),
    "ties": ("magnitude", "none", "ties"),
    "dare_linear": ("random", "none", "sum"),
    "dare_ties": ("random", "none", "ties"),
    "dp": ("dp", "none", "sum"),
    "dppa": ("dp", "dpa", "sum"),
    "pcb": ("none", "none", "pcb"),
}

PRESET_INFO: dict[str, tuple[str, str]] = {   # two lines on what it does, and its paper
    "task_arithmetic": ("Adds the weighted task vectors (fine-tuned minus base) to the base.",
                        "https://arxiv.org/abs/2212.04089"),
    "ties": ("Trims each delta to its largest entries, elects a sign per entry, and averages the agreeing ones.",
             "https://arxiv.org/abs/2306.01708"),
    "dare_linear": ("Drops delta entries at random and rescales the survivors by 1/density, then adds them.",
                    "https://arxiv.org/abs/2311.03099"),
    "dare_ties": ("DARE's random drop and rescale, then TIES sign election and agreeing mean.",
                  "https://arxiv.org/abs/2311.03099"),
    "dp": ("Dynamic Pruning: per-layer and per-module densities from outlier ratios (OWL-style), then magnitude pruning.",
           "https://arxiv.org/abs/2403.02799"),
    "dppa": ("DP pruning, then Dynamic Partition Amplification: magnitude bands of the kept entries scaled by their own factor.",
             "https://arxiv.org/abs/2403.02799"),
    "pcb": ("Parameter Competition Balancing: intra- and inter-task scores decide which entries survive and how much each weighs.",
            "https://arxiv.org/abs/2410.02396"),
}

# --- APL and SMILE (issue 9). APL is a prune stage (`prune: apl`, any combine); SMILE is not a
# pipeline at all: `merge_method: smile` upscales the fine-tunes into a mixture of low-rank experts.
UPSCALE_METHODS: dict[str, tuple[str, str]] = {
    "smile": ("Keeps every fine-tune as a low-rank expert (SVD of its delta) behind a zero-shot router: "
              "an upscaled model, not a merge.", "https://arxiv.org/abs/2408.10174"),
}
STAGE_INFO: dict[str, tuple[str, str]] = {
    "apl": ("Activated Parameter Locating: each block / module / row keeps more of its delta the more the "
            "fine-tune's loss on its own task rises without it (causal intervention).",
            "https://arxiv.org/abs/2408.09485"),
}
APL_LEVELS = ("block", "module", "row")
APL_IMPORTANCE = ("auto", "exact", "gradient")      # auto: exact for block/module, gradient for row
APL_GRADIENT_AT = ("midpoint", "finetune", "base")   # where −δ·∇L takes its gradient (methods/apl.py)
APL_EXAMPLES = 16
SMILE_OTHERS = ("task_arithmetic", "base")
SMILE_SCOPES = ("blocks", "embeddings", "all")   # paper: the projections in the blocks; + input embeddings; + lm_head

UNSUPPORTED_METHODS = ("linear", "slerp", "nuslerp", "multislerp", "della", "della_linear", "breadcrumbs",
                       "breadcrumbs_ties", "model_stock", "passthrough", "sce", "karcher", "arcee_fusion",
                       "nearswap", "ram", "core")

DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}

GLOBAL_KEYS = {"lambda", "normalize", "dp_lambda", "dp_outlier_m", "dp_others", "partitions", "amplification",
               "pcb_ratio", "scope", "weight", "density", "rescale", "int8_mask",
               # APL (prune: apl)
               "apl_examples", "apl_level", "apl_importance", "apl_gradient_at", "apl_lambda", "apl_drop",
               "apl_weights", "apl_others",
               # SMILE (merge_method: smile)
               "rank_of_expert", "rank_of_router", "num_experts_per_tok", "smile_others", "smile_scope",
               # DPPA as the official code does it (issue 8): whole-kept tensors, the greedy alpha walk
               "dpa_whole", "alpha_search", "alpha_start", "alpha_step",
               # PCB as the official code does it (issue 8)
               "clip_ratio"}
MODEL_KEYS = {"weight", "density", "partitions", "amplification", "domain", "rescale",
              "apl_data"}     # APL: a JSONL of {"prompt", "answer"} (demo models: their dev split)
TOP_KEYS = {"merge_method", "prune", "amplify", "combine", "base_model", "models", "parameters", "dtype",
            "out_dtype", "seed", "tokenizer_source", "tokenizer", "chat_template", "name",
            "search"}   # the merge-parameter search block (dppa_ui/search.py)
MERGEKIT_UNSUPPORTED_TOP = {"slices": "slices (layer ranges) are not supported yet: list whole models under `models:`",
                            "modules": "modules are not supported yet: list whole models under `models:`"}
# mergekit's named templates, written out here (same conversation formats, our own Jinja).
NAMED_CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
              " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "alpaca": "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
              "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
              "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
    "exaone": "{% for m in messages %}{{ '[|' + m['role'] + '|]' + m['content'] }}{% if m['role'] == 'user' %}"
              "{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}",
}


class ConfigError(ValueError):
    """A merge config that cannot run; the message names the key or value and the fix."""


@dataclass
class ModelSpec:
    model: str
    weight: float = 1.0
    density: float = 1.0
    partitions: list[float] | None = None
    amplification: list[float] | str | None = None    # list, or "auto" (greedy search)
    domain: str | list[str] | None = None
    rescale: str = "paper"
    apl_data: str | None = None          # APL: JSONL of the fine-tune's own task (None: its demo domain)


@dataclass
class MergeConfig:
    base_model: str
    models: list[ModelSpec]
    merge_method: str | None = None
    prune: str = "none"
    amplify: str = "none"
    combine: str = "sum"
    lambda_: float = 1.0
    lambda_auto: bool = False           # `lambda: auto`: PCB's per-model lambda search (dppa_ui.search)
    normalize: bool = False
    dp_lambda: float = 0.08
    dp_outlier_m: float = 5.0
    dp_others: str = "keep"
    pcb_ratio: float = 0.1
    scope: str = "tensor"
    # DPPA details (issue 8)
    dpa_whole: str = "amplify"          # tensors DP keeps whole: "amplify" (official, x max alpha) or "keep" (x1)
    alpha_search: str = "official"      # greedy alpha walk returns its end state ("official") or the "best" seen
    alpha_start: list[float] | None = None   # walk start; None = official [1.8, 0.0, ...]
    alpha_step: float = 0.1
    # PCB details (issue 8)
    clip_ratio: float = 0.0001          # |delta| clipped at these tails per row (pcb-merging.py)
    search: dict | None = None          # the raw `search:` block, validated by dppa_ui.search
    dtype: str | None = None            # output dtype; None = the base's
    seed: int = 0
    tokenizer_source: str | None = None   # None/"base" = the base's tokenizer; else a model ref
    chat_template: str | None = None      # None/"auto" = the tokenizer source's; else a Jinja template
    name: str | None = None
    # APL (prune: apl), see methods/apl.py
    apl_examples: int = APL_EXAMPLES
    apl_level: str = "module"
    apl_importance: str = "auto"
    apl_gradient_at: str = "midpoint"
    apl_lambda: float = 0.5
    apl_drop: str = "random"
    apl_weights: bool = False
    apl_others: str = "keep"             # tensors outside the partitions: keep the delta, or prune at the density
    # SMILE (merge_method: smile), see methods/smile.py; rank_of_expert None = full rank
    upscale: str | None = None
    rank_of_expert: int | None = 64
    rank_of_router: int = 8
    num_experts_per_tok: int = 1
    smile_others: str = "task_arithmetic"
    smile_scope: str = "blocks"
    notices: list[str] = field(default_factory=list)

    @property
    def stages(self) -> tuple[str, str, str]:
        return self.prune, self.amplify, self.combine

    @property
    def apl_importance_kind(self) -> str:
        """"exact" or "gradient": what `apl_importance` resolves to at `apl_level`."""
        if self.apl_importance != "auto":
            return self.apl_importance
        return "gradient" if self.apl_level == "row" else "exact"

    @property
    def method_name(self) -> str:
        if self.upscale:
            return self.upscale
        if self.merge_method and PRESETS.get(self.merge_method) == self.stages:
            return self.merge_method
        return "+".join(self.stages)

    def to_dict(self) -> dict:
        """A plain dict that `load_config` turns back into this config (every value explicit)."""
        d: dict[str, Any] = {}
        if self.merge_method:
            d["merge_method"] = self.merge_method
        if not self.upscale:
            d.update(prune=self.prune, amplify=self.amplify, combine=self.combine)
        d["base_model"] = self.base_model
        models = []
        for m in self.models:
            p: dict[str, Any] = {"weight": m.weight, "density": m.density}
            if self.amplify == "dpa":
                p["partitions"] = list(m.partitions)
                p["amplification"] = m.amplification if isinstance(m.amplification, str) else list(m.amplification)
            if self.prune == "random":
                p["rescale"] = m.rescale
            if m.domain is not None:
                p["domain"] = m.domain
            if self.prune == "apl" and m.apl_data is not None:
                p["apl_data"] = m.apl_data
            models.append({"model": m.model, "parameters": p})
        d["models"] = models
        params: dict[str, Any] = {"lambda": "auto" if self.lambda_auto else self.lambda_, "normalize": self.normalize}
        if self.prune == "dp":
            params.update(dp_lambda=self.dp_lambda, dp_outlier_m=self.dp_outlier_m, dp_others=self.dp_others)
        if self.amplify == "dpa":
            params.update(dpa_whole=self.dpa_whole, alpha_search=self.alpha_search, alpha_step=self.alpha_step)
            if self.alpha_start is not None:
                params["alpha_start"] = list(self.alpha_start)
        if self.combine == "pcb":
            params.update(pcb_ratio=self.pcb_ratio, clip_ratio=self.clip_ratio, scope=self.scope)
        if self.prune == "apl":
            params.update(apl_examples=self.apl_examples, apl_level=self.apl_level, apl_importance=self.apl_importance,
                          apl_gradient_at=self.apl_gradient_at, apl_lambda=self.apl_lambda, apl_drop=self.apl_drop,
                          apl_weights=self.apl_weights, apl_others=self.apl_others)
        if self.upscale == "smile":
            params.update(rank_of_expert="full" if self.rank_of_expert is None else self.rank_of_expert,
                          rank_of_router=self.rank_of_router, num_experts_per_tok=self.num_experts_per_tok,
                          smile_others=self.smile_others, smile_scope=self.smile_scope)
        d["parameters"] = params
        if self.dtype:
            d["dtype"] = self.dtype
        d["seed"] = self.seed
        for key in ("tokenizer_source", "chat_template", "name"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.search is not None:
            d["search"] = copy.deepcopy(self.search)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- parsing helpers

def _num(value, key: str, *, lo=None, hi=None, lo_open=False, integer=False) -> float:
    if isinstance(value, list):
        raise ConfigError(f"`{key}`: gradient lists ({value!r}) are not supported yet; give one number")
    if isinstance(value, dict):
        raise ConfigError(f"`{key}`: per-tensor filters ({value!r}) are not supported yet; give one number")
    if isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot, no exponent sign) as text; mergekit's pydantic takes it as a number.
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"`{key}` must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{key}` must be a number, got {value!r}")
    if not math.isfinite(value):      # NaN, inf, and YAML's 1e400 (which reads as inf)
        raise ConfigError(f"`{key}` must be a finite number, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"`{key}` must be an integer, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"`{key}` = {value} is out of range: it must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"`{key}` = {value} is out of range: it must be <= {hi}")
    return int(value) if integer else float(value)


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{key}` must be true or false, got {value!r}")
    return value


def _choice(value, key: str, options) -> str:
    if value not in options:
        raise ConfigError(f"`{key}` = {value!r} is not one of {', '.join(options)}")
    return value


def _rescale(value, key: str) -> str:
    # mergekit's `rescale: true` is read as L1 rescaling; false = none; default = DARE paper 1/density.
    if value is True:
        return "l1"
    if value is False:
        return "none"
    return _choice(value, key, ("paper", "l1", "none"))


def _floats(value, key: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"`{key}` must be a non-empty list of numbers, got {value!r}")
    return [_num(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _ref(value, key: str) -> str:
    if isinstance(value, dict):
        raise ConfigError(f"`{key}`: structured model references ({value!r}) are not supported yet; give a path or hub id")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be a model path, hub id or demo:NAME, got {value!r}")
    if "+" in value:
        raise ConfigError(f"`{key}` = {value!r}: LoRA (+adapter) references are not supported yet; merge the adapter first")
    return value.strip()


def _read(source) -> dict:
    if isinstance(source, MergeConfig):
        return source.to_dict()
    if isinstance(source, dict):
        return copy.deepcopy(source)
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
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"the config is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with at least `merge_method`, `base_model` and `models`")
    return data


# ----------------------------------------------------------------------------- APL and SMILE keys

def _apl_data(value, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be the path of a JSONL file of {{\"prompt\", \"answer\"}} lines, got {value!r}")
    return value.strip()


def _load_apl(cfg: MergeConfig, params: dict) -> None:
    given = sorted(k for k in params if k.startswith("apl_"))
    if cfg.prune != "apl":
        if given:
            cfg.notices.append(f"`{given[0]}` is ignored: this pipeline does not prune with apl")
        return
    cfg.apl_examples = _num(params.get("apl_examples", APL_EXAMPLES), "parameters.apl_examples", lo=1, integer=True)
    cfg.apl_level = _choice(params.get("apl_level", "module"), "parameters.apl_level", APL_LEVELS)
    cfg.apl_importance = _choice(params.get("apl_importance", "auto"), "parameters.apl_importance", APL_IMPORTANCE)
    if cfg.apl_level == "row" and cfg.apl_importance == "exact":
        raise ConfigError("`parameters.apl_importance` = exact at `apl_level: row` would need one forward pass "
                          "per row of every matrix; use `apl_importance: gradient` (or auto) for rows")
    cfg.apl_gradient_at = _choice(params.get("apl_gradient_at", "midpoint"), "parameters.apl_gradient_at",
                                  APL_GRADIENT_AT)
    cfg.apl_lambda = _num(params.get("apl_lambda", 0.5), "parameters.apl_lambda", lo=0, hi=1)
    cfg.apl_drop = _choice(params.get("apl_drop", "random"), "parameters.apl_drop", ("random", "magnitude"))
    cfg.apl_weights = _bool(params.get("apl_weights", False), "parameters.apl_weights")
    cfg.apl_others = _choice(params.get("apl_others", "keep"), "parameters.apl_others", ("keep", "prune"))


def _load_smile(cfg: MergeConfig, params: dict) -> None:
    keys = ("rank_of_expert", "rank_of_router", "num_experts_per_tok", "smile_others", "smile_scope")
    if cfg.upscale != "smile":
        given = [k for k in keys if k in params]
        if given:
            cfg.notices.append(f"`{given[0]}` is ignored: it belongs to merge_method smile")
        return
    rank = params.get("rank_of_expert", 64)
    cfg.rank_of_expert = None if rank == "full" else _num(rank, "parameters.rank_of_expert", lo=1, integer=True)
    cfg.rank_of_router = _num(params.get("rank_of_router", 8), "parameters.rank_of_router", lo=1, integer=True)
    cfg.num_experts_per_tok = _num(params.get("num_experts_per_tok", 1), "parameters.num_experts_per_tok",
                                   lo=1, integer=True)
    cfg.smile_others = _choice(params.get("smile_others", "task_arithmetic"), "parameters.smile_others", SMILE_OTHERS)
    cfg.smile_scope = _choice(params.get("smile_scope", "blocks"), "parameters.smile_scope", SMILE_SCOPES)


# ----------------------------------------------------------------------------- load

def load_config(source) -> MergeConfig:
    """Parse and validate a config (dict, YAML text, or path). Raises ConfigError naming the problem."""
    data = _read(source)
    notices: list[str] = []

    for key in data:
        if key in MERGEKIT_UNSUPPORTED_TOP:
            raise ConfigError(MERGEKIT_UNSUPPORTED_TOP[key])
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key `{key}`; known keys: {', '.join(sorted(TOP_KEYS))}")

    method = data.get("merge_method")
    upscale = None
    if method in UPSCALE_METHODS:
        stages = [k for k in ("prune", "amplify", "combine") if k in data]
        if stages:
            raise ConfigError(f"merge_method `{method}` upscales instead of merging: it takes no "
                              f"`{stages[0]}` stage (remove it; `smile_others` sets how the tensors outside "
                              f"the experts are merged)")
        upscale, prune, amplify, combine = method, "none", "none", "sum"
    elif method is not None:
        if method in UNSUPPORTED_METHODS:
            raise ConfigError(f"merge_method `{method}` is not supported yet; supported: {', '.join(PRESETS)} "
                              f"(or explicit prune/amplify/combine stages)")
        if method not in PRESETS:
            raise ConfigError(f"unknown merge_method `{method}`; supported: "
                              f"{', '.join([*PRESETS, *UPSCALE_METHODS])}")
        prune, amplify, combine = PRESETS[method]
    elif not any(k in data for k in ("prune", "amplify", "combine")):
        raise ConfigError(f"the config needs `merge_method` (one of {', '.join(PRESETS)}) or explicit "
                          f"`prune`/`amplify`/`combine` stages")
    else:
        prune, amplify, combine = "none", "none", "sum"
    prune = _choice(data.get("prune", prune), "prune", PRUNES)
    amplify = _choice(data.get("amplify", amplify), "amplify", AMPLIFIES)
    combine = _choice(data.get("combine", combine), "combine", COMBINES)
    if amplify == "dpa" and prune not in ("magnitude", "dp"):
        raise ConfigError(f"amplify `dpa` needs a magnitude or dp prune (its bands are magnitude ranks), "
                          f"got prune `{prune}`")

    if "base_model" not in data:
        raise ConfigError("`base_model` is required: the model the fine-tunes were trained from")
    base = _ref(data["base_model"], "base_model")

    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"`parameters` must be a mapping, got {params!r}")
    for key in params:
        if key not in GLOBAL_KEYS:
            raise ConfigError(f"unknown key `parameters.{key}`; known: {', '.join(sorted(GLOBAL_KEYS))}")
    if "int8_mask" in params:
        _bool(params["int8_mask"], "parameters.int8_mask")
        notices.append("`int8_mask` only saves memory in mergekit; masks here are boolean already, so it is ignored")

    default_normalize = method == "ties" if method else combine == "ties"
    cfg = MergeConfig(
        base_model=base, models=[], merge_method=method, prune=prune, amplify=amplify, combine=combine,
        lambda_=1.0 if params.get("lambda") == "auto" else _num(params.get("lambda", 1.0), "parameters.lambda"),
        lambda_auto=params.get("lambda") == "auto",
        normalize=_bool(params.get("normalize", default_normalize), "parameters.normalize"),
        dp_lambda=_num(params.get("dp_lambda", 0.08), "parameters.dp_lambda", lo=0, hi=1),
        dp_outlier_m=_num(params.get("dp_outlier_m", 5.0), "parameters.dp_outlier_m", lo=0, lo_open=True),
        dp_others=_choice(params.get("dp_others", "keep"), "parameters.dp_others", ("keep", "magnitude")),
        pcb_ratio=_num(params.get("pcb_ratio", 0.1), "parameters.pcb_ratio", lo=0, hi=1, lo_open=True),
        scope=_choice(params.get("scope", "tensor"), "parameters.scope", ("tensor", "model")),
        dpa_whole=_choice(params.get("dpa_whole", "amplify"), "parameters.dpa_whole", ("amplify", "keep")),
        alpha_search=_choice(params.get("alpha_search", "official"), "parameters.alpha_search", ("official", "best")),
        alpha_step=_num(params.get("alpha_step", 0.1), "parameters.alpha_step", lo=0, lo_open=True),
        clip_ratio=_num(params.get("clip_ratio", 0.0001), "parameters.clip_ratio", lo=0, hi=0.5, lo_open=False),
        seed=_num(data.get("seed", 0), "seed", lo=0, integer=True),
        name=data.get("name"), notices=notices, upscale=upscale,
    )
    _load_apl(cfg, params)
    _load_smile(cfg, params)

    # Output dtype: mergekit's out_dtype wins over dtype; default = the base's.
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            cfg.dtype = DTYPES.get(str(data[key]).lower()) or _choice(data[key], key, tuple(DTYPES))

    tok = data.get("tokenizer_source")
    if "tokenizer" in data:
        t = data["tokenizer"]
        if not isinstance(t, dict) or set(t) - {"source"}:
            raise ConfigError("`tokenizer`: only `tokenizer: {source: base|MODEL}` is supported yet "
                              "(token surgery is not)")
        tok = t.get("source")
    if tok is not None:
        if tok == "union":
            raise ConfigError("`tokenizer_source: union` is not supported yet; use `base` or one model's path")
        cfg.tokenizer_source = None if tok == "base" else _ref(tok, "tokenizer_source")
    ct = data.get("chat_template")
    if ct is not None:
        if not isinstance(ct, str):
            raise ConfigError(f"`chat_template` must be `auto`, `chatml` or a Jinja template, got {ct!r}")
        if ct in NAMED_CHAT_TEMPLATES:
            cfg.chat_template = NAMED_CHAT_TEMPLATES[ct]
        elif ct == "auto":
            cfg.chat_template = None
        elif "{{" in ct or "{%" in ct:
            cfg.chat_template = ct
        else:
            notices.append(f"chat_template {ct!r} is not a template we know ({', '.join(NAMED_CHAT_TEMPLATES)}); "
                           f"the tokenizer source's own template is kept")

    # Global defaults for per-model parameters.
    g_weight = _num(params.get("weight", 1.0), "parameters.weight")
    g_density = params.get("density", 1.0)
    g_rescale = _rescale(params.get("rescale", "paper"), "parameters.rescale")

    items = data.get("models")
    if not isinstance(items, list) or not items:
        raise ConfigError("`models` must list at least one fine-tuned model (`- model: PATH`)")
    for i, item in enumerate(items):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise ConfigError(f"`{where}` must be a mapping with a `model:` key, got {item!r}")
        for key in item:
            if key not in ("model", "parameters", "domain"):
                raise ConfigError(f"unknown key `{where}.{key}`; known: model, parameters, domain")
        ref = _ref(item["model"], f"{where}.model")
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"`{where}.parameters` must be a mapping, got {p!r}")
        for key in p:
            if key not in MODEL_KEYS:
                raise ConfigError(f"unknown key `{where}.parameters.{key}`; known: {', '.join(sorted(MODEL_KEYS))}")
        if ref == base:
            # mergekit YAMLs often list the base among the models; its delta is zero, so it is skipped.
            notices.append(f"{where} is the base model; skipped (its delta is zero)")
            continue
        spec = ModelSpec(
            model=ref,
            weight=_num(p.get("weight", g_weight), f"{where}.parameters.weight"),
            density=_num(p.get("density", g_density), f"{where}.parameters.density", lo=0, hi=1, lo_open=True),
            domain=p.get("domain", item.get("domain")),
            rescale=_rescale(p["rescale"], f"{where}.parameters.rescale") if "rescale" in p else g_rescale,
            apl_data=_apl_data(p.get("apl_data"), f"{where}.parameters.apl_data"),
        )
        if amplify == "dpa":
            parts = p.get("partitions", params.get("partitions"))
            parts = [spec.density / 2, spec.density] if parts is None else _floats(parts, f"{where}.parameters.partitions")
            if any(b <= a for a, b in zip(parts, parts[1:])) or parts[0] <= 0:
                raise ConfigError(f"`{where}` partitions {parts} must be positive and strictly ascending")
            if not math.isclose(parts[-1], spec.density, rel_tol=0, abs_tol=1e-9):
                raise ConfigError(f"`{where}` partitions {parts} must end at the model's density {spec.density}")
            if len(parts) > 3:
                raise ConfigError(f"`{where}` has {len(parts)} partitions; at most 3 are supported")
            amp = p.get("amplification", params.get("amplification"))
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
            spec.partitions, spec.amplification = parts, amp
        cfg.models.append(spec)
    if amplify != "dpa" and ("partitions" in params or "amplification" in params or any(
            "partitions" in (m.get("parameters") or {}) or "amplification" in (m.get("parameters") or {})
            for m in items if isinstance(m, dict))):
        notices.append("`partitions`/`amplification` are ignored: this pipeline has no dpa amplify stage")
    if not cfg.models:
        raise ConfigError("`models` lists only the base model; add at least one fine-tuned model")
    if cfg.upscale == "smile" and cfg.num_experts_per_tok > len(cfg.models):
        raise ConfigError(f"`parameters.num_experts_per_tok` = {cfg.num_experts_per_tok} is more than the "
                          f"{len(cfg.models)} fine-tune(s) listed (one expert each); use at most {len(cfg.models)}")
    if cfg.prune != "apl" and any(m.apl_data is not None for m in cfg.models):
        notices.append("`apl_data` is ignored: this pipeline does not prune with apl")
    if cfg.clip_ratio >= 0.5:
        raise ConfigError(f"`parameters.clip_ratio` = {cfg.clip_ratio} must be below 0.5 (it clips each tail)")
    if "alpha_start" in params:
        start = _floats(params["alpha_start"], "parameters.alpha_start")
        if any(a < 0 for a in start):
            raise ConfigError(f"`parameters.alpha_start` {start} must be >= 0")
        for i, m in enumerate(cfg.models):
            if amplify == "dpa" and m.amplification == "auto" and len(start) != len(m.partitions):
                raise ConfigError(f"`parameters.alpha_start` has {len(start)} values but models[{i}] has "
                                  f"{len(m.partitions)} partitions")
        cfg.alpha_start = start
    if "search" in data and data["search"] is not None:
        from .search import parse_search      # validated before any tensor is read
        cfg.search = copy.deepcopy(data["search"])
        parse_search(cfg)
    if cfg.combine == "pcb" and cfg.scope == "model":
        notices.append("scope: model flattens the whole model at once; it needs all deltas in memory")
    return cfg
