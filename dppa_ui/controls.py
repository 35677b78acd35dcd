"""The app's method controls as one value, and the one place they become a MergeConfig and back.

`method` is any method of the registry's picker (delta pipelines, interpolations, layer stacking;
SMILE upscales from its own controls). The common quantities have their own fields; every other
parameter of the method is in `params` (key -> a value, or a per-layer setting: a gradient list
or `filter` entries, exactly as the YAML writes it).

The controls hold density (the slider shows the prune rate 1 − density as its label, not as a
second variable) and the DPA band edges as shares of the kept entries (band k holds the top
share_k of what the prune keeps), which is what a user can reason about at any density. The
config holds partitions as fractions of all entries; `to_dict` converts once, in one direction.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

from . import params as P
from .config import ConfigError, MergeConfig, load_config
from .registry import METHODS, PIPELINE_PRESETS, Method, Param

# The quantities with fields of their own; everything else a method takes goes through `params`.
OWN_KEYS = ("weight", "density", "lambda", "partitions", "amplification", "domain", "dp_lambda", "dp_outlier_m",
            "pcb_ratio", "apl_data", "alpha_start",
            "lambda_objective", "lambda_choice",   # lambda: auto's, set where that search runs (Search section, YAML)
            "int8_mask", "scale")     # mergekit's memory switch (a no-op here); passthrough's per-source scale (YAML)
PICKER_FAMILIES = ("pipeline", "interpolation", "stacking")     # smile has its own section (Merge tab)


def picker_methods() -> dict[str, Method]:
    """The methods the app's picker offers, pipelines first."""
    return {n: m for fam in PICKER_FAMILIES for n, m in METHODS.items() if m.family == fam}


def extra_params(method: str) -> list[Param]:
    """The parameters of `method` without a field of their own (what the generic controls show)."""
    return [p for p in METHODS[method].params if p.key not in OWN_KEYS]


