"""The streaming merge engine: inputs read lazily tensor by tensor, merged on the chosen device,
written straight into pre-planned safetensors shards.

Data flow for one merge (nothing else is held in memory):
  resolve refs -> open readers (headers only) -> check compatibility -> [DP: two statistics
  passes] -> for each tensor name: read base + fine-tunes (prefetched by a thread) -> pipeline
  -> write at its offset (a second thread) -> copy config/tokenizer -> card + YAML -> rename.
Peak memory is about (n_models + 2) x the largest tensor in float32 plus one prefetched set of
raw inputs and one pending output, whatever the depth of the model.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import io
from .config import MergeConfig, load_config
from .pipeline import (Scratch, dominant_float_dtype, dp_maps_from_stats, kept_fraction, merge_state_dicts, merge_tensor,
                       output_dtype)
from .stats import DeltaStats, collect_stats, save_stats

STATS_FILE = "dppa_stats.json"
APL_FILE = "dppa_apl.json"
CONFIG_FILE = "dppa_merge.yaml"
# CPU throughput (delta entries per second, all fine-tunes together) measured on 2 cores at 0.5 B
# parameters (benchmarks/merge_speed.py), used only for --dry-run's rough time estimate.
_EST_RATE = {"none": 3e8, "magnitude": 7.5e7, "random": 1.2e8, "dp": 6e7, "apl": 7.5e7, "pcb": 2.7e7}


@dataclass
class MergeResult:
    out: Path | None
    seconds: float
    device: str
    tensors: int
    params: int
    kept_fraction: list[float]                       # per fine-tune: delta entries kept by the prune
    config: MergeConfig
    notices: list[str] = field(default_factory=list)
    alpha_search: dict[str, dict] = field(default_factory=dict)   # model -> {alpha, score, path}
    lambda_search: dict = field(default_factory=dict)              # {weights, score, evaluations}
    plan: str = ""                                   # the dry-run report


def tune_allocator() -> None:
    """Keep freed work buffers in the heap instead of returning them to the OS (glibc only).

    A merge allocates and frees the same few buffer sizes for every tensor; glibc hands each
    block over 128 KB back with munmap, so the next tensor page-faults it in again (half the
    merge time on CPU). Raising the mmap and trim thresholds to their caps keeps them.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)     # M_MMAP_THRESHOLD: its 64-bit maximum
        libc.mallopt(-1, 1 << 30)              # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class _Inputs:
    """The opened base and fine-tune checkpoints, with the shapes to merge."""

    def __init__(self, cfg: MergeConfig, allow_pickle: bool, allow_vocab_trim: bool):
        self.base_dir = io.resolve_model(cfg.base_model, allow_pickle=allow_pickle)
        self.model_dirs = [io.resolve_model(m.model, allow_pickle=allow_pickle) for m in cfg.models]
        self.base = io.CheckpointReader(self.base_dir, allow_pickle=allow_pickle)
        self.fts = [io.CheckpointReader(d, allow_pickle=allow_pickle) for d in self.model_dirs]
        self.shapes = io.check_compatible(self.base, {m.model: r for m, r in zip(cfg.models, self.fts)},
                                          allow_vocab_trim=allow_vocab_trim)
        self.names = list(self.shapes)
        self.n_params = sum(torch.Size(sh).numel() for sh in self.shapes.values())

    def vocab_override(self) -> dict | None:
        """config.json's vocab_size after --allow-vocab-trim cut the embedding rows."""
        trimmed = [s[0] for n, s in self.shapes.items() if s != tuple(self.base.shape(n))]
        return {"vocab_size": min(trimmed)} if trimmed else None

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rows = self.shapes[name][0] if self.shapes[name] != tuple(self.base.shape(name)) else None
        get = (lambda r: r.get(name, rows=rows)) if rows is not None else (lambda r: r.view(name))
        return get(self.base), [get(r) for r in self.fts]

    def close(self):
        for r in [self.base, *self.fts]:
            r.close()


