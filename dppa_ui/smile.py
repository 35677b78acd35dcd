"""SMILE upscaling (methods/smile.py): build a SMILE model from a config, save it as a folder (its
format: smile_model.py, which also loads it back), and see its routing on chat replies and domains
(which expert each token went to; how often a domain's tokens reach its own fine-tune's expert).

    model, tok = dppa_ui.smile.build("upscale.yaml")      # a transformers model, in memory
    dppa_ui.smile.save(model, tok, "out/smile")
    model, tok = dppa_ui.smile_model.load("out/smile")    # no trust_remote_code
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import io
from .io import DTYPES
from .chat import prompt_ids, to_messages
from .config import ConfigError, MergeConfig, load_config
from .engine import CONFIG_FILE, MergeResult
from .evaluation import by_domain, encode_item, model_domain, pad_id
from .methods.dp import block_of
from .methods.smile import is_projection, linear_weight, smile_embedding, smile_linear
from .pipeline import dominant_float_dtype, merge_tensor
from .refs import resolve_model
from .smile_model import FORMAT, SMILE_CONFIG, SMILE_WEIGHTS, VERSION, parameter_count, position_routing


# ------------------------------------------------------------------------------------ building

def _arch(base_dir: Path):
    """The base architecture on the meta device (no weights read): to find its projections."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def targets(model: nn.Module, scope: str = "blocks") -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) in Linear orientation of every module SMILE upscales: the nn.Linear /
    Conv1D projections inside numbered blocks ("blocks", the paper), plus the input embeddings
    ("embeddings"; an embedding is a linear map of the one-hot token), plus every other projection
    such as lm_head ("all")."""
    out = {}
    inputs = model.get_input_embeddings() if scope != "blocks" else None
    for name, module in model.named_modules():
        if is_projection(module) and (scope == "all" or block_of(name + ".") is not None):
            out[name] = tuple(linear_weight(module).shape)
        elif inputs is not None and module is inputs:
            out[name] = tuple(module.weight.shape[::-1])
    return out


def check(cfg: MergeConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse ranks a projection cannot hold (before any tensor is read)."""
    if not shapes:
        raise ConfigError("SMILE found no nn.Linear / Conv1D projection inside the model's numbered blocks")
    for key, rank in (("rank_of_expert", cfg.get("rank_of_expert")), ("rank_of_router", cfg.get("rank_of_router"))):
        if rank is None:
            continue
        for name, (o, i) in shapes.items():
            if rank > min(o, i):
                raise ConfigError(f"`parameters.{key}` = {rank} is larger than {name} ({o} x {i}) allows "
                                  f"(at most {min(o, i)}); lower it" + (" or use `full`" if key == "rank_of_expert" else ""))


def _domains(cfg: MergeConfig, dirs: Sequence[Path]) -> list[str | None]:
    out = []
    for m, d in zip(cfg.models, dirs):
        dom = m.domain or model_domain(d)
        out.append(dom if isinstance(dom, str) or dom is None else ",".join(dom))
    return out


