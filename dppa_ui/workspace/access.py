"""Lazy, per-tensor access to a base model and its fine-tunes: what the inspect views read.

Opening reads only the safetensors headers (names, shapes, dtypes). A tensor is read when a view
asks for it, from the memory-mapped files (no copy into anonymous memory), and its float32
deltas δᵢ = θᵢ − θ_base are kept in a byte-bounded LRU together with what is derived from them
(sorted |δ| for instant rank look-ups, histogram samples, DARE draws). So the cost of looking at a
model does not grow with its depth, and a tensor that is never shown is never read.
"""
from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import io
from ..methods import is_dp_target, kth_largest
from ..methods.dp import block_of
from ..pipeline import dominant_float_dtype

SORT_LIMIT = 1 << 23          # tensors up to 8 M entries keep a sorted |δ|: a slider move is one look-up
# What every session's views may keep of derived tensors, together: the server's idle memory, which
# a merge's working set comes on top of, does not grow with its sessions.
VIEW_CACHE_BYTES = int(float(os.environ.get("DPPA_UI_VIEW_CACHE_MB", 256)) * (1 << 20))
MATRIX_HINT = "mlp.down_proj"


class ViewCache:
    """A byte-bounded LRU of derived tensors (deltas, sorted |δ|, samples), shared by the
    ModelAccess objects that use it; each keys its entries by itself. A single tensor larger than
    the bound is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key) -> torch.Tensor | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: torch.Tensor) -> None:
        nbytes = value.numel() * value.element_size()
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self._bytes += nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def drop(self, owner) -> None:
        """Forget every entry keyed by `owner` (a closed ModelAccess)."""
        with self._lock:
            for key in [k for k in self._items if k[0] is owner]:
                old = self._items.pop(key)
                self._bytes -= old.numel() * old.element_size()

    @property
    def nbytes(self) -> int:
        return self._bytes


VIEWS = ViewCache(VIEW_CACHE_BYTES)


def lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux sets it per thread), so the work it
    does for later never slows what a user waits for (a worker's initializer, a warm-up)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def module_type(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj` (None outside blocks)."""
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return None
    rest = name[m.end():]
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


