"""The app's method controls as one value, and the one place they become a MergeConfig and back.

The controls hold density (the slider shows the prune rate 1 − density as its label, not as a
second variable) and the DPA band edges as shares of the kept entries (band k holds the top
share_k of what the prune keeps), which is what a user can reason about at any density. The
config holds partitions as fractions of all entries; `to_config` converts once, in one direction.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .config import PRESETS, ConfigError, MergeConfig, load_config


@dataclass(frozen=True)
class MethodControls:
    preset: str = "dppa"
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

    @property
    def stages(self) -> tuple[str, str, str]:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; pick one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]

    @property
    def prune_rate(self) -> float:
        return 1.0 - self.density

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
        if prune != "none" and not 0 < self.density <= 1:
            raise ConfigError(f"prune rate {self.prune_rate:g} leaves nothing: keep it below 1")
        if self.weights and len(self.weights) not in (1, n_models):
            raise ConfigError(f"{len(self.weights)} weights for {n_models} fine-tunes: give one per fine-tune, "
                              f"or a single number for all")
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
        prune, amplify, combine = self.stages
        models = []
        for ref, w in zip(fts, self.model_weights(len(fts))):
            p: dict = {"weight": float(w)}
            if prune != "none":
                p["density"] = float(self.density)
            if amplify == "dpa":
                p["partitions"] = [s * self.density for s in self.band_shares] + [float(self.density)]
                a = list(self.alpha_per_model.get(ref, self.alphas))
                if len(a) != len(self.band_shares) + 1:
                    raise ConfigError(f"the auto-α for {ref} has {len(a)} values for {len(self.band_shares) + 1} "
                                      f"bands: run auto α again or clear it")
                p["amplification"] = a
            models.append({"model": ref, "parameters": p})
        params: dict = {"lambda": float(self.lambda_)}
        if prune == "dp":
            params.update(dp_lambda=float(self.dp_lambda), dp_outlier_m=float(self.dp_outlier_m))
        if combine == "pcb":
            params["pcb_ratio"] = float(self.pcb_ratio)
        return {"merge_method": self.preset, "base_model": base, "models": models, "parameters": params,
                "seed": int(self.seed)}

    def to_config(self, base: str, fts: list[str]) -> MergeConfig:
        """The validated MergeConfig these controls describe (ConfigError names a bad value)."""
        return load_config(self.to_dict(base, fts))

    @classmethod
    def from_config(cls, cfg) -> "MethodControls":
        """The controls of a config (MergeConfig, dict or YAML text); what the controls cannot express
        (per-model densities, a stage combination no preset has) is refused by name."""
        cfg = cfg if isinstance(cfg, MergeConfig) else load_config(cfg)
        preset = next((p for p, st in PRESETS.items() if st == cfg.stages), None)
        if preset is None:
            raise ConfigError(f"the stages prune={cfg.prune}, amplify={cfg.amplify}, combine={cfg.combine} are no "
                              f"preset of the app; run this config with `python -m dppa_ui merge`")
        if cfg.merge_method in PRESETS and PRESETS[cfg.merge_method] == cfg.stages:
            preset = cfg.merge_method
        m0 = cfg.models[0]
        if cfg.prune != "none" and any(m.density != m0.density for m in cfg.models):
            raise ConfigError("the models have different densities; the app sets one density for all "
                              "(run this config with `python -m dppa_ui merge`)")
        weights = tuple(m.weight for m in cfg.models)
        c = cls(preset=preset, density=m0.density if cfg.prune != "none" else cls.density,
                lambda_=cfg.lambda_, weights=() if all(w == 1.0 for w in weights) else weights,
                dp_lambda=cfg.dp_lambda, dp_outlier_m=cfg.dp_outlier_m, pcb_ratio=cfg.pcb_ratio, seed=cfg.seed)
        if cfg.amplify == "dpa" and m0.partitions:
            d = m0.density
            shares = tuple(round(p / d, 9) for p in m0.partitions[:-1])
            amps = [m.amplification for m in cfg.models]
            if any(isinstance(a, str) for a in amps):
                raise ConfigError("amplification: auto is searched by the app's 'auto α' button; give numbers")
            if all(list(a) == list(amps[0]) for a in amps):
                c = replace(c, band_shares=shares, alphas=tuple(amps[0]))
            else:
                c = replace(c, band_shares=shares, alphas=tuple(amps[0]),
                            alpha_per_model={m.model: list(m.amplification) for m in cfg.models})
        return c

    def as_dict(self) -> dict:
        return asdict(self)
