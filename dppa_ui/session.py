"""Per-session state for the app: which models are loaded, their deltas and statistics, the last
merge, and the chat models built from it. No gradio here: the UI only wires components to this.

Data flow for one browser session (one `Workspace`):
  refs -> `resolve_ref` (demo:, a folder under the model roots, or a hub id when downloads are
  allowed) -> `ModelCache` (state dicts shared read-only by every session, LRU, memory bound)
  -> compatibility check -> `DeltaStats` per (base, fine-tune) pair (computed once, cached)
  -> deltas per tensor (float32, computed on first use, cached) for the inspect plots
  -> `merge` (in memory, queued, refused when memory is short) -> `model_for` (chat) / `save`.

Moving a slider only touches the cached deltas and statistics, never the files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import io
from .config import MergeConfig, _read, load_config
from .methods import is_dp_target, kth_largest
from .methods.dp import DPDensity, block_of, outlier_percent
from .pipeline import dominant_float_dtype, kept_fraction, merge_state_dicts, output_dtype
from .stats import DeltaStats, collect_stats

GB = 1 << 30
DEFAULT_OUTLIER_M = 5.0
SORT_LIMIT = 1 << 21          # tensors up to this size keep a sorted |delta| for O(1) rank look-ups
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# ------------------------------------------------------------------------------------ model roots

def default_model_roots() -> list[Path]:
    """Folders the local-path box may reach: `DPPA_UI_MODEL_ROOTS` (os.pathsep-separated), else the
    demo family and ./models."""
    env = os.environ.get("DPPA_UI_MODEL_ROOTS")
    if env:
        return [Path(p).expanduser().resolve() for p in env.split(os.pathsep) if p.strip()]
    from .zoo import ZOO_DIR
    return [Path(ZOO_DIR).resolve(), Path("models").resolve()]


MODEL_ROOTS: list[Path] = default_model_roots()


def downloads_allowed() -> bool:
    """Hub downloads are on unless DPPA_UI_ALLOW_DOWNLOADS is 0/false/no."""
    return os.environ.get("DPPA_UI_ALLOW_DOWNLOADS", "1").strip().lower() not in ("0", "false", "no", "off")


def check_path_allowed(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """The resolved folder for `path` if it lies under one of `roots`; else ValueError.

    Symlinks and `..` are resolved before the check, so neither can step outside a root. A relative
    path is looked up under each root (first that exists), then under the working directory.
    """
    roots = [Path(r).expanduser().resolve() for r in (MODEL_ROOTS if roots is None else roots)]
    raw = Path(str(path).strip()).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:
        candidates = [r / raw for r in roots] + [Path.cwd() / raw]
        existing = [c for c in candidates if c.exists()]
        candidates = existing or candidates
    for c in candidates:
        resolved = c.resolve()
        if any(resolved == r or resolved.is_relative_to(r) for r in roots):
            return resolved
    where = ", ".join(str(r) for r in roots) or "(none configured)"
    raise ValueError(f"{str(path)!r} is outside the allowed model folders: {where}. Put the model in one "
                     f"of them, or set DPPA_UI_MODEL_ROOTS to add a folder")


def _hub_size_check(ref: str, max_bytes: int) -> None:
    """Refuse hub repos whose weights exceed `max_bytes`. Skipped when offline or the hub is
    unreachable: `io.resolve_model` then uses the local cache or raises its readable error."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo_id, revision=revision or None, files_metadata=True)
    except Exception:
        return
    size = sum((s.size or 0) for s in (info.siblings or []) if s.rfilename.endswith(".safetensors"))
    if size > max_bytes:
        raise ValueError(f"hub model {ref!r} has {size / GB:.1f} GB of weights; this app downloads at most "
                         f"{max_bytes / GB:.1f} GB (set DPPA_UI_MAX_DOWNLOAD_GB to change it)")


