"""The streaming merge engine: inputs read lazily tensor by tensor, merged on the chosen device,
written straight into pre-planned safetensors shards.

Data flow for one merge (nothing else is held in memory):
  resolve refs -> open readers (headers only) -> check compatibility -> [DP: two statistics
  passes; PCB at scope model: three or four] -> for each tensor name: read base + fine-tunes
  (prefetched by a thread) -> pipeline -> write at its offset (a second thread) -> copy
  config/tokenizer -> card + YAML -> rename.
Peak memory is about (n_models + 2) x the largest tensor in float32 plus one prefetched set of
raw inputs and one pending output, whatever the depth of the model.
"""
from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import io, lifecycle
from .config import MergeConfig, load_config
from .methods.pcb import stat_passes
from .pipeline import (Scratch, dominant_float_dtype, dp_maps_from_stats, kept_fraction, merge_tensor, output_dtype,
                       pcb_model_stats)
from .plan import build_plan, input_refs
from .refs import resolve_model
from .stats import DeltaStats, collect_stats, save_stats
from .vocab import build_vocab

STATS_FILE = "dppa_stats.json"
CONFIG_FILE = "dppa_merge.yaml"
# CPU throughput (delta entries per second, all fine-tunes together) measured on 2 cores at 0.5 B
# parameters (benchmarks/merge_speed.py; pcb_model: PCB at scope model, benchmarks/pcb_scope.py),
# used only for --dry-run's rough time estimate.
_EST_RATE = {"none": 3e8, "magnitude": 7.5e7, "random": 1.2e8, "dp": 6e7, "apl": 7.5e7, "pcb": 2.7e7,
             "pcb_model": 2e7, "breadcrumbs": 4e7, "della": 2e7}


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
    report: str = ""                                 # the dry-run report


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