def build(config, device: str | torch.device = "cpu", base_sd: dict | None = None,
          ft_sds: Sequence[dict] | None = None, log=None, progress=None, cancel=None) -> tuple[nn.Module, object]:
    """The SMILE model of a `merge_method: smile` config, in memory: (model, tokenizer), float32,
    eval mode (tokenizer None for a checkpoint without tokenizer files). `base_sd` / `ft_sds` (aligned with the config's models) spare the reads when the
    caller holds them. Bad ranks are refused before any tensor is read. `progress(done, total)`
    is called after each upscaled layer; `cancel()`, polled before each, stops the build
    (InterruptedError)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if cfg.upscale != "smile":
        raise ConfigError("dppa_ui.smile.build needs `merge_method: smile`")
    base_dir = resolve_model(cfg.base_model)
    dirs = [resolve_model(m.model) for m in cfg.models]
    shapes = targets(_arch(base_dir), cfg.get("smile_scope"))
    check(cfg, shapes)
    log = log or (lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    base_sd = base_sd if base_sd is not None else io.read_state_dict(base_dir)
    ft_sds = list(ft_sds) if ft_sds is not None else [io.read_state_dict(d) for d in dirs]
    device = torch.device(device)
    model.to(device)
    modules = dict(model.named_modules())
    weights = {f"{n}.weight" for n in shapes} | {f"{n}.bias" for n in shapes}
    upscaled = []
    # Everything but the projections: the base's (as FusionBench keeps them), or task arithmetic of the
    # fine-tunes through the pipeline with the config read as the task_arithmetic preset (same models
    # and weights: the deltas are summed, each times its weight, then times lambda).
    others = dataclasses.replace(cfg, merge_method="task_arithmetic", prune="none", amplify="none", combine="sum")
    with torch.no_grad():
        own = model.state_dict()
        for name, t in own.items():
            if name in weights or name not in base_sd:
                continue
            if cfg.get("smile_others") == "task_arithmetic":
                t.copy_(merge_tensor(others, name, base_sd[name].to(device), [sd[name] for sd in ft_sds]))
            else:
                t.copy_(base_sd[name])
        for k, name in enumerate(shapes):
            if cancel is not None and cancel():
                raise InterruptedError("upscale cancelled")
            if progress is not None and k:
                progress(k, len(shapes))
            base = modules[name]
            embedding = isinstance(base, nn.Embedding)
            w0 = base.weight.detach().float() if embedding else linear_weight(base).detach().float()
            deltas = [(sd[f"{name}.weight"].float() if embedding else _oriented(sd[f"{name}.weight"], base)).to(device)
                      - w0 for sd in ft_sds]
            if not any(bool(d.any()) for d in deltas):
                log(f"smile: {name} is the same in every fine-tune; kept as the base's")
                continue
            if embedding:
                layer = smile_embedding(base, deltas, cfg.get("rank_of_expert"), cfg.get("rank_of_router"), cfg.get("num_experts_per_tok"))
            else:
                bias_deltas = None
                if base.bias is not None:
                    bias_deltas = [sd[f"{name}.bias"].to(device).float() - base.bias.float() for sd in ft_sds]
                layer = smile_linear(base, deltas, bias_deltas, cfg.get("rank_of_expert"), cfg.get("rank_of_router"),
                                     cfg.get("num_experts_per_tok"))
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, layer)
            upscaled.append(name)
            log(f"smile: {name} ({k + 1}/{len(shapes)})")
        if progress is not None:
            progress(len(shapes), len(shapes))
    model.smile = {"format": FORMAT, "version": VERSION, "base_model": cfg.base_model,
                   "experts": [m.model for m in cfg.models], "domains": _domains(cfg, dirs),
                   "rank_of_expert": "full" if cfg.get("rank_of_expert") is None else cfg.get("rank_of_expert"),
                   "rank_of_router": cfg.get("rank_of_router"), "num_experts_per_tok": cfg.get("num_experts_per_tok"),
                   "smile_others": cfg.get("smile_others"), "smile_scope": cfg.get("smile_scope"), "modules": upscaled,
                   "embeddings": [n for n in upscaled if isinstance(modules[n], nn.Embedding)],
                   "orientation": "linear (out x in), Conv1D weights transposed"}
    model.smile_cfg = cfg
    tok_dir = resolve_model(cfg.tokenizer_source) if cfg.tokenizer_source else base_dir
    tok = None          # a bare checkpoint without tokenizer files (tests) gets none
    if any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        if cfg.chat_template:
            tok.chat_template = cfg.chat_template
    return model, tok


def _oriented(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A checkpoint weight of `module` in Linear orientation."""
    return weight.float() if isinstance(module, nn.Linear) else weight.float().t()


# ----------------------------------------------------------------------------- save and load