def _plan_report(cfg: MergeConfig, inputs: _Inputs, out_dtype: torch.dtype, device: torch.device) -> tuple[str, int]:
    n_params = inputs.n_params
    largest = max(torch.Size(s).numel() for s in inputs.shapes.values())
    disk = n_params * out_dtype.itemsize
    n = len(cfg.models)
    mem = (n + 2) * largest * 4 + (n + 1) * largest * 4      # working set + prefetched inputs
    rate = _EST_RATE["pcb" if cfg.combine == "pcb" else cfg.prune]
    secs = n_params * n / rate * (0.1 if device.type == "cuda" else 1)
    lines = [f"method: {cfg.method_name} (prune={cfg.prune}, amplify={cfg.amplify}, combine={cfg.combine})",
             f"base: {cfg.base_model} -> {inputs.base_dir}"]
    for m, d in zip(cfg.models, inputs.model_dirs):
        extra = f", partitions={m.partitions}, amplification={m.amplification}" if cfg.amplify == "dpa" else ""
        lines.append(f"model: {m.model} -> {d} (weight={m.weight}, density={m.density}{extra})")
    lines += [f"parameters: lambda={cfg.lambda_}, normalize={cfg.normalize}, seed={cfg.seed}"
              + (f", dp_lambda={cfg.dp_lambda}, dp_outlier_m={cfg.dp_outlier_m}, dp_others={cfg.dp_others}"
                 if cfg.prune == "dp" else "")
              + (f", apl_level={cfg.apl_level}, apl_importance={cfg.apl_importance_kind}, "
                 f"apl_examples={cfg.apl_examples}, apl_lambda={cfg.apl_lambda}, apl_drop={cfg.apl_drop}, "
                 f"apl_weights={cfg.apl_weights}, apl_others={cfg.apl_others}" if cfg.prune == "apl" else "")
              + (f", dpa_whole={cfg.dpa_whole}" if cfg.amplify == "dpa" else "")
              + (f", pcb_ratio={cfg.pcb_ratio}, clip_ratio={cfg.clip_ratio}, scope={cfg.scope}"
                 if cfg.combine == "pcb" else ""),
              f"tensors: {len(inputs.names)} ({n_params:,} parameters), output dtype {str(out_dtype).split('.')[-1]}",
              f"device: {device}",
              f"estimated peak memory: {mem / 1e9:.2f} GB; disk: {disk / 1e9:.2f} GB; time: ~{secs:.0f} s (rough)"]
    lines += [f"tensor {name} {list(shape)}" for name, shape in inputs.shapes.items()]
    return "\n".join(lines), disk


def search_amplification(cfg: MergeConfig, base_dir: Path, model_dirs: list[Path],
                         log: Callable[[str], None] = print, max_evals: int = 60,
                         loaded: tuple[dict, list[dict]] | None = None,
                         stats: list[DeltaStats] | None = None) -> dict[str, dict]:
    """Resolve `amplification: auto`: DPPA's greedy alpha walk (search.alpha_search), per
    fine-tune alone, on the dev split of its domain, scoring the pruned fine-tune against the
    unpruned one. Sets each model's amplification; returns {model: {alpha, score, path}}.

    `loaded` = (base state dict, fine-tunes' state dicts, aligned with cfg.models) and `stats`
    (their DeltaStats at cfg.dp_outlier_m) spare the reads when the caller (the app) holds them."""
    todo = [i for i, m in enumerate(cfg.models) if m.amplification == "auto"]
    if not todo:
        return {}
    from .search import alpha_search
    base_sd = loaded[0] if loaded else io.read_state_dict(base_dir)
    report = {}
    for i in todo:
        m = cfg.models[i]
        ft_sd = loaded[1][i] if loaded else io.read_state_dict(model_dirs[i])
        log(f"searching amplification for {m.model} (dev split)")
        res = alpha_search(cfg, i, base_dir, model_dirs[i], ft_sd=ft_sd, base_sd=base_sd,
                           stats=[stats[i]] if stats else None, max_evals=max_evals,
                           on_eval=lambda r: log(f"  alpha {list(r['params'].values())} -> {r['objective']:.4f}"))
        alpha = [round(v, 9) for v in res.values.values()]
        m.amplification = alpha
        path = [([round(v, 9) for v in r["params"].values()], r["objective"]) for r in res.rows if r["phase"] == "search"]
        report[m.model] = {"alpha": alpha, "score": res.objective, "path": path}
        log(f"  chose {alpha} (score {res.objective:.4f})")
    return report


def search_lambda(cfg: MergeConfig, base_dir: Path, model_dirs: list[Path],
                  log: Callable[[str], None] = print, loaded: tuple[dict, list[dict]] | None = None,
                  stats: list[DeltaStats] | None = None) -> dict:
    """Resolve `lambda: auto`: PCB's NGOpt search of one lambda_i (model weight) per model
    (search.lambda_search). Sets the weights and lambda 1; returns {weights, score, evaluations}."""
    if not cfg.lambda_auto:
        return {}
    from .search import lambda_search
    log("searching lambda per model (PCB: NGOpt, init 1.0, bounds [0.8, 1.3], budget 100; dev split)")
    res = lambda_search(cfg, base_dir, model_dirs, loaded=loaded, stats=stats)
    for m, w in zip(cfg.models, res.config.models):
        m.weight = w.weight
    cfg.lambda_, cfg.lambda_auto = 1.0, False
    log(f"  chose weights {[m.weight for m in cfg.models]} (score {res.objective:.4f})")
    return {"weights": [m.weight for m in cfg.models], "score": res.objective, "evaluations": len(res.rows)}


