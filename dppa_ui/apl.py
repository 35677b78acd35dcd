"""APL around its math (methods/apl.py): each fine-tune's task data and loss, importance computed
once and cached, the density maps and merge weights a merge needs, and the tables the app shows.

Task data of a fine-tune: `apl_data` (a JSONL of {"prompt", "answer"} lines), else its `domain:`
or, for a demo model, its own domain's dev split; the first `apl_examples` items are used. A model
with none of these is refused before anything is computed.

Importance is cached per (base checkpoint, fine-tune checkpoint, data, number of examples, level,
kind): in memory, and on disk under io.cache_root()/apl (DPPA_UI_CACHE_DIR, default ~/.cache/dppa-ui), keyed by the
checkpoint files' identity (refs.files_identity: name, size, mtime) and the examples' content, so a
changed checkpoint or data file is recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import evaluation, io, modelbuild
from .config import ConfigError, MergeConfig
from .methods.apl import (APLDensity, density_map, gradient_importance, importance_weights, intervention_importance,
                          partition_groups)
from .methods.dp import block_of, module_of
from .refs import files_identity, resolve_model
from .registry import APL_EXAMPLES_DEFAULT as APL_EXAMPLES

APL_FILE = "dppa_apl.json"     # what a merge with `prune: apl` writes beside its weights (`report`)
CACHE_ENV = io.CACHE_ENV      # the folder is io.cache_root(); tests point it elsewhere
_FORMAT = 1
_MEMORY: dict[str, "Importance"] = {}
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------ task data

@dataclass
class TaskData:
    items: list[dict]
    source: str                 # what the items are, for reports ("demo dev split: reverse", a path)

    @property
    def identity(self) -> str:
        """The items' content hash: what the cache key holds for them."""
        blob = json.dumps([[it["prompt"], it["answer"]] for it in self.items])
        return hashlib.sha256(blob.encode()).hexdigest()


def task_data(model_dir: str | Path, ref: str | None = None, apl_data: str | None = None,
              domain: str | Sequence[str] | None = None, examples: int = APL_EXAMPLES) -> TaskData:
    """The first `examples` items of the fine-tune's own task (see the module doc). Raises
    ConfigError, naming the model and the fix, when there is none."""
    label = ref or str(model_dir)
    if apl_data is not None:
        path = Path(apl_data).expanduser()
        if not path.is_file():
            raise ConfigError(f"`apl_data` of {label}: {apl_data!r} is not a file; give a JSONL of "
                              f'{{"prompt": ..., "answer": ...}} lines from the fine-tune\'s own task')
        return TaskData(evaluation.load_suite(path)[:examples], str(path))
    domains = domain or evaluation.model_domain(model_dir)
    if not domains:
        raise ConfigError(f"APL needs a few examples of {label}'s own task: give it `apl_data: FILE.jsonl` "
                          f'(lines of {{"prompt": ..., "answer": ...}}) under its parameters '
                          f"(demo models use their domain's dev split)")
    domains = [domains] if isinstance(domains, str) else list(domains)
    items = evaluation.load_suite("zoo", "dev", domains=domains)
    return TaskData(items[:examples], f"demo dev split: {', '.join(domains)}")


def check_data(cfg: MergeConfig, ft_dirs: Sequence[Path]) -> list[TaskData]:
    """Every fine-tune's task data, resolved before any compute (refuses the first one missing)."""
    return [task_data(d, m.model, m.get("apl_data"), m.domain, cfg.get("apl_examples"))
            for m, d in zip(cfg.models, ft_dirs)]


# ------------------------------------------------------------------------------------ importance

