"""Delta statistics for the app: on demand for the tensor on screen, whole-model in the background,
cached on disk.

- `tensor(name, M)`: each fine-tune's TensorStat of one tensor, from its cached delta: what a
  histogram or a single-tensor view needs, in milliseconds, never waiting for the whole model.
- `start(M)` / `progress(M)` / `full(M)`: the whole-model DeltaStats DP needs (module outlier %
  and block outlier %), computed by one background thread per setting (on the GPU when there is
  one), with progress and cancel. Views that need them say "computing… 40%" until they are there.
- `DiskCache`: each (base, fine-tune, M) pair's statistics as JSON under the cache folder, keyed by
  both checkpoints' file identity (names, sizes, mtimes, hub revision), so a second load of the
  same models, in any session or after a restart, reads them back instead of computing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import gpu
from ..engine import release_memory
from ..io import cache_root
from ..refs import files_identity
from ..stats import DeltaStats, TensorStat, tensor_stat
from .access import ModelAccess

STATS_VERSION = 1          # bump when what a statistics file holds changes


class DiskCache:
    """Statistics of (base, fine-tune, M) pairs as JSON files, written atomically."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "stats"
        self.hits = self.writes = 0

    def key(self, base: Path, ft: Path, outlier_m: float) -> str:
        ident = json.dumps([STATS_VERSION, files_identity(base), files_identity(ft), round(float(outlier_m), 9)])
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: dict) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.root / f"{key}.json")
            self.writes += 1
        except OSError:
            pass        # a read-only cache only costs the recomputation


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    state: str = "idle"             # idle | running | done | cancelled | failed
    error: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else (self.done / self.total if self.total else 0.0)

    def text(self) -> str:
        if self.state == "running":
            return f"computing… {self.fraction:.0%}"
        if self.state == "failed":
            return f"failed: {self.error}"
        return self.state


def stop_jobs(jobs) -> None:
    """Ask each background job (with .cancel, an Event, and .thread) to stop, then wait for it."""
    for job in jobs:
        job.cancel.set()
    for job in jobs:
        if job.thread is not None:
            job.thread.join(5)


class _Job:
    def __init__(self):
        self.progress = Progress()
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: list[DeltaStats] | None = None
        self.norms: list[float] | None = None


class StatsService:
    """Statistics of one ModelAccess (its base against each fine-tune)."""

    def __init__(self, access: ModelAccess, cache: DiskCache | None = None):
        self.access = access
        self.cache = cache or DiskCache()
        self._tensor: dict[tuple, list[TensorStat]] = {}
        self._jobs: dict[float, _Job] = {}
        self._lock = threading.Lock()

    # -- one tensor, now

    def tensor(self, name: str, outlier_m: float = 5.0) -> list[TensorStat]:
        """Each fine-tune's TensorStat of `name` (from the whole-model run when it is done)."""
        full = self.full(outlier_m)
        if full is not None:
            return [s.tensors[name] for s in full]
        key = (name, round(float(outlier_m), 9))
        if key not in self._tensor:
            d = self.access.deltas(name)
            self._tensor[key] = [tensor_stat(name, d[i].abs(), outlier_m) for i in range(d.shape[0])]
        return self._tensor[key]

    # -- the whole model, in the background

    def _key(self, i: int, outlier_m: float) -> str:
        return self.cache.key(self.access.base_dir, self.access.ft_dirs[i], outlier_m)

    def _job(self, outlier_m: float) -> _Job:
        m = round(float(outlier_m), 9)
        with self._lock:
            job = self._jobs.get(m)
            if job is None:
                job = self._jobs[m] = _Job()
            return job

    def start(self, outlier_m: float = 5.0) -> Progress:
        """Start (once) the whole-model statistics at `outlier_m`; returns their progress. Pairs
        found in the disk cache are read back, the others computed in one background pass."""
        job = self._job(outlier_m)
        with self._lock:
            if job.thread is not None or job.result is not None:
                return job.progress
            cached = [self.cache.get(self._key(i, outlier_m)) for i in range(len(self.access.ft_refs))]
            if all(c is not None for c in cached):
                self._finish(job, cached)
                return job.progress
            job.thread = threading.Thread(target=self._run, args=(job, outlier_m, cached), daemon=True,
                                          name="dppa-ui-stats")
            job.progress.state = "running"
        job.thread.start()
        return job.progress

    def _finish(self, job: _Job, data: list[dict]) -> None:
        refs = self.access.ft_refs
        job.result = [DeltaStats.from_json({**d["stats"], "model": ref}) for d, ref in zip(data, refs)]
        job.norms = [float(d["delta_norm"]) for d in data]
        job.progress.state = "done"
        job.progress.done = job.progress.total

    def _run(self, job: _Job, outlier_m: float, cached: list[dict | None]) -> None:
        acc = self.access
        todo = [i for i, c in enumerate(cached) if c is None]
        job.progress.total = len(acc.float_names) + sum(1 for n in acc.float_names if len(acc.shapes[n]) == 2)

        def tick(n):
            job.progress.done += n

        try:
            computed = gpu.pair_statistics(acc.base_dir, [acc.ft_dirs[i] for i in todo],
                                           [acc.ft_refs[i] for i in todo], outlier_m,
                                           progress=tick, cancel=job.cancel.is_set)
        except InterruptedError:
            job.progress.state = "cancelled"
            return
        except Exception as e:  # noqa: BLE001 - shown in the views that wait for it
            job.progress.state, job.progress.error = "failed", f"{type(e).__name__}: {e}"
            return
        finally:
            release_memory()        # the pass's float32 copies: not the server's idle memory
        data = list(cached)
        for i, d in zip(todo, computed):
            self.cache.put(self._key(i, outlier_m), d)
            data[i] = d
        self._finish(job, data)

    def progress(self, outlier_m: float = 5.0) -> Progress:
        return self._job(outlier_m).progress

    def full(self, outlier_m: float = 5.0) -> list[DeltaStats] | None:
        """The whole-model statistics per fine-tune, None until they are computed."""
        return self._job(outlier_m).result

    def norms(self, outlier_m: float = 5.0) -> list[float] | None:
        """‖δᵢ‖ / ‖θ_base‖ per fine-tune, with the whole-model statistics."""
        return self._job(outlier_m).norms

    def wait(self, outlier_m: float = 5.0, timeout: float | None = None,
             cancel=None) -> list[DeltaStats]:
        """Start if needed, then block until the statistics are there (`cancel()` polled)."""
        waited = 0.0
        while True:
            self.start(outlier_m)
            job = self._job(outlier_m)
            if job.result is not None:
                return job.result
            if job.progress.state == "failed":
                raise RuntimeError(f"delta statistics failed: {job.progress.error}")
            if job.progress.state == "cancelled" or (cancel is not None and cancel()):
                raise InterruptedError("cancelled while waiting for the delta statistics")
            if timeout is not None and waited >= timeout:
                raise TimeoutError("the delta statistics are still being computed")
            thread = job.thread
            if thread is not None:
                thread.join(0.1)
            waited += 0.1

    def cancel(self) -> None:
        """Stop every running job (at its next tensor); a later `start` resumes from the cache."""
        with self._lock:
            jobs = list(self._jobs.values())
        stop_jobs(jobs)
        with self._lock:
            for m, job in list(self._jobs.items()):
                if job.result is None:
                    del self._jobs[m]
