"""Merge runs of one session: each merge streams through the CLI's engine into a folder of the
session's temp dir (so the app merges as fast as the CLI and never holds a whole model in memory),
and the folder is what chat, score, save and push use. The newest few folders are kept; every run
stays in the leaderboard with its config, to reload or export.
"""
from __future__ import annotations

import contextlib
import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import MergeConfig
from ..controls import OWN_KEYS
from .. import modelbuild

KEEP_FOLDERS = 3


def short(ref: str) -> str:
    """A model ref as a short label: demo:reverse -> reverse, /x/y/model -> model, org/name -> name."""
    ref = str(ref)
    return ref.split(":", 1)[1] if ref.startswith("demo:") else ref.rstrip("/").split("/")[-1]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "per layer"
    return str(v)


def params_text(cfg: MergeConfig) -> str:
    """The settings of a run in one line (what a leaderboard row shows): what the method uses,
    where it differs from the method's defaults."""
    if cfg.slices is not None:
        return f"{len(cfg.slices)} slice(s)"
    m = cfg.models[0]
    if cfg.upscale == "smile":
        return (f"rank_of_expert {'full' if cfg.get('rank_of_expert') is None else cfg.get('rank_of_expert')}, "
                f"rank_of_router {cfg.get('rank_of_router')}, k {cfg.get('num_experts_per_tok')}"
                + (f", scope {cfg.get('smile_scope')}" if cfg.get("smile_scope") != "blocks" else "")
                + (f", others {cfg.get('smile_others')}" if cfg.get("smile_others") != "base" else ""))
    parts = []
    if cfg.prune != "none":
        parts.append(f"density {_fmt(m.get('density'))}")
    if isinstance(cfg.get("lambda"), list) or cfg.get("lambda") != 1.0:
        parts.append(f"λ {_fmt(cfg.get('lambda'))}")
    if any(not isinstance(x.get("weight"), (int, float)) or x.get("weight") != 1.0 for x in cfg.models):
        parts.append("w " + ",".join(_fmt(x.get("weight")) for x in cfg.models))
    if cfg.prune == "dp":
        parts.append(f"DP λ {cfg.get('dp_lambda'):g}, M {cfg.get('dp_outlier_m'):g}")
    if cfg.amplify == "dpa":
        parts.append(f"bands {[round(p, 4) for p in m.get('partitions')]} α {m.get('amplification')}")
    if cfg.combine == "pcb":
        parts.append(f"ratio {_fmt(cfg.get('pcb_ratio'))}")
    if cfg.prune in ("random", "della") or (cfg.prune == "apl" and cfg.get("apl_drop") == "random"):
        parts.append(f"seed {cfg.seed}")
    if cfg.prune == "apl":
        parts.append(f"APL {cfg.get('apl_level')} {cfg.apl_importance_kind}, λ {cfg.get('apl_lambda'):g}")
    for p in cfg.params:          # the method's other parameters, where they are not the default
        if p.key in OWN_KEYS or p.key.startswith("apl_") or p.key in ("dp_others",):
            continue
        v = (cfg if p.scope == "global" else m).get(p.name)
        if v is not None and (isinstance(v, list) or v != p.default):
            parts.append(f"{p.key} {_fmt(v)}")
    return "; ".join(parts) or "defaults"


def size_text(parameters: dict | None) -> str:
    """'3,648,128 parameters (4.1× a plain merge's 879,232)' for a SMILE model; the count alone
    for a merge."""
    if not parameters:
        return ""
    total, plain = int(parameters["total"]), int(parameters.get("plain") or parameters["total"])
    if total == plain:
        return f"{total:,} parameters"
    return f"{total:,} parameters ({total / plain:.1f}× a plain merge's {plain:,})"