@dataclass
class Importance:
    """One fine-tune's importance at one level and kind (see methods/apl.py)."""
    level: str                          # "block" | "module" | "row"
    kind: str                           # "exact" | "gradient"
    gradient_at: str | None             # gradient: where ∇L is taken
    values: dict                        # block number or tensor name -> float (row: tensor name -> tensor)
    loss_finetune: float                # L_t(Θ_t) on the examples
    loss_base: float                    # L_t(Θ_b): the model-level intervention, the whole delta removed
    model_gradient: float | None = None  # gradient: −Δ·∇L over the whole model
    examples: int = 0
    data: str = ""
    seconds: float = 0.0
    cached: str = field(default="", compare=False)      # "", "memory" or "disk"

    @property
    def model_exact(self) -> float:
        """I_model = L_t(Θ_b) − L_t(Θ_t): what the whole delta is worth on the task."""
        return self.loss_base - self.loss_finetune


def cache_dir() -> Path:
    return io.cache_root() / "apl"


def _key(base_dir, ft_dir, data: TaskData, level: str, kind: str, at: str | None) -> str:
    blob = json.dumps({"format": _FORMAT, "base": files_identity(base_dir), "ft": files_identity(ft_dir),
                       "data": data.identity, "n": len(data.items), "level": level, "kind": kind, "at": at},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save(key: str, imp: Importance) -> None:
    from safetensors.torch import save_file

    if imp.level == "row":
        tensors = {f"rows::{n}": v.to(torch.float64).contiguous() for n, v in imp.values.items()}
        keys = list(imp.values)
    else:
        keys = list(imp.values)
        tensors = {"values": torch.tensor([imp.values[k] for k in keys], dtype=torch.float64)}
    meta = {"level": imp.level, "kind": imp.kind, "gradient_at": imp.gradient_at, "keys": keys,
            "loss_finetune": imp.loss_finetune, "loss_base": imp.loss_base, "model_gradient": imp.model_gradient,
            "examples": imp.examples, "data": imp.data, "seconds": imp.seconds}
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        save_file(tensors or {"values": torch.zeros(0, dtype=torch.float64)}, tmp,
                  metadata={"apl": json.dumps(meta)})
        os.replace(tmp, folder / f"{key}.safetensors")
    except OSError as e:              # a read-only home is no reason to fail the merge
        warnings.warn(f"APL importance not cached on disk ({e})", stacklevel=3)


def _load(key: str) -> Importance | None:
    from safetensors import safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["apl"])
            if meta["level"] == "row":
                values = {k: f.get_tensor(f"rows::{k}") for k in meta["keys"]}
            else:
                raw = f.get_tensor("values").tolist()
                values = {(int(k) if meta["level"] == "block" else k): v for k, v in zip(meta["keys"], raw)}
    except Exception:                 # a damaged cache file is recomputed, never trusted
        return None
    return Importance(level=meta["level"], kind=meta["kind"], gradient_at=meta["gradient_at"], values=values,
                      loss_finetune=meta["loss_finetune"], loss_base=meta["loss_base"],
                      model_gradient=meta["model_gradient"], examples=meta["examples"], data=meta["data"],
                      seconds=meta["seconds"], cached="disk")


