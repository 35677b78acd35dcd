"""APL importance for the app: what a config with `prune: apl` needs before its views and merge
(each fine-tune's importance, in the background with progress, then its density maps), and the
block x module importance maps the Inspect tab computes on demand.

The apl module computes each importance once per (checkpoints, task data, level, kind) and keeps
it in memory and on disk; this service adds the session's side: one background job per set of
fine-tunes and settings, the density maps per config (cached), the maps shown, and the rule that
an `apl_data` file is read only when the session registered it (`Workspace.allow_data`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from .. import apl, gpu
from ..config import ConfigError, MergeConfig
from .access import ModelAccess
from .statistics import Progress, stop_jobs


class _Job:
    def __init__(self, total: int):
        self.progress = Progress(total=total)
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self.done = False


class APLService:
    """APL importance of one ModelAccess's fine-tunes. `data_files`: the resolved paths an
    `apl_data` may name (None: any file, as the CLI)."""

    def __init__(self, access: ModelAccess, data_files: set[str] | None = None):
        self.access = access
        self.data_files = data_files
        self._jobs: dict[tuple, _Job] = {}
        self._plans: dict[tuple, apl.APLInputs] = {}
        self._tables: dict[tuple, dict] = {}
        self._computed: set[tuple] = set()          # (fine-tune, data, examples, gradient_at) with a map
        self._lock = threading.Lock()
        self._table_locks: dict[tuple, threading.Lock] = {}

    # -- task data (before any compute)

    def task_data(self, j: int, ref: str, apl_data: str | None, domain, examples: int) -> apl.TaskData:
        """Fine-tune j's examples (apl.task_data), refusing an `apl_data` file the session did not
        register, by its name only."""
        if apl_data is not None and self.data_files is not None:
            if str(Path(apl_data).expanduser().resolve()) not in self.data_files:
                raise ConfigError(f"`apl_data` of {ref}: {Path(apl_data).name!r} was not uploaded in this session; "
                                  f"the app reads only files uploaded through the page")
        return apl.task_data(self.access.ft_dirs[j], ref, apl_data, domain, examples)

    def _inputs(self, cfg: MergeConfig, idx: list[int]) -> tuple[tuple, list[apl.TaskData]]:
        data = [self.task_data(j, m.model, m.get("apl_data"), m.domain, cfg.get("apl_examples")) for j, m in zip(idx, cfg.models)]
        key = (tuple(zip(idx, (d.identity for d in data))), len(data[0].items) if data else 0, cfg.get("apl_level"),
               cfg.apl_importance_kind, cfg.get("apl_gradient_at") if cfg.apl_importance_kind == "gradient" else None)
        return key, data

    # -- what a `prune: apl` config needs, in the background

    def start(self, cfg: MergeConfig, idx: list[int]) -> Progress:
        """Start (once) the importance of the config's fine-tunes (`idx`: their indices among the
        loaded); returns its progress. Missing task data is refused here, before any compute."""
        key, data = self._inputs(cfg, idx)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                return job.progress
            job = self._jobs[key] = _Job(len(idx))
            job.progress.state = "running"
            job.thread = threading.Thread(target=self._run, args=(job, cfg, idx, data), daemon=True,
                                          name="dppa-ui-apl")
        job.thread.start()
        return job.progress

    def _run(self, job: _Job, cfg: MergeConfig, idx: list[int], data: list[apl.TaskData]) -> None:
        acc = self.access
        try:
            for j, td in zip(idx, data):
                if job.cancel.is_set():
                    job.progress.state = "cancelled"
                    return
                gpu.apl_importance(acc.base_dir, acc.ft_dirs[j], td, cfg.get("apl_level"), cfg.apl_importance_kind,
                                   cfg.get("apl_gradient_at"))
                job.progress.done += 1
        except Exception as e:  # noqa: BLE001 - shown in the views that wait for it
            job.progress.state, job.progress.error = "failed", f"{type(e).__name__}: {e}"
            return
        job.done = True
        job.progress.state = "done"

    def progress(self, cfg: MergeConfig, idx: list[int]) -> Progress:
        job = self._jobs.get(self._inputs(cfg, idx)[0])
        return job.progress if job is not None else Progress()

    def merge_inputs(self, cfg: MergeConfig, idx: list[int]) -> apl.APLInputs | None:
        """APL's density maps and merge weights for the config (apl.merge_inputs, cached per densities and
        λ), None while its importance is being computed (started here if it was not)."""
        key, _ = self._inputs(cfg, idx)
        self.start(cfg, idx)
        job = self._jobs[key]
        if job.progress.state == "failed":
            raise ValueError(f"APL importance failed: {job.progress.error}")
        if not job.done:
            return None
        pkey = (key, tuple(round(m.get("density"), 9) for m in cfg.models), round(cfg.get("apl_lambda"), 9), cfg.get("apl_weights"),
                tuple(m.get("weight") for m in cfg.models))
        with self._lock:
            hit = self._plans.get(pkey)
        if hit is None:
            acc = self.access
            shapes = {n: tuple(acc.shapes[n]) for n in acc.float_names}
            hit = apl.merge_inputs(cfg, shapes, acc.base_dir, [acc.ft_dirs[j] for j in idx])   # importance: cached
            with self._lock:
                self._plans[pkey] = hit
        return hit

    def wait(self, cfg: MergeConfig, idx: list[int], timeout: float | None = None,
             cancel: Callable[[], bool] | None = None) -> apl.APLInputs:
        """Start if needed, then block until the plan is there (`cancel()` polled)."""
        waited = 0.0
        while True:
            plan = self.merge_inputs(cfg, idx)
            if plan is not None:
                return plan
            job = self._jobs[self._inputs(cfg, idx)[0]]
            if job.progress.state == "cancelled" or (cancel is not None and cancel()):
                raise InterruptedError("cancelled while waiting for APL's importance")
            if timeout is not None and waited >= timeout:
                raise TimeoutError("APL's importance is still being computed")
            if job.thread is not None:
                job.thread.join(0.1)
            waited += 0.1

    # -- the importance map of one fine-tune (Inspect), on demand

    def table(self, j: int, ref: str, *, apl_data: str | None = None, domain=None, examples: int = apl.APL_EXAMPLES,
              gradient_at: str = "midpoint", density: float | None = None, apl_lambda: float = 0.5,
              compute: bool = True, progress: Callable[[int, int, str], None] | None = None) -> dict | None:
        """apl.importance_table of loaded fine-tune j, cached. With compute=False: None unless its
        importance was computed in this session (a new density then costs milliseconds)."""
        td = self.task_data(j, ref, apl_data, domain, examples)
        base_key = (j, td.identity, len(td.items), gradient_at)
        key = (*base_key, None if density is None else round(density, 9), round(apl_lambda, 9))
        with self._lock:
            if key in self._tables:
                return self._tables[key]
            if not compute and base_key not in self._computed:
                return None
            lock = self._table_locks.setdefault(base_key, threading.Lock())
        with lock:                       # a second click waits for the first computation
            with self._lock:
                if key in self._tables:
                    return self._tables[key]
            acc = self.access
            table = gpu.apl_table(acc.base_dir, acc.ft_dirs[j], data=apl_data, examples=examples,
                                  gradient_at=gradient_at, density=density, apl_lambda=apl_lambda, domain=domain,
                                  progress=progress)
            with self._lock:
                self._tables[key] = table
                self._computed.add(base_key)
        return table

    def cancel(self) -> None:
        """Stop the background jobs at their next fine-tune."""
        with self._lock:
            jobs = list(self._jobs.values())
        stop_jobs(jobs)