def write_model_files(out: Path, cfg: MergeConfig, base_dir: Path, dtype: torch.dtype, tokenizer_dir: Path | None,
                      kept: list[float], device: str, config_overrides: dict | None = None) -> None:
    """Everything of a merged model folder but the weights: the base's config (in `dtype`) and
    tokenizer (or `tokenizer_dir`'s), the merge YAML that reproduces it, and a model card."""
    io.copy_model_files(base_dir, out, dtype=dtype, tokenizer_dir=tokenizer_dir, chat_template=cfg.chat_template,
                        config_overrides=config_overrides)
    yaml_text = cfg.to_yaml()
    (out / CONFIG_FILE).write_text(yaml_text)
    io.write_model_card(out, base_ref=cfg.base_model, model_refs=[m.model for m in cfg.models],
                        method=cfg.method_name, seed=cfg.seed, yaml_text=yaml_text,
                        extra={"kept fraction": ", ".join(f"{k:.3f}" for k in kept), "device": device})


def merge(config, out: str | Path | None, *, device: str = "auto", seed: int | None = None,
          overwrite: bool = False, dry_run: bool = False, progress: bool | Callable[[int, int], None] = False,
          cancel: Callable[[], bool] | None = None, allow_pickle: bool = False, allow_vocab_trim: bool = False,
          shard_bytes: int = 5 * 10**9, log: Callable[[str], None] | None = None,
          stats: list[DeltaStats] | None = None) -> MergeResult:
    """Run a merge from a config (dict, YAML text or path) into the folder `out`.

    `progress`: True for a tqdm bar on stderr, or a callable(done, total). `cancel`: a callable
    polled between tensors; when it returns True the merge stops and nothing is left on disk.
    `stats`: the fine-tunes' DeltaStats (aligned with the config's models, at its dp_outlier_m)
    when the caller has them (the app's statistics cache): DP then skips its statistics passes.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    tune_allocator()
    cfg = load_config(config)
    if seed is not None:
        cfg.seed = int(seed)
    for note in cfg.notices:
        log(f"notice: {note}")
    dev = pick_device(device)
    if cfg.upscale == "smile":
        from . import smile
        return smile.upscale(cfg, out, device=dev, overwrite=overwrite, dry_run=dry_run, log=log,
                             allow_pickle=allow_pickle, shard_bytes=shard_bytes, t0=t0,
                             progress=progress if callable(progress) else None, cancel=cancel)
    inputs = _Inputs(cfg, allow_pickle, allow_vocab_trim)
    try:
        if cfg.prune == "apl":      # every fine-tune's task data, before anything is computed
            from . import apl
            apl.check_data(cfg, inputs.model_dirs)
        # The output dtype: the config's, else the base's (its most common floating dtype).
        out_dtype = output_dtype(cfg, dominant_float_dtype(inputs.base.dtype(n) for n in inputs.names) or torch.float32)
        report, disk = _plan_report(cfg, inputs, out_dtype, dev)
        if dry_run:
            return MergeResult(out=None, seconds=time.perf_counter() - t0, device=str(dev), tensors=len(inputs.names),
                               params=inputs.n_params,
                               kept_fraction=[], config=cfg, notices=cfg.notices, plan=report)
        if out is None:
            raise ValueError("an output folder is needed (--out DIR)")
        out = Path(out)
        io.check_free_disk(out.parent if not out.exists() else out, int(disk * 1.02) + (1 << 20))
        alpha_report = search_amplification(cfg, inputs.base_dir, inputs.model_dirs, log)
        lambda_report = search_lambda(cfg, inputs.base_dir, inputs.model_dirs, log)
        with io.atomic_output_dir(out, overwrite=overwrite) as tmp:
            result = _merge_to(cfg, inputs, tmp, dev, out_dtype, progress, cancel, shard_bytes, log, stats)
            tok_dir = io.resolve_model(cfg.tokenizer_source, allow_pickle=allow_pickle) if cfg.tokenizer_source else None
            write_model_files(tmp, cfg, inputs.base_dir, out_dtype, tok_dir, result.kept_fraction, str(dev),
                              config_overrides=inputs.vocab_override())
        result.out, result.seconds, result.alpha_search = out, time.perf_counter() - t0, alpha_report
        result.lambda_search = lambda_report
        return result
    finally:
        inputs.close()


def _merge_to(cfg: MergeConfig, inputs: _Inputs, tmp: Path, dev: torch.device, out_dtype: torch.dtype,
              progress, cancel, shard_bytes: int, log, stats: list[DeltaStats] | None = None) -> MergeResult:
    names = inputs.names
    float_names = [n for n in names if inputs.base.dtype(n).is_floating_point]
    passes = cfg.prune == "dp" and stats is None
    total = len(names) + (len(float_names) + sum(
        1 for n in float_names if len(inputs.shapes[n]) == 2) if passes else 0)
    bar, tick = _progress(progress, total)
    merge_cfg, apl_plan = cfg, None
    try:
        dp_maps = None
        if cfg.prune == "apl":
            from . import apl
            float_shapes = {n: inputs.shapes[n] for n in float_names}
            apl_plan = apl.plan(cfg, float_shapes, inputs.base_dir, inputs.model_dirs, device=dev)
            dp_maps, merge_cfg = apl_plan.maps, apl.weighted(cfg, apl_plan.weights)
            (tmp / APL_FILE).write_text(json.dumps(apl_report(cfg, apl_plan), indent=1))
            for m, w in zip(cfg.models, apl_plan.weights):
                log(f"apl: {m.model} merge weight x{w:.3f}")
        if cfg.prune != "dp":
            stats = None
        elif passes:
            stats = collect_stats(float_names, lambda n: _to(inputs.load(n), dev),
                                  [m.model for m in cfg.models], cfg.dp_outlier_m, progress=tick)
        if cfg.prune == "dp":
            dp_maps = dp_maps_from_stats(cfg, stats)
            save_stats(stats, tmp / STATS_FILE)
        if cfg.combine == "pcb" and cfg.scope == "model":
            base_sd, fts = {}, [{} for _ in cfg.models]
            for n in names:
                base_sd[n], ft_tensors = inputs.load(n)
                for sd, t in zip(fts, ft_tensors):
                    sd[n] = t
            merged = merge_state_dicts(base_sd, fts, cfg, device=dev, stats=stats, apl_plan=apl_plan)
            specs = [(n, tuple(merged[n].shape), merged[n].dtype) for n in names]
            with io.ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes) as w:
                for n in names:
                    w.write(n, merged[n])
                    tick(1)
        else:
            specs = [(n, inputs.shapes[n], out_dtype if inputs.base.dtype(n).is_floating_point
                      else inputs.base.dtype(n)) for n in names]
            with io.ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes) as w, \
                    ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
                scratch = Scratch()
                pending_read = reader.submit(inputs.load, names[0])
                pending_write = None
                for k, name in enumerate(names):
                    if cancel and cancel():
                        raise InterruptedError("merge cancelled")
                    base, fts = pending_read.result()
                    if k + 1 < len(names):          # overlap the next read with this tensor's math
                        pending_read = reader.submit(inputs.load, names[k + 1])
                    merged = merge_tensor(merge_cfg, name, base.to(dev), fts, dp_maps, out_dtype=out_dtype,
                                          scratch=scratch).to("cpu")
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer.submit(w.write, name, merged)
                    del base, fts, merged
                    tick(1)
                if pending_write is not None:
                    pending_write.result()
    finally:
        if bar is not None:
            bar.close()
    # Over the floating tensors only, as the app counts it: the others have no delta to prune.
    float_shapes = {n: sh for n, sh in inputs.shapes.items() if inputs.base.dtype(n).is_floating_point}
    return MergeResult(out=None, seconds=0.0, device=str(dev), tensors=len(names),
                       params=inputs.n_params,
                       kept_fraction=kept_fraction(cfg, float_shapes, dp_maps), config=cfg, notices=cfg.notices)


def apl_report(cfg: MergeConfig, plan) -> dict:
    """What dppa_apl.json records: per fine-tune its task data, losses, merge weight, and every
    partitioned tensor's importance (exact or gradient; row level: summed per tensor) and density."""
    out = {"level": cfg.apl_level, "importance": cfg.apl_importance_kind, "examples": cfg.apl_examples,
           "apl_lambda": cfg.apl_lambda, "drop": cfg.apl_drop, "models": []}
    for m, imp, dmap, w in zip(cfg.models, plan.importance, plan.maps, plan.weights):
        values = {str(k): (float(v.sum()) if isinstance(v, torch.Tensor) else float(v)) for k, v in imp.values.items()}
        out["models"].append({"model": m.model, "data": imp.data, "loss_finetune": imp.loss_finetune,
                              "loss_base": imp.loss_base, "merge_weight": w, "importance": values,
                              "density": {n: d.density for n, d in dmap.items()}})
    return out


def _to(pair, dev):
    base, fts = pair
    return base.to(dev), [f.to(dev) for f in fts]


def _progress(progress, total):
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True)
        return bar, bar.update
    if callable(progress):
        state = {"done": 0}

        def tick(n):
            state["done"] += n
            progress(state["done"], total)
        return None, tick
    return None, lambda n: None