def importance(base_dir: str | Path, ft_dir: str | Path, data: TaskData, level: str = "module",
               kind: str = "exact", gradient_at: str = "midpoint", device: str | torch.device = "cpu",
               use_cache: bool = True) -> Importance:
    """Importance of every partition of the fine-tune at `ft_dir` at `level`: "exact" (the causal
    intervention, one forward per partition) or "gradient" (−Δ·∇L, one backward), computed once
    per (checkpoints, data, level, kind) and cached. The model-level intervention (the whole delta
    removed) comes with every result."""
    import time

    if kind == "exact" and level == "row":
        raise ValueError("exact importance at the row level needs one forward pass per row; use kind='gradient'")
    at = gradient_at if kind == "gradient" else None
    key = _key(base_dir, ft_dir, data, level, kind, at)
    if use_cache:
        with _LOCK:
            hit = _MEMORY.get(key)
        if hit is None:
            hit = _load(key)
            if hit is not None:
                with _LOCK:
                    _MEMORY[key] = hit
        if hit is not None:
            return hit if hit.cached else dataclasses.replace(hit, cached="memory")
    t0 = time.perf_counter()
    model, tok = modelbuild.load(ft_dir, placed=False)
    model.to(device)
    base = {n: t.float() for n, t in io.read_state_dict(base_dir).items() if t.is_floating_point()}
    names = [n for n, _ in model.named_parameters() if n in base]
    shapes = {n: tuple(base[n].shape) for n in names}
    groups = partition_groups(shapes, level)
    items = data.items

    def loss(m):
        return evaluation.answer_loss(m, tok, items)

    whole = intervention_importance(model, loss, base, {"model": names})["model"]
    with torch.no_grad():
        loss_ft = float(loss(model))
    model_grad = None
    if kind == "exact":
        values = intervention_importance(model, loss, base, groups)
    else:
        values, model_grad = gradient_importance(model, loss, base, groups, at=gradient_at, rows=(level == "row"))
    imp = Importance(level=level, kind=kind, gradient_at=at, values=values, loss_finetune=loss_ft,
                     loss_base=loss_ft + whole, model_gradient=model_grad, examples=len(items), data=data.source,
                     seconds=time.perf_counter() - t0)
    if use_cache:
        with _LOCK:
            _MEMORY[key] = imp
        _save(key, imp)
    return imp


# --------------------------------------------------------------------------------- merge inputs

@dataclass
class APLInputs:
    """What a merge with `prune: apl` needs, aligned with cfg.models."""
    maps: list[dict[str, APLDensity]]       # per fine-tune: tensor name -> its density (and row densities)
    weights: list[float]                    # the merge weights APL gives (1.0 each without apl_weights)
    importance: list[Importance]


def folders(cfg: MergeConfig) -> tuple[Path, list[Path]]:
    """The local folders of the config's base and fine-tunes."""
    return resolve_model(cfg.base_model), [resolve_model(m.model) for m in cfg.models]


def merge_inputs(cfg: MergeConfig, shapes: dict[str, tuple] | None = None, base_dir: Path | None = None,
                 ft_dirs: Sequence[Path] | None = None, device: str | torch.device = "cpu") -> APLInputs:
    """Importance of each fine-tune (cached), turned into density maps around each model's density
    and, with `apl_weights`, into merge weights. Folders default to the config's refs; `shapes`
    (tensor name -> shape) to the base checkpoint's."""
    if base_dir is None or ft_dirs is None:
        base_dir, ft_dirs = folders(cfg)
    data = check_data(cfg, ft_dirs)
    if shapes is None:
        with io.CheckpointReader(base_dir) as r:
            shapes = {n: tuple(r.shape(n)) for n in r.names if r.dtype(n).is_floating_point}
    kind = cfg.apl_importance_kind
    imps = [importance(base_dir, d, td, cfg.get("apl_level"), kind, cfg.get("apl_gradient_at"), device)
            for d, td in zip(ft_dirs, data)]
    maps = [density_map(imp.values, shapes, cfg.get("apl_level"), m.get("density"), cfg.get("apl_lambda"))
            for imp, m in zip(imps, cfg.models)]
    weights = importance_weights([imp.model_exact for imp in imps]) if cfg.get("apl_weights") else [1.0] * len(imps)
    return APLInputs(maps=maps, weights=weights, importance=imps)


def weighted(cfg: MergeConfig, weights: Sequence[float]) -> MergeConfig:
    """A copy of `cfg` whose model weights are multiplied by APL's merge weights (the config the
    tensors are merged with; the saved YAML keeps the original, which recomputes the same weights)."""
    import copy

    out = copy.deepcopy(cfg)
    for m, w in zip(out.models, weights):
        m.settings["weight"] = m.get("weight") * w
    return out