@dataclass
class Run:
    number: int
    config: MergeConfig
    folder: Path
    seconds: float
    device: str
    kept_fraction: list[float]
    controls: object = None                       # the MethodControls it came from (app runs)
    notices: list[str] = field(default_factory=list)
    alpha_search: dict = field(default_factory=dict)
    scores: dict | None = None                    # {domain: {"em", "smooth", ...}} once scored
    objective: float | None = None
    suite: str | None = None
    parameters: dict | None = None                # {"total", "plain", ...}: SMILE adds experts and routers
    routing: dict | None = None                   # SMILE: routing accuracy per domain once scored
    lm_eval: dict = field(default_factory=dict)   # (task, limit, few-shot) -> gpu.lm_eval_task's result

    @property
    def is_smile(self) -> bool:
        return self.config.upscale == "smile"

    @property
    def models(self) -> list[str]:
        """The models merged (a `slices` config: every model its slices read)."""
        cfg = self.config
        return [m.model for m in cfg.models] or [r for r in cfg.parents if r != cfg.base_model]

    @property
    def name(self) -> str:
        return f"run {self.number}"

    def label(self) -> str:
        return f"run {self.number}: {self.config.method_name} of {', '.join(short(r) for r in self.models)}"

    @property
    def on_disk(self) -> bool:
        return self.folder.is_dir()


class MergeRefused(RuntimeError):
    """A merge that will not run now (not enough memory or disk, queue busy); the message says why."""


class MergeQueue:
    """At most `limit` merges at once across all sessions; the others wait up to `timeout` s."""

    def __init__(self, limit: int = 1, timeout: float = 600.0):
        self.limit, self.timeout = max(1, int(limit)), timeout
        self._sem = threading.BoundedSemaphore(self.limit)

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None):
        if not self._sem.acquire(timeout=self.timeout if timeout is None else timeout):
            raise MergeRefused(f"the server is busy: {self.limit} merge(s) already running; try again in a minute")
        try:
            yield
        finally:
            self._sem.release()


class Runs:
    """The runs of one session, their folders under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.items: list[Run] = []

    def next_folder(self) -> tuple[int, Path]:
        """The number and folder of the next run: one past the last run listed, so a merge that
        was cancelled or refused leaves no gap in the leaderboard (past any folder it left)."""
        n = (self.items[-1].number if self.items else 0) + 1
        while (self.root / f"run-{n}").exists():
            n += 1
        return n, self.root / f"run-{n}"

    def add(self, run: Run) -> Run:
        self.items.append(run)
        self._prune()
        return run

    def _prune(self) -> None:
        for run in self.items[:-KEEP_FOLDERS]:
            if run.on_disk:
                modelbuild.POOL.drop(run.folder)
                shutil.rmtree(run.folder, ignore_errors=True)

    @property
    def last(self) -> Run | None:
        return self.items[-1] if self.items else None

    def get(self, number: int) -> Run:
        for r in self.items:
            if r.number == int(number):
                return r
        raise ValueError(f"there is no run {number} in this session's leaderboard")

    def archive(self, run: Run, max_bytes: int | None = None) -> Path | None:
        """The run's folder zipped beside it (for a download button); None when it is over
        `max_bytes`. Written to a temp name, then renamed."""
        if not run.on_disk:
            raise ValueError(f"{run.name}'s files were removed to save disk (only the last {KEEP_FOLDERS} are "
                             f"kept); reload its settings and merge again")
        size = sum(f.stat().st_size for f in run.folder.rglob("*") if f.is_file())
        if max_bytes is not None and size > max_bytes:
            return None
        zpath = run.folder.with_name(f"merged-run-{run.number}-{run.config.method_name.replace('+', '-')}.zip")
        if zpath.is_file():
            return zpath
        tmp = zpath.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(run.folder.rglob("*")):
                if f.is_file():
                    z.write(f, Path(zpath.stem) / f.relative_to(run.folder))
        tmp.replace(zpath)
        return zpath

    def close(self) -> None:
        for run in self.items:
            modelbuild.POOL.drop(run.folder)
        self.items = []