def resolve_ref(ref: str, roots: Sequence[str | os.PathLike] | None = None,
                allow_downloads: bool | None = None) -> Path:
    """A model ref as a local folder, under the app's safety rules:
    `demo:NAME` always; a path only under `roots`; a hub id `owner/name[@rev]` only when downloads
    are allowed (size-capped). Every refusal is a ValueError naming the fix."""
    ref = str(ref or "").strip()
    if not ref:
        raise ValueError("empty model ref: pick a demo model, a folder under the model roots or a hub id")
    if ref.startswith("demo:"):
        return io.resolve_model(ref)
    roots = MODEL_ROOTS if roots is None else roots
    raw = Path(ref).expanduser()
    # `owner/name` is a hub id unless a folder of that name exists (under a root or here).
    hub = bool(_HUB_ID.match(ref)) and not raw.exists() and not any((Path(r) / raw).exists() for r in roots)
    if not hub:
        path = check_path_allowed(ref, roots)
        if not path.is_dir():
            raise ValueError(f"model folder {ref!r} does not exist under the allowed model folders")
        for f in path.iterdir():       # a file linked from elsewhere would be read (and saved) too
            try:
                check_path_allowed(f, roots)
            except ValueError:
                raise ValueError(f"{str(f)!r} in model folder {ref!r} links outside the allowed model folders; "
                                 f"copy the file in instead of linking it") from None
        return path
    if not (downloads_allowed() if allow_downloads is None else allow_downloads):
        raise ValueError(f"{ref!r} looks like a hub id, but downloads are disabled on this server "
                         f"(DPPA_UI_ALLOW_DOWNLOADS=0); use a demo model or a folder under the model roots")
    _hub_size_check(ref, int(_env_float("DPPA_UI_MAX_DOWNLOAD_GB", 4.0) * GB))
    return io.resolve_model(ref)