def save(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None
         ) -> Path:
    """Write a SMILE folder (see the module doc), atomically; `dtype` defaults to the config's
    output dtype, else the base's."""
    from safetensors.torch import save_model

    spec, cfg = model.smile, model.smile_cfg
    base_dir = resolve_model(cfg.base_model)
    if dtype is None:
        with io.CheckpointReader(base_dir) as r:
            dtype = DTYPES[cfg.dtype] if cfg.dtype else (dominant_float_dtype(r.dtype(n) for n in r.names)
                                                         or torch.float32)
    out = Path(out)
    with io.atomic_output_dir(out, overwrite=overwrite) as tmp:
        io.copy_model_files(base_dir, tmp, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        original = next(model.parameters()).dtype
        try:
            model.to(dtype)
            save_model(model, str(tmp / SMILE_WEIGHTS), metadata={"format": "pt", "dppa_ui": FORMAT})
        finally:
            model.to(original)
        counts = parameter_count(model)
        (tmp / SMILE_CONFIG).write_text(json.dumps({**spec, "dtype": io.dtype_name(dtype), "parameters": counts},
                                                   indent=2) + "\n")
        yaml_text = cfg.to_yaml()
        (tmp / CONFIG_FILE).write_text(yaml_text)
        io.write_model_card(tmp, base_ref=cfg.base_model, model_refs=[m.model for m in cfg.models], method="smile",
                            seed=cfg.seed, yaml_text=yaml_text,
                            extra={"rank_of_expert": spec["rank_of_expert"], "rank_of_router": spec["rank_of_router"],
                                   "num_experts_per_tok": spec["num_experts_per_tok"],
                                   "parameters": f"{counts['total']:,} (a plain merge: {counts['plain']:,})",
                                   "format": "SMILE folder: load with dppa_ui.smile_model.load(path), not "
                                             "AutoModelForCausalLM"})
    return out


# ------------------------------------------------------------------------------------- routing

def reply_routing(model: nn.Module, tokenizer, history, message: str, reply: str,
                  system_prompt: str | None = None) -> list[dict]:
    """Per token of a chat reply (as `chat.chat_stream` produced it for this history and message),
    the experts that produced it:

        [{"token": "c", "expert": 2, "name": "demo:sort", "weights": [w per expert],
          "share": [share of layers whose top pick it is, per expert]}, ...]

    `weights` are the routing weights averaged over the SMILE layers at the position that
    predicted the token (they sum to 1); `expert` is the largest."""
    spec = getattr(model, "smile", {})
    ids, _ = prompt_ids(model, tokenizer, to_messages(history, message, system_prompt), 1)
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    if not reply_ids:
        return []
    full = torch.cat([ids, torch.tensor([reply_ids])], dim=1)
    weights, share = position_routing(model, full)
    start = ids.shape[1] - 1            # position p predicts token p + 1
    names = spec.get("experts") or [f"expert {i}" for i in range(weights.shape[-1])]
    out = []
    for j, tid in enumerate(reply_ids):
        w = weights[0, start + j]
        e = int(w.argmax())
        out.append({"token": tokenizer.decode([tid]), "expert": e, "name": names[e], "weights": w.tolist(),
                    "share": share[0, start + j].tolist()})
    return out


def routing_accuracy(model: nn.Module, tokenizer, items: Sequence[dict], expert_domains: Sequence[str] | None = None,
                     batch_size: int = 256, positions: str = "all") -> dict[str, dict]:
    """How often a domain's tokens go to its own fine-tune's expert, teacher-forced over prompt and
    answer of every item: {domain: {"decisions": share of (layer, token) top-1 picks that are the
    domain's expert, "items": share of items whose most picked expert it is, "n": items}}.
    `positions`: "all" (every token of prompt and answer) or "answer" (the positions that predict
    the answer tokens, the ones scoring looks at). `expert_domains` (each expert's domain) default
    to the model's own record (demo fine-tunes know theirs); domains without an expert are left out."""
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    doms = list(expert_domains if expert_domains is not None else getattr(model, "smile", {}).get("domains") or [])
    pad = pad_id(tokenizer)
    out = {}
    for domain, its in by_domain(items).items():
        if domain not in doms:
            continue
        e = doms.index(domain)
        hits = total = good_items = 0
        for i in range(0, len(its), batch_size):
            enc = [encode_item(tokenizer, it["prompt"], it["answer"]) for it in its[i:i + batch_size]]
            n = max(len(p) + len(a) for p, a in enc)
            ids = torch.full((len(enc), n), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), n), dtype=torch.long)
            real = torch.zeros((len(enc), n), dtype=torch.bool)
            for j, (p, a) in enumerate(enc):
                ids[j, :len(p) + len(a)] = torch.tensor(p + a)
                mask[j, :len(p) + len(a)] = 1
                real[j, (len(p) - 1 if positions == "answer" else 0):len(p) + len(a) - (positions == "answer")] = True
            _, top1 = position_routing(model, ids, mask)
            per_item = (top1 * real.unsqueeze(-1)).sum(1)              # (B, E) layer-picks per expert
            hits += float(per_item[:, e].sum())
            total += float(real.sum())
            good_items += int((per_item.argmax(1) == e).sum())
        out[domain] = {"decisions": hits / max(total, 1), "items": good_items / len(its), "n": len(its)}
    return out