def report(cfg: MergeConfig, plan: "APLInputs") -> dict:
    """What dppa_apl.json records: per fine-tune its task data, losses, merge weight, and every
    partitioned tensor's importance (exact or gradient; row level: summed per tensor) and density."""
    out = {"level": cfg.get("apl_level"), "importance": cfg.apl_importance_kind, "examples": cfg.get("apl_examples"),
           "apl_lambda": cfg.get("apl_lambda"), "drop": cfg.get("apl_drop"), "models": []}
    for m, imp, dmap, w in zip(cfg.models, plan.importance, plan.maps, plan.weights):
        values = {str(k): (float(v.sum()) if isinstance(v, torch.Tensor) else float(v)) for k, v in imp.values.items()}
        out["models"].append({"model": m.model, "data": imp.data, "loss_finetune": imp.loss_finetune,
                              "loss_base": imp.loss_base, "merge_weight": w, "importance": values,
                              "density": {n: d.density for n, d in dmap.items()}})
    return out


# ---------------------------------------------------------------------------------- app tables

def importance_table(base: str | Path, finetune: str | Path, data: str | None = None,
                     examples: int = APL_EXAMPLES, gradient_at: str = "midpoint", density: float | None = None,
                     apl_lambda: float = 0.5, domain: str | None = None, device: str = "cpu",
                     progress: Callable[[int, int, str], None] | None = None) -> dict:
    """The APL importance map of one fine-tune, blocks x module types, exact intervention and its
    gradient approximation side by side (each computed once and cached):

        {"blocks": [0, 1, ...], "modules": ["self_attn.q_proj", ...],
         "exact": [[I or None per module] per block], "gradient": [[...]],
         "block_exact": [I per block], "block_gradient": [...],
         "model_exact": L(base) − L(fine-tune), "loss_finetune": float, "loss_base": float,
         "density": [[d per module] per block] or None (APL's module densities at `density`),
         "examples": n, "data": "demo dev split: reverse", "seconds": compute time (0 when cached)}

    None marks a (block, module) the model does not have. `data` is an apl_data JSONL path.
    `progress(step, 3, what)` is called before each of the three importance computations."""
    base_dir, ft_dir = resolve_model(str(base)), resolve_model(str(finetune))
    td = task_data(ft_dir, str(finetune), data, domain, examples)
    tick = progress or (lambda step, total, what: None)
    tick(0, 3, "exact intervention per module")
    exact_m = importance(base_dir, ft_dir, td, "module", "exact", device=device)
    tick(1, 3, "exact intervention per block")
    exact_b = importance(base_dir, ft_dir, td, "block", "exact", device=device)
    tick(2, 3, "gradient approximation")
    grad = importance(base_dir, ft_dir, td, "module", "gradient", gradient_at, device=device)
    names = list(exact_m.values)
    blocks = sorted({block_of(n) for n in names})
    modules = list(dict.fromkeys(module_of(n) for n in names))
    where = {(block_of(n), module_of(n)): n for n in names}

    def grid(values):
        return [[(float(values[where[(b, t)]]) if (b, t) in where else None) for t in modules] for b in blocks]

    grad_block = {b: sum(float(grad.values[n]) for n in names if block_of(n) == b) for b in blocks}
    dens = None
    if density is not None:
        with io.CheckpointReader(base_dir) as r:
            shapes = {n: tuple(r.shape(n)) for n in names}
        dmap = density_map(exact_m.values, shapes, "module", density, apl_lambda)
        dens = grid({n: dmap[n].density for n in names})
    fresh = [i.seconds for i in (exact_m, exact_b, grad) if not i.cached]
    return {"blocks": blocks, "modules": modules, "exact": grid(exact_m.values), "gradient": grid(grad.values),
            "block_exact": [float(exact_b.values[b]) for b in blocks],
            "block_gradient": [grad_block[b] for b in blocks],
            "model_exact": exact_m.model_exact, "loss_finetune": exact_m.loss_finetune,
            "loss_base": exact_m.loss_base, "density": dens, "examples": exact_m.examples,
            "data": exact_m.data, "seconds": sum(fresh)}