def _files_key(path: Path) -> tuple:
    """Cache key of a checkpoint folder: its path and its weight files' sizes and mtimes, so a
    folder re-written in place is read again."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return (str(path.resolve()),) + tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# ------------------------------------------------------------------------------------ model cache

def _sd_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


class ModelCache:
    """LRU of loaded state dicts (CPU, stored dtype) keyed by folder, shared by all sessions.

    Tensors handed out are never mutated by the app (merges and deltas make new tensors), so one
    copy serves every session. Evicting only drops the cache's reference: a workspace that holds
    the dict keeps it alive. Also caches each (base, fine-tune) pair's DeltaStats.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = int(max_bytes if max_bytes is not None else _env_float("DPPA_UI_CACHE_GB", 4.0) * GB)
        self._sds: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._stats: OrderedDict[tuple, tuple[DeltaStats, float]] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0            # state dicts read from disk (tests check the cache works)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(_sd_bytes(sd) for sd in self._sds.values())

    def __len__(self) -> int:
        return len(self._sds)

    def get(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The state dict of checkpoint folder `path` (read once, then served from memory)."""
        key = _files_key(Path(path))
        with self._lock:
            if key in self._sds:
                self._sds.move_to_end(key)
                return self._sds[key]
        sd = io.read_state_dict(path)
        with self._lock:
            self.loads += 1
            self._sds[key] = sd
            self._sds.move_to_end(key)
            total = sum(_sd_bytes(v) for v in self._sds.values())
            while total > self.max_bytes and len(self._sds) > 1:
                _, old = self._sds.popitem(last=False)
                total -= _sd_bytes(old)
        return sd

    def pair_stats(self, base_path: Path, ft_path: Path, ref: str, compute: Callable[[], tuple[DeltaStats, float]]
                   ) -> tuple[DeltaStats, float]:
        """(DeltaStats at M=5, relative delta norm) of a (base, fine-tune) pair, computed once."""
        key = (_files_key(base_path), _files_key(ft_path))
        with self._lock:
            if key in self._stats:
                self._stats.move_to_end(key)
                st, norm = self._stats[key]
                return dataclasses.replace(st, model=ref), norm
        st, norm = compute()
        with self._lock:
            self._stats[key] = (st, norm)
            while len(self._stats) > 256:
                self._stats.popitem(last=False)
        return st, norm

    def clear(self) -> None:
        with self._lock:
            self._sds.clear()
            self._stats.clear()


GLOBAL_CACHE = ModelCache()


# ------------------------------------------------------------------------------------ merge queue

class MergeRefused(RuntimeError):
    """A merge that will not run now (not enough memory, queue full); the message says why."""


class MergeQueue:
    """At most `limit` merges at once across all sessions (env DPPA_UI_MAX_MERGES, default 1);
    the others wait their turn, up to `timeout` seconds."""

    def __init__(self, limit: int | None = None, timeout: float = 600.0):
        self.limit = max(1, int(limit if limit is not None else _env_float("DPPA_UI_MAX_MERGES", 1)))
        self.timeout = timeout
        self._sem = threading.BoundedSemaphore(self.limit)
        self._lock = threading.Lock()
        self.running = 0

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None):
        if not self._sem.acquire(timeout=self.timeout if timeout is None else timeout):
            raise MergeRefused(f"the server is busy: {self.limit} merge(s) already running; try again in a minute")
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._sem.release()


MERGE_QUEUE = MergeQueue()


def estimate_merge_bytes(workspace: "Workspace", config=None) -> int:
    """Memory an in-memory merge needs beyond the loaded inputs: the merged state dict plus the
    per-tensor working set ((n + 2) float32 copies of the largest tensor); PCB at model scope
    flattens every delta at once (about 3 float32 copies of all of them)."""
    cfg = workspace.config(config) if config is not None else None
    n = len(workspace.ft_refs)
    params = workspace.n_params
    sd = workspace.base_sd
    out = sum(workspace.shapes_numel[k] * (output_dtype(cfg, sd[k].dtype) if cfg else sd[k].dtype).itemsize
              for k in workspace.names)
    largest = max(workspace.shapes_numel.values(), default=0)
    work = (n + 2) * largest * 4
    if cfg is not None and cfg.combine == "pcb" and cfg.scope == "model":
        work = 3 * n * params * 4
    return int(out + work)


def available_memory() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


# ------------------------------------------------------------------------------------ workspace

@dataclass
class MergeOutcome:
    state_dict: dict[str, torch.Tensor]
    seconds: float
    device: str
    kept_fraction: list[float]          # per fine-tune: share of delta entries the prune keeps
    config: MergeConfig
    notices: list[str] = field(default_factory=list)
    alpha_search: dict[str, dict] = field(default_factory=dict)
    run: int = 0                        # the workspace's merge counter (keys the chat model cache)


class _hybrid:
    """A method that works on the class (`Workspace.load(...)` builds a new one) and on an
    instance (`ws.load(...)` reloads that one)."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, cls):
        def bound(*args, **kwargs):
            return self.fn(obj if obj is not None else cls(), *args, **kwargs)
        bound.__doc__, bound.__name__ = self.fn.__doc__, self.fn.__name__
        return bound


def module_type(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj` (None outside blocks)."""
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return None
    rest = name[m.end():]
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


class Workspace:
    """One browser session: its loaded models, cached deltas and statistics, last merge, temp files."""

    def __init__(self, roots: Sequence[str | os.PathLike] | None = None, cache: ModelCache | None = None,
                 allow_downloads: bool | None = None, max_delta_bytes: int = 256 << 20):
        self.roots = list(MODEL_ROOTS if roots is None else roots)
        self.cache = GLOBAL_CACHE if cache is None else cache
        self.allow_downloads = allow_downloads
        self.max_delta_bytes = max_delta_bytes
        self.base_ref: str | None = None
        self.ft_refs: list[str] = []
        self.base_path: Path | None = None
        self.ft_paths: list[Path] = []
        self.base_sd: dict[str, torch.Tensor] = {}
        self.ft_sds: list[dict[str, torch.Tensor]] = []
        self.names: list[str] = []
        self.stats: list[DeltaStats] = []
        self.delta_norms: list[float] = []
        self.merged: MergeOutcome | None = None
        self._runs = 0
        self._temp: Path | None = None
        self._finalizer = None
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._deltas: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._samples: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._stats_by_m: dict[float, list[DeltaStats]] = {}
        self._dp_maps: OrderedDict[tuple, dict[str, DPDensity]] = OrderedDict()
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.RLock()

    # -- loading

    @_hybrid
    def load(self, base_ref: str, ft_refs: Iterable[str], roots: Sequence | None = None,
             cache: ModelCache | None = None) -> "Workspace":
        """Load (or replace) the models of this session and return the workspace.

        Validates everything before changing anything: on any error (a path outside the roots,
        incompatible shapes, an unknown hub id offline) the previous models stay loaded and the
        error is a ValueError whose message names the problem.
        """
        if roots is not None:
            self.roots = list(roots)
        if cache is not None:
            self.cache = cache
        ft_refs = [str(r).strip() for r in (ft_refs or []) if str(r).strip()]
        if not base_ref or not str(base_ref).strip():
            raise ValueError("pick a base model")
        base_ref = str(base_ref).strip()
        if not ft_refs:
            raise ValueError("pick at least one fine-tuned model to merge into the base")
        dupes = sorted({r for r in ft_refs if ft_refs.count(r) > 1})
        if dupes:
            raise ValueError(f"fine-tune(s) listed twice: {', '.join(dupes)}; list each once (use its weight instead)")
        base_path = resolve_ref(base_ref, self.roots, self.allow_downloads)
        ft_paths = [resolve_ref(r, self.roots, self.allow_downloads) for r in ft_refs]
        try:
            base_reader = io.CheckpointReader(base_path)
            readers = {r: io.CheckpointReader(p) for r, p in zip(ft_refs, ft_paths)}
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(str(e)) from None
        try:
            io.check_compatible(base_reader, readers)
        finally:
            base_reader.close()
            for r in readers.values():
                r.close()
        base_sd = self.cache.get(base_path)
        ft_sds = [self.cache.get(p) for p in ft_paths]
        names = list(base_sd)
        float_names = [n for n in names if base_sd[n].is_floating_point()]
        stats, norms = [], []
        for ref, path, sd in zip(ft_refs, ft_paths, ft_sds):
            st, norm = self.cache.pair_stats(base_path, path, ref, lambda sd=sd, ref=ref: _pair_stats(
                base_sd, sd, float_names, ref))
            stats.append(st)
            norms.append(norm)
        # Everything checked: switch this session over.
        self.base_ref, self.ft_refs, self.base_path, self.ft_paths = base_ref, ft_refs, base_path, ft_paths
        self.base_sd, self.ft_sds, self.names, self.float_names = base_sd, ft_sds, names, float_names
        self.stats, self.delta_norms = stats, norms
        self.shapes_numel = {n: base_sd[n].numel() for n in names}
        self.n_params = sum(self.shapes_numel.values())
        self.merged = None
        self._reset_caches()
        self._index_modules()
        return self

    @property
    def loaded(self) -> bool:
        return bool(self.ft_sds)

    def _require(self) -> None:
        if not self.loaded:
            raise ValueError("no models loaded yet: pick a base and at least one fine-tune, then load them")

    def _index_modules(self) -> None:
        self._by_block: dict[tuple[int, str], str] = {}
        types: list[str] = []
        for n in self.float_names:
            b, t = block_of(n), module_type(n)
            if b is None or t is None:
                continue
            self._by_block[(b, t)] = n
            if t not in types:
                types.append(t)
        self._types = types

    # -- what is loaded

    def summary(self) -> dict:
        """Parameters, tensors, dtype, and each fine-tune's delta norm relative to the base."""
        self._require()
        dtype = dominant_float_dtype(self.base_sd[n].dtype for n in self.float_names)
        return {
            "base": self.base_ref, "base_path": str(self.base_path),
            "parameters": self.n_params, "tensors": len(self.names),
            "dtype": str(dtype).removeprefix("torch.") if dtype else "none",
            "blocks": len(self.blocks()),
            "fine_tunes": [{"model": r, "path": str(p), "delta_norm": norm}
                           for r, p, norm in zip(self.ft_refs, self.ft_paths, self.delta_norms)],
        }

    def blocks(self) -> list[int]:
        """Block (layer) indices that hold tensors."""
        return sorted({b for b, _ in self._by_block}) if self.loaded else []

    def module_types(self, matrices_only: bool = False) -> list[str]:
        """Module types inside blocks, in model order (e.g. `self_attn.q_proj`, `mlp.up_proj`,
        `input_layernorm`); `matrices_only` keeps the 2-D weights (what DP prunes)."""
        if not self.loaded:
            return []
        if not matrices_only:
            return list(self._types)
        return [t for t in self._types if any(is_dp_target(n, self.base_sd[n].shape)
                                              for (b, tt), n in self._by_block.items() if tt == t)]

    def tensor_name(self, block: int, module: str) -> str:
        """The tensor name of `module` in block `block`."""
        self._require()
        try:
            return self._by_block[(int(block), module)]
        except KeyError:
            raise ValueError(f"block {block} has no module {module!r}; blocks: {self.blocks()[0]}.."
                             f"{self.blocks()[-1]}, modules: {', '.join(self._types)}") from None

    def matrix_names(self) -> list[str]:
        """Every 2-D floating weight (what the mask viewer can show)."""
        return [n for n in self.float_names if self.base_sd[n].dim() == 2] if self.loaded else []

    def other_names(self) -> list[str]:
        """Floating tensors outside blocks (embeddings, final norm, lm_head)."""
        return [n for n in self.float_names if block_of(n) is None] if self.loaded else []

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return tuple(self.base_sd[name].shape)

    def _check_name(self, name: str) -> None:
        self._require()
        if name not in self.base_sd:
            raise ValueError(f"tensor {name!r} is not in the base model")

    # -- configs

    def config(self, source=None) -> MergeConfig:
        """A MergeConfig for these models from a MergeConfig, dict or YAML text; `base_model` and
        `models` default to what is loaded. Its models must all be loaded fine-tunes."""
        self._require()
        if isinstance(source, MergeConfig):
            cfg = source
        else:
            data = _read(source) if isinstance(source, (str, Path)) else copy.deepcopy(dict(source or {}))
            data.setdefault("base_model", self.base_ref)
            if not data.get("models"):
                data["models"] = [{"model": r} for r in self.ft_refs]
            if "merge_method" not in data and not any(k in data for k in ("prune", "amplify", "combine")):
                data["merge_method"] = "task_arithmetic"
            cfg = load_config(data)
        self.align(cfg)
        return cfg

    def align(self, cfg: MergeConfig) -> list[int]:
        """Workspace index of each of the config's models (the config may list them in any order)."""
        idx = []
        for m in cfg.models:
            if m.model not in self.ft_refs:
                raise ValueError(f"the config lists {m.model!r}, which is not loaded; loaded fine-tunes: "
                                 f"{', '.join(self.ft_refs)}")
            idx.append(self.ft_refs.index(m.model))
        return idx

    # -- cached deltas and statistics (what the inspect plots read)

    def deltas(self, name: str) -> torch.Tensor:
        """(n_ft, *shape) float32 deltas of tensor `name` (computed once, LRU-cached by bytes)."""
        self._check_name(name)
        with self._lock:
            if name in self._deltas:
                self._deltas.move_to_end(name)
                return self._deltas[name]
        base = self.base_sd[name].float()
        d = torch.stack([sd[name].float() - base for sd in self.ft_sds])
        with self._lock:
            if d.numel() * 4 <= self.max_delta_bytes:
                self._deltas[name] = d
                total = sum(t.numel() * 4 for t in self._deltas.values())
                while total > self.max_delta_bytes and len(self._deltas) > 1:
                    _, old = self._deltas.popitem(last=False)
                    total -= old.numel() * 4
        return d

    def delta(self, name: str, index: int) -> torch.Tensor:
        return self.deltas(name)[index]

    def value_at_rank(self, name: str, index: int, k: int) -> float | None:
        """The k-th largest |delta| (k = 1 the largest) of fine-tune `index` in tensor `name`;
        None for k < 1. Small tensors keep their sorted |delta|, so a slider move costs O(1)."""
        n = self.shapes_numel[name]
        if k < 1:
            return None
        k = min(k, n)
        if n <= SORT_LIMIT:          # held in the LRU-bounded memo, like the other derived tensors
            s = self.memo(("sorted", name, index),
                          lambda: self.delta(name, index).abs().reshape(-1).sort(descending=True).values)
            return float(s[k - 1])
        return float(kth_largest(self.delta(name, index).abs(), k))

    def memo(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A per-workspace cache for derived tensors (sorted |δ|, histogram samples, DARE draws), LRU-bounded
        by the same byte budget as the deltas."""
        with self._lock:
            if key in self._samples:
                self._samples.move_to_end(key)
                return self._samples[key]
        value = compute()
        with self._lock:
            self._samples[key] = value
            total = sum(t.numel() * t.element_size() for t in self._samples.values())
            while total > self.max_delta_bytes and len(self._samples) > 1:
                _, old = self._samples.popitem(last=False)
                total -= old.numel() * old.element_size()
        return value

    def module_name(self, block: int, module: str) -> str | None:
        """Like `tensor_name`, but None when the block has no such module."""
        return self._by_block.get((int(block), module)) if self.loaded else None

    def stats_at(self, outlier_m: float = DEFAULT_OUTLIER_M) -> list[DeltaStats]:
        """Per fine-tune DeltaStats with module outlier % at M = outlier_m. M = 5 is computed at
        load; another M recomputes only the module percentages from the cached deltas (the block
        percentages use 3x the block mean whatever M is), once per M."""
        self._require()
        if abs(outlier_m - DEFAULT_OUTLIER_M) < 1e-12:
            return self.stats
        key = round(float(outlier_m), 9)
        with self._lock:
            if key in self._stats_by_m:
                return self._stats_by_m[key]
        out = []
        for i, st in enumerate(self.stats):
            tensors = {}
            for n, t in st.tensors.items():
                if t.dp_target:
                    a = self.delta(n, i).abs()
                    t = dataclasses.replace(t, pct_outlier=outlier_percent(a, outlier_m, t.mean_abs))
                tensors[n] = t
            out.append(DeltaStats(model=st.model, outlier_m=outlier_m, tensors=tensors, block_pct=dict(st.block_pct)))
        with self._lock:
            self._stats_by_m[key] = out
        return out

    def dp_map(self, index: int, density: float, dp_lambda: float, outlier_m: float = DEFAULT_OUTLIER_M
               ) -> dict[str, DPDensity]:
        """DP densities of fine-tune `index` (cached per setting)."""
        key = (index, round(float(density), 9), round(float(dp_lambda), 9), round(float(outlier_m), 9))
        with self._lock:
            if key in self._dp_maps:
                self._dp_maps.move_to_end(key)
                return self._dp_maps[key]
        import warnings
        with warnings.catch_warnings():      # "pruned to density 0" is shown by the plots instead
            warnings.simplefilter("ignore")
            m = self.stats_at(outlier_m)[index].dp_map(density, dp_lambda)
        with self._lock:
            self._dp_maps[key] = m
            while len(self._dp_maps) > 512:
                self._dp_maps.popitem(last=False)
        return m

    def dp_maps(self, cfg: MergeConfig) -> list[dict[str, DPDensity]] | None:
        """DP density maps aligned with cfg.models (None unless the config prunes with DP)."""
        if cfg.prune != "dp":
            return None
        return [self.dp_map(j, m.density, cfg.dp_lambda, cfg.dp_outlier_m)
                for j, m in zip(self.align(cfg), cfg.models)]

    def kept_fraction(self, cfg: MergeConfig) -> list[float]:
        """Share of each fine-tune's delta entries the prune keeps (expected value for random)."""
        return kept_fraction(cfg, {n: tuple(self.base_sd[n].shape) for n in self.float_names}, self.dp_maps(cfg))

    # -- merging

    def merge(self, config=None, progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None, device: str = "auto",
              queue: MergeQueue | None = None) -> MergeOutcome:
        """Merge in memory (CUDA when present). Waits for a slot in the merge queue and refuses,
        with the estimate, when free memory is short. `amplification: auto` is searched first.
        The result is kept as `self.merged` for chat, score and save."""
        from .engine import pick_device, search_amplification
        cfg = self.config(config)
        cfg = copy.deepcopy(cfg)
        need, free = estimate_merge_bytes(self, cfg), available_memory()
        if need > free:
            raise MergeRefused(f"this merge needs about {need / GB:.2f} GB of memory but only {free / GB:.2f} GB "
                               f"is free; merge fewer or smaller models, or wait for other merges to finish")
        idx = self.align(cfg)
        alpha = {}
        with (queue or MERGE_QUEUE).slot():
            t0 = time.perf_counter()
            stats = self.stats_at(cfg.dp_outlier_m) if cfg.prune == "dp" else None
            if any(m.amplification == "auto" for m in cfg.models):
                alpha = search_amplification(cfg, self.base_path, [self.ft_paths[j] for j in idx], log=lambda s: None,
                                             **self._search_inputs(idx, stats))
            dev = pick_device(device)
            sd = merge_state_dicts(self.base_sd, [self.ft_sds[j] for j in idx], cfg, device=dev,
                                   stats=[stats[j] for j in idx] if stats else None,
                                   progress=progress, cancel=cancel)
            seconds = time.perf_counter() - t0
        self._runs += 1
        self.merged = MergeOutcome(state_dict=sd, seconds=seconds, device=str(dev),
                                   kept_fraction=self.kept_fraction(cfg), config=cfg,
                                   notices=list(cfg.notices), alpha_search=alpha, run=self._runs)
        return self.merged

    def adopt(self, outcome: MergeOutcome) -> MergeOutcome:
        """Make a merge run elsewhere (e.g. a ZeroGPU worker process) this session's last merge."""
        self._runs = max(self._runs, outcome.run) + 1
        outcome.run = self._runs          # a fresh key, so chat rebuilds the merged model
        self.merged = outcome
        return outcome

    def search_amplification(self, config=None, log: Callable[[str], None] | None = None
                             ) -> tuple[MergeConfig, dict[str, dict]]:
        """Run DPPA's greedy alpha search for the models with `amplification: auto` (or, when none
        is auto, for every model); returns the resolved config and {model: {alpha, score, path}}."""
        from .engine import search_amplification
        cfg = copy.deepcopy(self.config(config))
        if cfg.amplify != "dpa":
            raise ValueError("the alpha search needs a DPA amplify stage (preset dppa)")
        if not any(m.amplification == "auto" for m in cfg.models):
            for m in cfg.models:
                m.amplification = "auto"
        idx = self.align(cfg)
        stats = self.stats_at(cfg.dp_outlier_m) if cfg.prune == "dp" else None
        report = search_amplification(cfg, self.base_path, [self.ft_paths[j] for j in idx],
                                      log=log or (lambda s: None), **self._search_inputs(idx, stats))
        return cfg, report

    def _search_inputs(self, idx: list[int], stats: list[DeltaStats] | None) -> dict:
        """engine.search_amplification's `loaded`/`stats` from what this workspace holds, aligned
        with the config's models (idx), so the search reads nothing from disk again."""
        return {"loaded": (self.base_sd, [self.ft_sds[j] for j in idx]),
                "stats": [stats[j] for j in idx] if stats else None}

    # -- temp files and saving

    @property
    def temp_dir(self) -> Path:
        """This session's private temp folder, removed by `close()` (or when the workspace dies)."""
        if self._temp is None:
            self._temp = Path(tempfile.mkdtemp(prefix="dppa-ui-session-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._temp), True)
        return self._temp

    def close(self) -> None:
        """End of session: drop the temp files and every reference to the models."""
        if self._finalizer is not None:
            self._finalizer()
        self._temp = self._finalizer = None
        self.base_sd, self.ft_sds, self.merged = {}, [], None
        self._reset_caches()

    def save(self, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """Write the last merge as a model folder (weights, config, tokenizer, card, YAML),
        atomically. Default folder: `merged-<method>` in this session's temp dir."""
        from .engine import write_model_files
        if self.merged is None:
            raise ValueError("nothing to save yet: run a merge first")
        cfg, sd = self.merged.config, self.merged.state_dict
        out = Path(out_dir) if out_dir is not None else self.temp_dir / f"merged-{cfg.method_name.replace('+', '-')}"
        if out_dir is None and out.exists():
            shutil.rmtree(out)
        dtype = dominant_float_dtype(t.dtype for t in sd.values()) or torch.float32
        tok_dir = resolve_ref(cfg.tokenizer_source, self.roots, self.allow_downloads) if cfg.tokenizer_source else None
        with io.atomic_output_dir(out, overwrite=overwrite) as tmp:
            with io.ShardedWriter(tmp, [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]) as w:
                for n, t in sd.items():
                    w.write(n, t)
            write_model_files(tmp, cfg, self.base_path, dtype, tok_dir, self.merged.kept_fraction, self.merged.device)
        return out.absolute()

    def save_archive(self, max_bytes: int | None = None) -> tuple[Path, Path | None]:
        """The last merge saved in the session temp dir and zipped beside it (for a download
        button): (folder, zip), the zip None (not written) when the folder is over `max_bytes`."""
        folder = self.save()
        if max_bytes is not None and sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) > max_bytes:
            return folder, None
        zpath = folder.with_suffix(".zip")
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, Path(folder.name) / f.relative_to(folder))
        return folder, zpath

    # -- chat models

    def model_for(self, which: str, device: str | torch.device = "cpu"):
        """(model, tokenizer) for "merged", "base" or a loaded fine-tune's ref: a transformers
        model built from the base's config with that state dict (float32 on CPU), cached."""
        self._require()
        if which == "merged":
            if self.merged is None:
                raise ValueError("no merged model yet: run a merge first")
            key, sd = ("merged", self.merged.run), self.merged.state_dict
            tok_ref = self.merged.config.tokenizer_source
        elif which == "base":
            key, sd, tok_ref = ("base", 0), self.base_sd, None
        elif which in self.ft_refs:
            key, sd, tok_ref = (which, 0), self.ft_sds[self.ft_refs.index(which)], None
        else:
            raise ValueError(f"unknown model {which!r}: choose merged, base or one of {', '.join(self.ft_refs)}")
        key = key + (str(device),)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        tok_dir = resolve_ref(tok_ref, self.roots, self.allow_downloads) if tok_ref else self.base_path
        pair = build_model(self.base_path, sd, tok_dir, device)
        if which == "merged" and self.merged.config.chat_template:
            pair[1].chat_template = self.merged.config.chat_template
        with self._lock:
            self._models[key] = pair
            while len(self._models) > 3:          # merged + one compare model + a spare
                self._models.popitem(last=False)
        return pair


def _pair_stats(base_sd, ft_sd, float_names, ref) -> tuple[DeltaStats, float]:
    """DeltaStats at M = 5 and ||ft - base|| / ||base|| for one fine-tune."""
    st = collect_stats(float_names, lambda n: (base_sd[n], [ft_sd[n]]), [ref], DEFAULT_OUTLIER_M)[0]
    num = den = 0.0
    for n in float_names:
        b = base_sd[n].float()
        num += float((ft_sd[n].float() - b).pow(2).sum(dtype=torch.float64))
        den += float(b.pow(2).sum(dtype=torch.float64))
    return st, (num / den) ** 0.5 if den > 0 else 0.0


def build_model(config_dir: Path, state_dict: dict[str, torch.Tensor], tokenizer_dir: Path,
                device: str | torch.device = "cpu"):
    """A causal LM built from `config_dir/config.json` holding `state_dict` (float32), in eval mode,
    and the tokenizer of `tokenizer_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise ValueError(f"no usable tokenizer in {tokenizer_dir}: {type(e).__name__}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise ValueError(f"cannot build a causal LM from {config_dir}/config.json for chat: "
                         f"{type(e).__name__}: {e}") from None
    from .evaluation import untied_missing
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = untied_missing(config, missing)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the base's architecture: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.float().to(device).eval()
    return model, tok
