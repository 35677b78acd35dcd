"""PCB's whole-model statistics (`scope: model`) for the inspect views, in the background: the
streamed passes over every floating tensor (pipeline.pcb_model_stats, as a merge makes them) take
minutes at 7 B, so a view asks, waits a moment, and shows "computing" while they run; the
statistics timer redraws it when they are there. Cached per (models, config without its weights
and lambda: they scale the merged delta only)."""
from __future__ import annotations

import dataclasses
import threading

from ..config import MergeConfig
from ..methods.pcb import PCBStats, stat_passes
from ..pipeline import pcb_model_stats
from .access import ModelAccess
from .statistics import Progress, stop_jobs


class _Job:
    def __init__(self):
        self.progress = Progress(state="running")
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: PCBStats | None = None
        self.error: Exception | None = None


def stats_key(cfg: MergeConfig, idx: list[int]) -> tuple:
    same = dataclasses.replace(cfg.with_settings({"lambda": 1.0}),
                               models=[m.with_settings({"weight": 1.0}) for m in cfg.models])
    return tuple(idx), same.to_yaml()


class PCBStatsService:
    """The whole-model PCB statistics of one ModelAccess's models, one background job per key."""

    def __init__(self, access: ModelAccess):
        self.access = access
        self._jobs: dict[tuple, _Job] = {}
        self._lock = threading.Lock()

    def get(self, cfg: MergeConfig, idx: list[int], maps, wait: float | None = None) -> PCBStats | None:
        """The statistics of `cfg` over the fine-tunes `idx` (DP / APL density maps `maps`), started
        in the background on first ask; waits up to `wait` seconds for them (None: until done) and
        returns None if they are still being computed. A failed computation raises its error."""
        key = stats_key(cfg, idx)
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                job = self._jobs[key] = _Job()
                names = self.access.float_names
                job.progress.total = stat_passes(cfg.get("clip_ratio")) * len(names)
                job.thread = threading.Thread(target=self._run, args=(job, cfg, idx, maps), daemon=True,
                                              name="dppa-ui-pcb-stats")
                job.thread.start()
        job.done.wait(wait)
        if job.error is not None:
            raise job.error
        return job.result

    def progress(self, cfg: MergeConfig, idx: list[int]) -> Progress | None:
        """The job's progress (None: never asked for)."""
        job = self._jobs.get(stats_key(cfg, idx))
        return job.progress if job is not None else None

    def _run(self, job: _Job, cfg: MergeConfig, idx: list[int], maps) -> None:
        acc = self.access

        def load(name):
            base, fts = acc.views(name, counted=False)
            return base, [fts[j] for j in idx]

        def tick(n):
            job.progress.done += n
        try:
            job.result = pcb_model_stats([(n, cfg.for_tensor(n)) for n in acc.float_names], load, maps,
                                         tick=tick, cancel=job.cancel.is_set)[0]
            job.progress.state = "done"
        except InterruptedError as e:
            job.progress.state, job.error = "cancelled", e
        except Exception as e:  # noqa: BLE001 - shown by the view that waits for it
            job.progress.state, job.progress.error, job.error = "failed", str(e), e
        finally:
            job.done.set()

    def cancel(self) -> None:
        stop_jobs(list(self._jobs.values()))