class ModelAccess:
    """A base and its fine-tunes, opened lazily. `refs` are what the user picked, `paths` their
    resolved folders. Raises ValueError (naming the tensors) when the models do not fit together.
    Derived tensors go to `cache` (default: VIEWS, one bound for every session of the process)."""

    def __init__(self, base_ref: str, base_dir: Path, ft_refs: list[str], ft_dirs: list[Path],
                 cache: ViewCache | None = None):
        self.base_ref, self.base_dir = base_ref, Path(base_dir)
        self.ft_refs, self.ft_dirs = list(ft_refs), [Path(p) for p in ft_dirs]
        self._views = cache if cache is not None else VIEWS
        try:
            self.base = io.CheckpointReader(self.base_dir, ref=base_ref)
            self.fts = [io.CheckpointReader(p, ref=r) for r, p in zip(self.ft_refs, self.ft_dirs)]
            self.shapes = io.check_compatible(self.base, dict(zip(self.ft_refs, self.fts)))
        except (FileNotFoundError, ValueError) as e:
            self.close()
            # a damaged file: named by its model ref and its name (no server path on the page)
            raise ValueError(e.describe(full_path=False) if isinstance(e, io.DamagedCheckpoint) else str(e)) from None
        self.names = list(self.shapes)
        self.float_names = [n for n in self.names if self.base.dtype(n).is_floating_point]
        self.numel = {n: self.base.numel(n) for n in self.names}
        self.n_params = sum(self.numel.values())
        self.reads: Counter = Counter()           # tensor name -> times its data was read
        self._lock = threading.RLock()
        self._sorter = None                       # the background sorts (value_at_rank)
        self._sorting: set[tuple] = set()
        self._ranks: dict[tuple, float] = {}       # (name, index, k) -> value_at_rank, before the sort is there
        self._index()

    # -- what is there (headers only)

    def _index(self) -> None:
        self._by_block: dict[tuple[int, str], str] = {}
        self._types: list[str] = []
        for n in self.float_names:
            b, t = block_of(n), module_type(n)
            if b is None or t is None:
                continue
            self._by_block[(b, t)] = n
            if t not in self._types:
                self._types.append(t)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return tuple(self.shapes[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def _check(self, name: str) -> None:
        if name not in self.shapes:
            raise ValueError(f"tensor {name!r} is not in the base model")

    def blocks(self) -> list[int]:
        return sorted({b for b, _ in self._by_block})

    def module_types(self, matrices_only: bool = False) -> list[str]:
        """Module types inside blocks in model order; `matrices_only`: the 2-D weights (what DP prunes)."""
        if not matrices_only:
            return list(self._types)
        return [t for t in self._types if any(is_dp_target(n, self.shapes[n])
                                              for (_, tt), n in self._by_block.items() if tt == t)]

    def tensor_name(self, block: int, module: str) -> str:
        try:
            return self._by_block[(int(block), module)]
        except KeyError:
            blocks = self.blocks()
            raise ValueError(f"block {block} has no module {module!r}; blocks {blocks[0]}..{blocks[-1]}, "
                             f"modules: {', '.join(self._types)}") from None

    def module_name(self, block: int, module: str) -> str | None:
        return self._by_block.get((int(block), module))

    def matrix_names(self) -> list[str]:
        return [n for n in self.float_names if len(self.shapes[n]) == 2]

    def default_view(self) -> tuple[int, str | None, str | None]:
        """(block, module, matrix) a page opens on: the first block's MLP down projection."""
        blocks, types = self.blocks(), self.module_types()
        module = MATRIX_HINT if MATRIX_HINT in types else (types[0] if types else None)
        block = blocks[0] if blocks else 0
        matrix = self.module_name(block, module) if module else None
        if matrix is None or matrix not in self.matrix_names():
            matrix = (self.matrix_names() or [None])[0]
        return block, module, matrix

    def summary(self) -> dict:
        dtype = dominant_float_dtype(self.base.dtype(n) for n in self.float_names)
        return {"base": self.base_ref, "parameters": self.n_params, "tensors": len(self.names),
                "dtype": str(dtype).removeprefix("torch.") if dtype else "none", "blocks": len(self.blocks()),
                "fine_tunes": list(self.ft_refs)}

    # -- data (read on demand)

    def views(self, name: str, counted: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Zero-copy (base, [fine-tunes]) tensors of `name` over the memory-mapped files. `reads`
        counts the views' reads (the background statistics pass reads uncounted)."""
        self._check(name)
        if counted:
            self.reads[name] += 1
        return self.base.view(name), [r.view(name) for r in self.fts]

    def deltas(self, name: str) -> torch.Tensor:
        """(n_ft, *shape) float32 deltas of `name`, computed on first use and LRU-cached by bytes."""
        def compute():
            base, fts = self.views(name)
            b = base.float()
            return torch.stack([ft.float() - b for ft in fts])
        return self.memo(("deltas", name), compute)

    def delta(self, name: str, index: int) -> torch.Tensor:
        return self.deltas(name)[index]

    def value_at_rank(self, name: str, index: int, k: int) -> float | None:
        """The k-th largest |δ| (k = 1: the largest) of fine-tune `index` in `name`; None for k < 1.
        Tensors up to SORT_LIMIT entries keep their sorted |δ|, so a slider move is one look-up. The
        sort (4x a selection's CPU) is made in a background thread at low priority after the first
        look-up, which, like every look-up before it is done, is a selection: the first view of a
        tensor does not wait for it, on a busy machine least of all."""
        n = self.numel[name]
        if k < 1:
            return None
        k = min(k, n)
        if n <= SORT_LIMIT:
            s = self.cached(("sorted", name, index))
            if s is not None:
                return float(s[n - k])
            self._sort_later(name, index)
        key = (name, index, k)          # one view asks for a cut several times (threshold, mass, bands)
        if key not in self._ranks:
            if len(self._ranks) > 4096:
                self._ranks.clear()
            self._ranks[key] = float(kth_largest(self.delta(name, index).abs(), k))
        return self._ranks[key]

    def top_mass(self, name: str, index: int, r: int) -> float:
        """Σ of the r largest |δ| of fine-tune `index` in `name` (what a magnitude prune keeping r
        entries keeps, whichever of tied entries it picks): from the sorted |δ| when it is there,
        else one pass, Σ_{|δ| > x} |δ| + (r - #{|δ| > x}) x with x the r-th largest."""
        n = self.numel[name]
        r = min(max(int(r), 0), n)
        if r == 0:
            return 0.0
        s = self.cached(("sorted", name, index)) if n <= SORT_LIMIT else None
        if s is not None:
            return float(s[n - r:].sum(dtype=torch.float64))
        x = self.value_at_rank(name, index, r)
        a = self.delta(name, index).abs().reshape(-1)
        above = a > x
        return float(a[above].sum(dtype=torch.float64)) + (r - int(above.sum())) * x

    def top_cut(self, name: str, index: int, r: int) -> tuple[float, int] | None:
        """Where a magnitude prune keeping the r largest |δ| of fine-tune `index` cuts (x, p): it
        keeps every |δ| > x and the |δ| == x before flat index p (ties keep the lowest index, as
        methods.select.topk_mask); None for r < 1."""
        n = self.numel[name]
        r = min(int(r), n)
        if r < 1:
            return None
        x = self.value_at_rank(name, index, r)
        s = self.cached(("sorted", name, index)) if n <= SORT_LIMIT else None
        a = None
        if s is not None:         # counts from the sorted |δ|: a pass only when some ties are dropped
            lo, hi = (int(torch.searchsorted(s, torch.tensor(x, dtype=s.dtype), right=b)) for b in (False, True))
            above, equal = n - hi, hi - lo
        else:
            a = self.delta(name, index).abs().reshape(-1)
            above, equal = int((a > x).sum()), int((a == x).sum())
        need = r - above
        if need >= equal:
            return x, n
        a = self.delta(name, index).abs().reshape(-1) if a is None else a
        return x, int((a == x).nonzero()[need, 0])

    def _sort_later(self, name: str, index: int) -> None:
        key = ("sorted", name, index)
        with self._lock:
            if key in self._sorting:
                return
            self._sorting.add(key)
            if self._sorter is None:
                from concurrent.futures import ThreadPoolExecutor
                self._sorter = ThreadPoolExecutor(1, thread_name_prefix="dppa-ui-sort", initializer=lowest_priority)

        def sort():       # numpy's sort is several times faster than torch's on the CPU, and frees the GIL
            try:
                self.memo(key, lambda: torch.from_numpy(np.sort(self.delta(name, index).abs().reshape(-1).numpy())))
            finally:
                with self._lock:
                    self._sorting.discard(key)
        try:
            self._sorter.submit(sort)
        except RuntimeError:          # closed meanwhile
            pass

    def cached(self, key) -> torch.Tensor | None:
        """A derived tensor if the cache holds it (see memo), else None."""
        return self._views.get((self, *key))

    def memo(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A derived tensor, computed on first use and kept in the (LRU, byte-bounded) view cache."""
        value = self._views.get((self, *key))
        if value is None:
            value = compute()
            self._views.put((self, *key), value)
        return value

    def close(self) -> None:
        sorter = getattr(self, "_sorter", None)
        if sorter is not None:
            sorter.shutdown(wait=False, cancel_futures=True)
        for r in [getattr(self, "base", None), *getattr(self, "fts", [])]:
            if r is not None:
                r.close()
        if hasattr(self, "_views"):
            self._views.drop(self)