@dataclass(frozen=True)
class MethodControls:
    preset: str = "dppa"                 # the method (a registry name)
    density: float = 0.2                 # share of each delta the prune keeps (prune rate = 1 - density)
    lambda_: float = 1.0
    weights: tuple[float, ...] = ()      # one per fine-tune; () = 1 each
    dp_lambda: float = 0.08
    dp_outlier_m: float = 5.0
    band_shares: tuple[float, ...] = (0.5,)      # inner DPA band edges, shares of the kept entries
    alphas: tuple[float, ...] = (1.8, 1.0)       # one per band (len(band_shares) + 1)
    alpha_per_model: dict = field(default_factory=dict)   # ref -> alphas, from the auto-α search
    pcb_ratio: float = 0.1
    seed: int = 0
    params: dict = field(default_factory=dict)   # the method's other parameters: key -> value or setting

    @property
    def method(self) -> Method:
        if self.preset not in picker_methods():
            raise ConfigError(f"unknown method {self.preset!r}; pick one of {', '.join(picker_methods())}")
        return METHODS[self.preset]

    @property
    def stages(self) -> tuple[str, str, str]:
        """(prune, amplify, combine); interpolations and stacking have none: ("none", "none", "none")."""
        return self.method.stages or ("none", "none", "none")

    @property
    def keys(self) -> set[str]:
        return {p.key for p in self.method.params}

    def value(self, key: str):
        """A parameter's value in these controls: `params`, else the method's default."""
        if key in self.params:
            return self.params[key]
        p = next((p for p in self.method.params if p.key == key), None)
        return None if p is None or p.required else p.default

    def check(self, n_models: int) -> None:
        """Refuse values no config can hold, naming the control."""
        prune, amplify, _ = self.stages
        for name in ("density", "lambda_", "dp_lambda", "dp_outlier_m", "pcb_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name.rstrip('_')} must be a finite number, got {v!r}")
        for v in (*self.weights, *self.band_shares, *self.alphas,
                  *[a for alphas in self.alpha_per_model.values() for a in alphas]):
            if not math.isfinite(v):
                raise ConfigError(f"every weight, band edge and α must be a finite number, got {v!r}")
        unknown = set(self.params) - self.keys
        if unknown:
            raise ConfigError(f"{self.preset} takes no {', '.join(sorted(unknown))}")
        if prune != "none" and not 0 < self.density <= 1:
            raise ConfigError(f"density {self.density:g} is out of range: the share of each δ kept, above 0 and at "
                              f"most 1 (0.2 keeps 20%, prunes 80%)")
        if self.weights and len(self.weights) not in (1, n_models):
            raise ConfigError(f"weights: {len(self.weights)} given for {n_models} fine-tune"
                              f"{'' if n_models == 1 else 's'}: give one per fine-tune, or a single number for all")
        if amplify == "dpa":
            s = self.band_shares
            if any(b <= a for a, b in zip(s, s[1:])) or any(not 0 < b < 1 for b in s):
                raise ConfigError(f"band edges {list(s)} must be ascending and strictly between 0 and 1")
            if len(self.alphas) != len(s) + 1:
                raise ConfigError(f"{len(self.alphas)} α for {len(s) + 1} bands")

    def model_weights(self, n: int) -> list[float]:
        if not self.weights:
            return [1.0] * n
        return list(self.weights) * n if len(self.weights) == 1 else list(self.weights)

    def to_dict(self, base: str, fts: list[str]) -> dict:
        """The config dict (what the YAML export writes) for base + fine-tunes `fts`."""
        self.check(len(fts))
        m = self.method
        keys = self.keys
        prune, amplify, combine = self.stages
        models = []
        for ref, w in zip(fts, self.model_weights(len(fts))):
            p: dict = {}
            if "weight" in keys:
                p["weight"] = float(w)
            if prune != "none":
                p["density"] = float(self.density)
            if amplify == "dpa":
                p["partitions"] = [s * self.density for s in self.band_shares] + [float(self.density)]
                a = list(self.alpha_per_model.get(ref, self.alphas))
                if len(a) != len(self.band_shares) + 1:
                    raise ConfigError(f"the auto-α for {ref} has {len(a)} values for {len(self.band_shares) + 1} "
                                      f"bands: run auto α again or clear it")
                p["amplification"] = a
            models.append({"model": ref, "parameters": p} if p else {"model": ref})
        params: dict = {}
        if "lambda" in keys:
            params["lambda"] = float(self.lambda_)
        if prune == "dp":
            params.update(dp_lambda=float(self.dp_lambda), dp_outlier_m=float(self.dp_outlier_m))
        if "pcb_ratio" in keys:
            params["pcb_ratio"] = float(self.pcb_ratio)
        params.update(copy.deepcopy(self.params))      # model-scope ones are every model's default
        d = {"merge_method": self.preset, "models": models, "seed": int(self.seed)}
        if m.base != "none":
            d["base_model"] = base
        if params:
            d["parameters"] = params
        return d

    def to_config(self, base: str, fts: list[str]) -> MergeConfig:
        """The validated MergeConfig these controls describe (ConfigError names a bad value)."""
        return load_config(self.to_dict(base, fts))

    @classmethod
    def from_config(cls, cfg) -> "MethodControls":
        """The controls of a config (MergeConfig, dict or YAML text); what the controls cannot express
        (per-model densities, slices, a stage combination no method has) is refused by name."""
        cfg = cfg if isinstance(cfg, MergeConfig) else load_config(cfg)
        if cfg.slices is not None:
            raise ConfigError("this config stacks layers (`slices`): the controls hold whole models; run it with "
                              "'Merge this YAML as written' or `python -m dppa_ui merge`")
        if cfg.family == "pipeline":
            preset = cfg.merge_method if cfg.merge_method in PIPELINE_PRESETS and \
                PIPELINE_PRESETS[cfg.merge_method] == cfg.stages else \
                next((p for p, st in PIPELINE_PRESETS.items() if st == cfg.stages), None)
            if preset is None:
                raise ConfigError(f"the stages prune={cfg.prune}, amplify={cfg.amplify}, combine={cfg.combine} are "
                                  f"no method of the app's picker; run this config with `python -m dppa_ui merge`")
        elif cfg.merge_method in picker_methods():
            preset = cfg.merge_method
        else:
            raise ConfigError(f"{cfg.merge_method} has its own controls in the app (Merge tab)")
        models = [x for x in cfg.models if x.model != cfg.base_model] or cfg.models
        m0 = models[0]
        if cfg.prune != "none" and any(m.get("density") != m0.get("density") for m in models):
            raise ConfigError("the models have different densities; the app sets one density for all "
                              "(run this config with `python -m dppa_ui merge`)")
        weights = tuple(m.get("weight") for m in models)
        if any(not isinstance(w, (int, float)) for w in weights):
            raise ConfigError("per-layer weights are not in the app's controls; run this config with "
                              "`python -m dppa_ui merge`")
        c = cls(preset=preset, density=m0.get("density") if cfg.prune != "none" else cls.density,
                lambda_=cfg.get("lambda") if isinstance(cfg.get("lambda"), (int, float)) else cls.lambda_,
                weights=() if all(w == 1.0 for w in weights) else weights,
                dp_lambda=cfg.get("dp_lambda"), dp_outlier_m=cfg.get("dp_outlier_m"),
                pcb_ratio=cfg.get("pcb_ratio") if isinstance(cfg.get("pcb_ratio"), (int, float)) else cls.pcb_ratio,
                seed=cfg.seed)
        extra = {}
        for p in extra_params(preset):
            if p.scope == "global":
                v = cfg.get(p.name)
            else:
                vals = [x.get(p.name) for x in models]
                if any(v != vals[0] for v in vals):
                    raise ConfigError(f"the models have different `{p.key}`; the app sets one for all")
                v = vals[0]
            if v is not None and (not P.is_constant(v) or v != p.default):
                extra[p.key] = copy.deepcopy(v)
        c = replace(c, params=extra)
        if cfg.amplify == "dpa" and m0.get("partitions"):
            d = m0.get("density")
            shares = tuple(round(p / d, 9) for p in m0.get("partitions")[:-1])
            amps = [m.get("amplification") for m in models]
            if any(isinstance(a, str) for a in amps):
                raise ConfigError("amplification: auto is searched by the app's 'auto α' button; give numbers")
            if all(list(a) == list(amps[0]) for a in amps):
                c = replace(c, band_shares=shares, alphas=tuple(amps[0]))
            else:
                c = replace(c, band_shares=shares, alphas=tuple(amps[0]),
                            alpha_per_model={m.model: list(m.get("amplification")) for m in models})
        return c