# ------------------------------------------------------------------------------------ CLI path

def upscale(cfg: MergeConfig, out, *, device: torch.device, overwrite: bool = False, dry_run: bool = False,
            log=None, allow_pickle: bool = False, shard_bytes: int = 0, t0: float | None = None,
            progress=None, cancel=None):
    """`python -m dppa_ui merge` for `merge_method: smile`: build and save the SMILE folder (or,
    with dry_run, check the ranks and report the size without reading a tensor)."""
    t0 = time.perf_counter() if t0 is None else t0
    log = log or (lambda s: print(s, file=sys.stderr))
    base_dir = resolve_model(cfg.base_model, allow_pickle=allow_pickle)
    for m in cfg.models:
        resolve_model(m.model, allow_pickle=allow_pickle)
    arch = _arch(base_dir)
    shapes = targets(arch, cfg.get("smile_scope"))
    check(cfg, shapes)
    plain = sum(p.numel() for p in arch.parameters())
    n = len(cfg.models)
    extra = 0
    for o, i in shapes.values():
        k = min(o, i) if cfg.get("rank_of_expert") is None else cfg.get("rank_of_expert")
        extra += n * (k * (o + i) + cfg.get("rank_of_router") * i)
    plan = "\n".join([f"method: smile (rank_of_expert={cfg.get('rank_of_expert') or 'full'}, rank_of_router="
                      f"{cfg.get('rank_of_router')}, num_experts_per_tok={cfg.get('num_experts_per_tok')}, "
                      f"smile_others={cfg.get('smile_others')})",
                      f"base: {cfg.base_model} -> {base_dir}",
                      *[f"expert {k}: {m.model}" for k, m in enumerate(cfg.models)],
                      f"upscaled projections: {len(shapes)}",
                      f"parameters: about {plain + extra:,} (a plain merge: {plain:,}; experts and routers "
                      f"add {extra:,}, biases not counted)"])
    if dry_run:
        return MergeResult(out=None, seconds=time.perf_counter() - t0, device=str(device), tensors=len(shapes),
                           params=plain + extra, kept_fraction=[], config=cfg, notices=cfg.notices, report=plan)
    if out is None:
        raise ValueError("an output folder is needed (--out DIR)")
    model, tok = build(cfg, device=device, log=log, progress=progress, cancel=cancel)
    path = save(model, tok, out, overwrite=overwrite)
    counts = parameter_count(model)
    return MergeResult(out=path, seconds=time.perf_counter() - t0, device=str(device),
                       tensors=len(model.smile["modules"]), params=counts["total"], kept_fraction=[], config=cfg,
                       notices=cfg.notices, report=plan)
