"""The interpolation family: merges that work on the models' weights (not on deltas), one short
file each, to be read beside its paper or mergekit's docstring.

linear.py (model soup) | slerp.py | nuslerp.py | multislerp.py | karcher.py | model_stock.py |
nearswap.py | arcee_fusion.py; passthrough (layer stacking) is a scaled copy, here too.

`interpolate(cfg, name, base, tensors)` runs the config's method on one tensor: `cfg` is a resolved
per-tensor view (config.MergeConfig.for_tensor), `tensors` the float32 inputs aligned with
cfg.models (for linear and karcher a base_model is one of them, as mergekit treats it), `base` the
float32 base tensor or None.
"""
from __future__ import annotations

import torch

from .arcee_fusion import arcee_fusion, fusion_importance, fusion_threshold
from .karcher import karcher
from .linear import linear
from .model_stock import model_stock, model_stock_cosine, model_stock_ratio
from .multislerp import multislerp
from .nearswap import nearswap, nearswap_weight
from .nuslerp import nuslerp, nuslerp_merge, nuslerp_t
from .slerp import slerp, slerp_coefficients, slerp_dot

__all__ = ["interpolate", "arcee_fusion", "fusion_importance", "fusion_threshold", "karcher", "linear",
           "model_stock", "model_stock_cosine", "model_stock_ratio", "multislerp", "nearswap", "nearswap_weight",
           "nuslerp", "nuslerp_merge", "nuslerp_t", "slerp", "slerp_coefficients", "slerp_dot"]


def interpolate(cfg, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The merged float32 tensor `name` for an interpolation or passthrough config view."""
    method = cfg.merge_method
    weights = [m.get("weight") for m in cfg.models]
    if method == "linear":
        return linear(tensors, weights, cfg.get("normalize"))
    if method == "slerp":
        return slerp(cfg.get("t"), base, tensors[0])
    if method == "nuslerp":
        return nuslerp_merge(tensors, weights, base, cfg.get("nuslerp_row_wise"), cfg.get("nuslerp_flatten"))
    if method == "multislerp":
        return multislerp(tensors, weights, base, cfg.get("normalize_weights"), cfg.get("eps"), name)
    if method == "karcher":
        return karcher(tensors, cfg.get("max_iter"), cfg.get("tol"))
    if method == "model_stock":
        return model_stock(base, tensors, cfg.get("filter_wise"))
    if method == "nearswap":
        return nearswap(base, tensors[0], cfg.get("t"))
    if method == "arcee_fusion":
        return arcee_fusion(base, tensors[0])
    if method == "passthrough":
        scale = cfg.models[0].get("scale")
        return tensors[0] if scale is None else tensors[0] * scale
    raise ValueError(f"{method!r} is not an interpolation method")
