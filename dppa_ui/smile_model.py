"""A SMILE folder as a model (beside modelbuild, which loads every checkpoint through it): the
folder's format, loading it back without remote code, its SMILE layers and parameter count, and
the routing traces of a forward pass. Building one from a config is smile.py's.

A SMILE folder holds the base's config.json and tokenizer, `smile.safetensors` (the base weights of
every upscaled layer, the expert factors and routers, every other tensor merged) and
`smile_config.json` (ranks, top-k, experts and the upscaled layers). It has no model.safetensors,
so a plain `AutoModelForCausalLM.from_pretrained` refuses it instead of loading half a model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .io import untied_missing
from .methods.smile import SmileEmbedding, SmileLinear

SMILE_CONFIG = "smile_config.json"
SMILE_WEIGHTS = "smile.safetensors"
FORMAT = "dppa-ui-smile"
VERSION = 1



def smile_layers(model: nn.Module) -> dict[str, SmileLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SmileLinear)}


def parameter_count(model: nn.Module) -> dict[str, int]:
    """{"total", "plain" (the same model merged into one: the base architecture's count),
    "experts", "routers"}: what upscaling costs beside a plain merge."""
    seen, total, experts, routers = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("expert_u", "expert_v", "expert_bias"):
            experts += p.numel()
        elif leaf == "router":
            routers += p.numel()
    return {"total": total, "plain": total - experts - routers, "experts": experts, "routers": routers}


def is_smile_folder(path: str | Path) -> bool:
    return (Path(path) / SMILE_CONFIG).is_file()


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) of a SMILE folder, float32, eval mode; no remote code is run."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_smile_folder(path):
        raise ValueError(f"{path} is not a SMILE folder (no {SMILE_CONFIG}); plain models load with "
                         f"AutoModelForCausalLM or dppa_ui.modelbuild.load")
    spec = json.loads((path / SMILE_CONFIG).read_text())
    if spec.get("format") != FORMAT or int(spec.get("version", 0)) > VERSION:
        raise ValueError(f"{path / SMILE_CONFIG} is not a SMILE folder this version can read "
                         f"(format {spec.get('format')!r}, version {spec.get('version')!r})")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = dict(model.named_modules())
    with safe_open(str(path / SMILE_WEIGHTS), framework="pt") as f:
        # Copies: freshly allocated (aligned) float32 memory gives the same kernels, so the same
        # logits bit for bit, as the model that was saved.
        state = {k: f.get_tensor(k).to(torch.float32, copy=True) for k in f.keys()}
    embeddings = set(spec.get("embeddings", []))
    for name in spec["modules"]:
        def t(leaf):
            return state.get(f"{name}.{leaf}")
        k = int(spec["num_experts_per_tok"])
        if name in embeddings:
            layer = SmileEmbedding(t("weight"), t("expert_u"), t("expert_v"), t("router"), k,
                                   getattr(modules[name], "padding_idx", None))
        else:
            layer = SmileLinear(t("weight"), t("bias"), t("expert_u"), t("expert_v"), t("router"), t("expert_bias"), k)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or untied_missing(model.config, missing):
        raise ValueError(f"{path / SMILE_WEIGHTS} does not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    model.smile = spec
    model.eval().to(device)
    return model, AutoTokenizer.from_pretrained(str(path))


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, list]]:
    """Inside: every SMILE layer appends (top-K indices, weights) of each forward to its list."""
    layers = smile_layers(model)
    traces = {n: [] for n in layers}
    for n, m in layers.items():
        m.trace = traces[n]
    try:
        yield traces
    finally:
        for m in layers.values():
            m.trace = None


@contextlib.contextmanager
def forced(model: nn.Module, expert: int) -> Iterator[nn.Module]:
    """Inside: every SMILE layer sends every token to `expert` with weight 1."""
    layers = smile_layers(model)
    for m in layers.values():
        m.force_expert = int(expert)
    try:
        yield model
    finally:
        for m in layers.values():
            m.force_expert = None


def _num_experts(model) -> int:
    layers = list(smile_layers(model).values())
    if not layers:
        raise ValueError("this model has no SMILE layers (build it with dppa_ui.smile.build)")
    return layers[0].num_experts


@torch.inference_mode()
def position_routing(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over `input_ids` (B, T): (weights (B, T, E): each position's routing weight per
    expert averaged over the SMILE layers, top-1 share (B, T, E): the share of layers whose
    highest-weight expert it is)."""
    n_exp = _num_experts(model)
    dev = next(model.parameters()).device
    b, t = input_ids.shape
    with recording(model) as traces:
        model(input_ids=input_ids.to(dev), attention_mask=None if attention_mask is None else attention_mask.to(dev))
    weights = torch.zeros(b * t, n_exp)
    top1 = torch.zeros(b * t, n_exp)
    for calls in traces.values():
        idx, w = calls[-1]
        weights.scatter_add_(1, idx, w)
        top1.scatter_add_(1, idx[:, :1], torch.ones(idx.shape[0], 1))
    n = len(traces)
    return (weights / n).view(b, t, n_exp), (top1 / n).view(b, t, n_exp)