def release_memory() -> None:
    """Hand the free memory of every heap arena back to the OS (glibc's malloc_trim). In a process
    that lives on (the app), what views, a statistics pass or the last merge freed stays in the
    arenas (tune_allocator keeps freed buffers on purpose, for the next tensor) and a merge's working
    set would come on top of it: a merge trims when it starts and when it ends, the statistics pass
    when it ends."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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


class Inputs:
    """The opened input checkpoints (headers only) and the merge plan over them."""

    def __init__(self, cfg: MergeConfig, allow_pickle: bool, allow_vocab_trim: bool,
                 lora_cache: str | Path | None = None, log: Callable[[str], None] | None = None):
        self.refs = input_refs(cfg)
        self.dirs = [resolve_model(r, allow_pickle=allow_pickle, lora_cache=lora_cache, log=log) for r in self.refs]
        self.readers = [io.CheckpointReader(d, allow_pickle=allow_pickle) for d in self.dirs]
        index = {r: i for i, r in enumerate(self.refs)}
        self.vocab = None
        if cfg.vocab is not None:
            self.vocab = build_vocab(cfg, self.refs, self.dirs, self.readers, log=log)
        shapes = None
        if cfg.slices is None:
            shapes = io.check_compatible(self.readers[0], dict(zip(self.refs[1:], self.readers[1:])),
                                         allow_vocab_trim=allow_vocab_trim or self.vocab is not None)
        self.plan = build_plan(cfg, self.readers, shapes)
        if self.vocab is not None:
            self.vocab.apply_to_plan(self.plan)
        # the donor of config.json and tokenizer files: the base, else the first model (as mergekit)
        self.base_dir, self.base = self.dirs[0], self.readers[0]
        self.ft_dirs = [self.dirs[index[m.model]] for m in cfg.models]
        self.fts = [self.readers[index[m.model]] for m in cfg.models]
        self.jobs = {j.name: j for j in self.plan.jobs}
        self.shapes = self.plan.shapes
        self.names = self.plan.names
        self.n_params = sum(torch.Size(sh).numel() for sh in self.shapes.values())
        self.float_names = [n for n in self.names if self.dtype(n).is_floating_point]

    def output_dtype(self, cfg: MergeConfig) -> torch.dtype:
        """The output dtype: the config's, else the base's (its most common floating dtype)."""
        return output_dtype(cfg, dominant_float_dtype(self.dtype(n) for n in self.names) or torch.float32)

    def dtype(self, name: str) -> torch.dtype:
        j = self.jobs[name]
        i, n = j.inputs[0]
        return self.readers[i].dtype(n)

    def config_overrides(self, cfg: MergeConfig) -> dict | None:
        """config.json changes: vocab_size after a vocabulary trim or rebuild, the layer count (and
        per-layer lists) after slicing."""
        out = {}
        trimmed = [j.rows for j in self.plan.jobs if j.rows is not None]
        if trimmed:
            out["vocab_size"] = min(trimmed)
        if self.vocab is not None:
            out["vocab_size"] = self.vocab.rows
        if cfg.slices is not None:
            out.update(io.layer_overrides([self.dirs[i] for i in range(len(self.dirs))], self.plan.layer_origin,
                                          self.base_dir))
        return out or None

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base, fine-tunes) of tensor `name` (a `models:` pipeline)."""
        base, srcs = self.load_job(self.jobs[name])
        return base, srcs

    def load_job(self, job) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base or None, sources) of one output tensor, read from disk (vocabulary rows rebuilt
        for the output tokenizer, or trimmed, where the config asks)."""
        if self.vocab is not None and self.vocab.covers(job.name):
            ts = self.vocab.rebuild([self.refs[i] for i, _ in job.inputs],
                                    [self.readers[i].get(n) for i, n in job.inputs])
            return (ts[0], ts[1:]) if job.base is not None else (None, ts)

        def get(i, n):
            r = self.readers[i]
            return r.get(n, rows=job.rows) if job.rows is not None else r.view(n)
        base = get(*job.base) if job.base is not None else None
        return base, [get(i, n) for i, n in job.sources]

    def close(self):
        for r in self.readers:
            r.close()


def plan_report(cfg: MergeConfig, inputs: Inputs, out_dtype: torch.dtype, device: torch.device) -> tuple[str, int]:
    n_params = inputs.n_params
    largest = max(torch.Size(s).numel() for s in inputs.shapes.values())
    disk = n_params * out_dtype.itemsize
    n = max(len(cfg.models), max((len(j.sources) for j in inputs.plan.jobs), default=1))
    mem = (n + 2) * largest * 4 + (n + 1) * largest * 4      # working set + prefetched inputs
    key = ("pcb_model" if cfg.get("pcb_scope") == "model" else "pcb") if cfg.combine == "pcb" else cfg.prune
    rate = _EST_RATE.get(key, 1e8) if cfg.family == "pipeline" else 3e8
    secs = n_params * n / rate * (0.1 if device.type == "cuda" else 1)
    stages = f" (prune={cfg.prune}, amplify={cfg.amplify}, combine={cfg.combine})" if cfg.family == "pipeline" else ""
    lines = [f"method: {cfg.method_name}{stages}", f"base: {cfg.base_model} -> {inputs.base_dir}"
             if cfg.base_model else f"base: none (config and tokenizer from {inputs.refs[0]})"]
    model_params = [p for p in cfg.params if p.scope == "model" and p.key not in ("domain",)]
    for r, d in zip(inputs.refs, inputs.dirs):
        specs = [m for m in cfg.models if m.model == r]
        vals = ", ".join(f"{p.key}={specs[0].get(p.name)}" for p in model_params) if specs else ""
        lines.append(f"model: {r} -> {d}" + (f" ({vals})" if vals else ""))
    g = [f"{p.key}={cfg.get(p.name)}" for p in cfg.params if p.scope == "global"]
    lines.append("parameters: " + ", ".join(g + [f"seed={cfg.seed}"]))
    for k, sl in enumerate(cfg.slices or []):
        lines.append(f"slice {k}: " + ", ".join(f"{x.model} layers [{x.layer_range[0]}, {x.layer_range[1]})"
                                                 for x in sl.sources) + (f" {sl.params}" if sl.params else ""))
    lines += [f"tensors: {len(inputs.names)} ({n_params:,} parameters, {inputs.plan.n_layers} layers), "
              f"output dtype {str(out_dtype).split('.')[-1]}",
              f"device: {device}",
              f"estimated peak memory: {lifecycle.bytes_text(mem)}; disk: {lifecycle.bytes_text(disk)}; "
              f"time: {f'~{secs:.0f} s' if secs >= 1 else 'under 1 s'} (rough)"]
    table = inputs.plan.parameter_table(cfg)
    for job, row in zip(inputs.plan.jobs, table):
        src = ""
        if cfg.slices is not None:
            src = " <- " + ", ".join(f"{inputs.refs[i]}:{nm}" for i, nm in job.inputs)
        vals = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in row.items())
        lines.append(f"tensor {job.name} {list(job.shape)}{src}{vals}")
    return "\n".join(lines), disk


def write_model_files(out: Path, cfg: MergeConfig, base_dir: Path, dtype: torch.dtype, tokenizer_dir: Path | None,
                      kept: list[float], device: str, config_overrides: dict | None = None) -> None:
    """Everything of a merged model folder but the weights: the base's config (in `dtype`) and
    tokenizer (or `tokenizer_dir`'s), the merge YAML that reproduces it, and a model card."""
    io.copy_model_files(base_dir, out, dtype=dtype, tokenizer_dir=tokenizer_dir, chat_template=cfg.chat_template,
                        config_overrides=config_overrides)
    yaml_text = cfg.to_yaml()
    (out / CONFIG_FILE).write_text(yaml_text)
    parents = cfg.parents
    base_ref = cfg.base_model or parents[0]
    extra = {"kept fraction": ", ".join(f"{k:.3f}" for k in kept)} if cfg.family == "pipeline" and kept else {}
    io.write_model_card(out, base_ref=base_ref, model_refs=[r for r in parents if r != base_ref],
                        method=cfg.method_name, seed=cfg.seed, yaml_text=yaml_text, extra={**extra, "device": device})


def layer_stack(config, allow_pickle: bool = False) -> list[tuple[int, str, int]]:
    """What a `slices` config builds, from the checkpoints' headers only: per output layer, the
    input model and the layer of it that lands there ([] for a `models` config)."""
    cfg = load_config(config)
    if cfg.slices is None:
        return []
    inputs = Inputs(cfg, allow_pickle, False)
    try:
        return [(j, inputs.refs[i], layer) for j, (i, layer) in enumerate(inputs.plan.layer_origin)]
    finally:
        inputs.close()


def write(cfg: MergeConfig, inputs: Inputs, tmp: Path, dev: torch.device, out_dtype: torch.dtype, *,
          progress=False, cancel: Callable[[], bool] | None = None, shard_bytes: int = 5 * 10**9,
          stats: list[DeltaStats] | None = None, density_maps: list | None = None,
          merge_cfg: MergeConfig | None = None, allow_pickle: bool = False) -> MergeResult:
    """The merged model into the folder `tmp`: weights streamed into shards, then the tokenizer,
    config, card and YAML. `stats`: DP's statistics when the caller has them (else two passes
    here); `density_maps`: a prune's per-tensor densities computed above the engine (APL's), and
    `merge_cfg` the config the tensors are merged with when it differs from `cfg` (APL's merge
    weights; the saved YAML is `cfg`, which recomputes them)."""
    result = _write_weights(cfg, inputs, tmp, dev, out_dtype, progress, cancel, shard_bytes, stats, density_maps,
                            merge_cfg or cfg)
    if inputs.vocab is not None:
        tok_dir = inputs.vocab.save(tmp / ".tokenizer")
    elif cfg.tokenizer_source:
        tok_dir = inputs.dirs[inputs.refs.index(cfg.tokenizer_source)] if cfg.tokenizer_source in inputs.refs \
            else resolve_model(cfg.tokenizer_source, allow_pickle=allow_pickle)
    else:
        tok_dir = None
    if cfg.auto_chat_template and cfg.chat_template is None:
        cfg.chat_template = io.most_common_template(inputs.dirs)
    write_model_files(tmp, cfg, inputs.base_dir, out_dtype, tok_dir, result.kept_fraction, str(dev),
                      config_overrides=inputs.config_overrides(cfg))
    if inputs.vocab is not None:
        shutil.rmtree(tmp / ".tokenizer", ignore_errors=True)
    return result


def _write_weights(cfg: MergeConfig, inputs: Inputs, tmp: Path, dev: torch.device, out_dtype: torch.dtype,
                   progress, cancel, shard_bytes: int, stats: list[DeltaStats] | None, dp_maps: list | None,
                   merge_cfg: MergeConfig) -> MergeResult:
    names = inputs.names
    float_names = inputs.float_names
    passes = cfg.prune == "dp" and stats is None
    total = len(names) + (len(float_names) + sum(
        1 for n in float_names if len(inputs.shapes[n]) == 2) if passes else 0)
    if cfg.family == "pipeline" and cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":
        total += stat_passes(cfg.get("clip_ratio")) * len(float_names)
    bar, tick = _progress(progress, total)
    try:
        if cfg.prune != "dp":
            stats = None
        elif passes:
            stats = collect_stats(float_names, lambda n: (lifecycle.check_stop(), _to(inputs.load(n), dev))[1],
                                  [m.model for m in cfg.models], cfg.get("dp_outlier_m"), progress=tick)
        if cfg.prune == "dp":
            dp_maps = dp_maps_from_stats(cfg, stats)
            save_stats(stats, tmp / STATS_FILE)
        pcb_stats, tied = None, {}
        def stopped() -> bool:          # SIGTERM raises here, like Ctrl-C; the app's cancel returns True
            lifecycle.check_stop()
            return bool(cancel and cancel())
        if cfg.family == "pipeline" and cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":
            floats = set(float_names)
            pcb_stats, tied = pcb_model_stats([(j.name, j.cfg) for j in inputs.plan.jobs if j.name in floats],
                                              inputs.load, dp_maps, dev, tick, stopped)
        specs = [(n, inputs.shapes[n], out_dtype if inputs.dtype(n).is_floating_point
                  else inputs.dtype(n)) for n in names]
        jobs = inputs.plan.jobs
        with io.ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes) as w, \
                ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            scratch = Scratch()
            pending_read = reader.submit(inputs.load_job, jobs[0])
            pending_write = None
            for k, job in enumerate(jobs):
                name = job.name
                lifecycle.check_stop()
                if cancel and cancel():
                    raise InterruptedError("merge cancelled")
                base, fts = pending_read.result()
                if k + 1 < len(jobs):          # overlap the next read with this tensor's math
                    pending_read = reader.submit(inputs.load_job, jobs[k + 1])
                math_job = inputs.jobs[tied.get(name, name)]     # a tied duplicate is merged as its primary
                # APL's merge weights are not in the plan's per-tensor views: resolve them here
                jcfg = math_job.cfg if merge_cfg is cfg else merge_cfg.for_tensor(math_job.name, math_job.t)
                merged = merge_tensor(jcfg, math_job.name, base.to(dev) if base is not None else None,
                                      [f.to(dev) for f in fts] if base is None else fts, dp_maps,
                                      out_dtype=out_dtype, scratch=scratch, pcb_stats=pcb_stats).to("cpu")
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
    float_shapes = {n: sh for n, sh in inputs.shapes.items() if inputs.dtype(n).is_floating_point}
    return MergeResult(out=None, seconds=0.0, device=str(dev), tensors=len(names),
                       params=inputs.n_params,
                       kept_fraction=kept_fraction(cfg, float_shapes, dp_maps), config=cfg, notices=cfg.notices)


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
