"""One browser session's models, statistics, runs and chat models. No gradio: the UI only wires
components to this.

  access.py      ModelAccess: lazy per-tensor reads from the memory-mapped checkpoints
  statistics.py  StatsService: on-demand per tensor, whole-model in the background, disk cache
  importance.py  APLService: APL importance in the background (prune: apl) and the importance maps
  pcbstats.py    PCBStatsService: PCB's whole-model statistics (scope: model) in the background
  runs.py        Runs: merges (and SMILE upscales) written to folders by the CLI's engine, the
                 leaderboard, archives
  (modelbuild)   the chat / score models, built by accelerate from those folders

Data flow: refs -> `load` (resolved under the app's RefPolicy; headers only) -> inspect views read
the tensors on screen -> `merge` (engine, to a run folder) -> chat / score / save from the folder.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

from .. import gpu, modelbuild, runner, search
from ..config import MergeConfig, load_config, load_stages
from ..controls import MethodControls
from ..methods.dp import DPDensity
from ..methods.pcb import PCBStats
from ..pipeline import kept_fraction
from ..plan import n_layers_of
from ..refs import RefPolicy, resolve_model
from ..smile_model import SMILE_CONFIG
from ..stats import DeltaStats
from .access import ModelAccess, module_type
from .importance import APLService
from .pcbstats import PCBStatsService
from .runs import MergeQueue, MergeRefused, Run, Runs, params_text, short, size_text
from .statistics import DiskCache, Progress, StatsService

__all__ = ["Workspace", "ModelAccess", "StatsService", "APLService", "DiskCache", "Progress", "Run", "Runs",
           "MergeQueue", "MergeRefused", "params_text", "short", "size_text", "module_type"]

MERGE_QUEUE = MergeQueue()


class Workspace:
    """The models one session has loaded and what it did with them. `temp_root`: where its files
    go (a private folder is made inside and removed by `close`)."""

    def __init__(self, policy: RefPolicy | None = None, temp_root: str | Path | None = None,
                 stats_cache: DiskCache | None = None, queue: MergeQueue | None = None):
        self.policy = policy or RefPolicy()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="session-", dir=temp_root))
        self.stats_cache = stats_cache or DiskCache()
        self.queue = queue or MERGE_QUEUE
        self.access: ModelAccess | None = None
        self.stats: StatsService | None = None
        self.apl: APLService | None = None
        self.data_files: set[str] = set()           # files an `apl_data` may name (see allow_data)
        self.runs = Runs(self.temp_dir)
        self._dp: dict[tuple, tuple[dict[str, DPDensity], list[str]]] = {}
        self.pcb: PCBStatsService | None = None

    # -- loading

    def load(self, base_ref: str, ft_refs: Iterable[str], progress: Callable[[str], None] | None = None,
             start_stats: bool = True) -> "Workspace":
        """Open base + fine-tunes (headers only) and start their whole-model statistics in the
        background. Everything is checked first: on any error the previous models stay loaded and
        the ValueError names the problem."""
        base_ref = str(base_ref or "").strip()
        ft_refs = [str(r).strip() for r in (ft_refs or []) if str(r).strip()]
        if not base_ref:
            raise ValueError("pick a base model")
        if not ft_refs:
            raise ValueError("pick at least one fine-tuned model to merge into the base")
        dupes = sorted({r for r in ft_refs if ft_refs.count(r) > 1})
        if dupes:
            raise ValueError(f"fine-tune(s) listed twice: {', '.join(dupes)}; list each once (use its weight instead)")
        if base_ref in ft_refs:
            raise ValueError(f"{base_ref} is both the base and a fine-tune; its delta would be zero: remove it "
                             f"from the fine-tunes")
        base_dir = resolve_model(base_ref, policy=self.policy, progress=progress)
        ft_dirs = [resolve_model(r, policy=self.policy, progress=progress) for r in ft_refs]
        access = ModelAccess(base_ref, base_dir, ft_refs, ft_dirs)
        self._drop_models()
        self.access, self.stats = access, StatsService(access, self.stats_cache)
        self.apl = APLService(access, self.data_files)
        self.pcb = PCBStatsService(access)
        self._dp = {}
        if start_stats:
            self.stats.start()
        return self

    @property
    def loaded(self) -> bool:
        return self.access is not None

    def require(self) -> ModelAccess:
        if self.access is None:
            raise ValueError("no models loaded yet: pick a base and at least one fine-tune, then load them")
        return self.access

    def _drop_models(self) -> None:
        if self.stats is not None:
            self.stats.cancel()
        if self.apl is not None:
            self.apl.cancel()
        if self.pcb is not None:
            self.pcb.cancel()
        if self.access is not None:
            self.access.close()
        self.access = self.stats = self.apl = self.pcb = None

    def allow_data(self, path: str | Path) -> None:
        """Let configs of this session name `path` as an `apl_data` file (the UI registers the
        files uploaded through the page; no other server file is read)."""
        self.data_files.add(str(Path(path).expanduser().resolve()))

    # -- configs

    def config(self, source) -> MergeConfig:
        """A MergeConfig over the loaded models: from MethodControls, a MergeConfig, a dict or YAML;
        its models must all be loaded fine-tunes."""
        acc = self.require()
        if isinstance(source, MethodControls):
            cfg = source.to_config(acc.base_ref, acc.ft_refs)
        elif isinstance(source, MergeConfig):
            cfg = source
        else:
            cfg = load_config(source)
        self.align(cfg)
        return cfg.with_layers(n_layers_of(acc.names))      # per-layer (gradient) values resolve by layer

    def align(self, cfg: MergeConfig) -> list[int]:
        """Index among the loaded fine-tunes of each of the config's models (the base, when an
        interpolation lists it as an input, left out: `analysis.fine_tunes` gives the matching view)."""
        acc = self.require()
        # An interpolation may take the base as one more input (linear, karcher): it is no fine-tune.
        models = [m for m in cfg.models if m.model != cfg.base_model]
        missing = [m.model for m in models if m.model not in acc.ft_refs]
        if missing:
            raise ValueError(f"the config lists {missing[0]!r}, which is not loaded; loaded fine-tunes: "
                             f"{', '.join(acc.ft_refs)}")
        return [acc.ft_refs.index(m.model) for m in models]

    # -- DP and APL

    def dp_maps(self, cfg: MergeConfig) -> list[dict] | None:
        """The per-tensor density maps of a DP or APL prune, aligned with the config's models: DP's
        from the whole-model statistics, APL's `apl.merge_inputs(cfg).maps` from each fine-tune's
        importance (both computed once in the background and cached); None while they are being
        computed, or when the config prunes otherwise. APL refuses (ConfigError) a fine-tune
        without task data, before anything is computed."""
        if cfg.prune == "apl":
            plan = self.apl.merge_inputs(cfg, self.align(cfg))
            return None if plan is None else plan.maps
        if cfg.prune != "dp":
            return None
        full = self.stats.full(cfg.get("dp_outlier_m"))
        if full is None:
            return None
        return [self.dp_map(full, j, m.get("density"), cfg.get("dp_lambda"), cfg.get("dp_outlier_m"))[0]
                for j, m in zip(self.align(cfg), cfg.models)]

    def dp_notices(self, cfg: MergeConfig) -> list[str]:
        """DP's warnings for this config (modules pruned to density 0), once the statistics are there."""
        if cfg.prune != "dp" or self.stats.full(cfg.get("dp_outlier_m")) is None:
            return []
        full = self.stats.full(cfg.get("dp_outlier_m"))
        out = []
        for j, m in zip(self.align(cfg), cfg.models):
            for w in self.dp_map(full, j, m.get("density"), cfg.get("dp_lambda"), cfg.get("dp_outlier_m"))[1]:
                out.append(f"{short(m.model)}: {w}")
        return out

    def dp_map(self, full: list[DeltaStats], j: int, density: float, dp_lambda: float, m: float):
        key = (j, round(density, 9), round(dp_lambda, 9), round(m, 9))
        if key not in self._dp:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dmap = full[j].dp_map(density, dp_lambda)
            self._dp[key] = (dmap, [str(w.message) for w in caught])
        return self._dp[key]

    def stats_progress(self, outlier_m: float = 5.0) -> Progress:
        return self.stats.progress(outlier_m) if self.stats else Progress()

    def apl_progress(self, cfg: MergeConfig) -> Progress:
        """Progress of the APL importance a `prune: apl` config waits for (done/total fine-tunes)."""
        return self.apl.progress(cfg, self.align(cfg)) if self.apl and cfg.prune == "apl" else Progress()

    def apl_map(self, index: int, cfg: MergeConfig | None = None, compute: bool = True,
                progress: Callable[[int, int, str], None] | None = None) -> dict | None:
        """The APL importance map (apl.importance_table: blocks x modules, exact intervention and
        gradient side by side, APL's densities) of loaded fine-tune `index`, with the task data,
        examples, gradient point, density and λ of `cfg`'s model for it (defaults without one).
        Cached; with compute=False, None until it was computed once in this session."""
        acc = self.require()
        if not 0 <= index < len(acc.ft_refs):
            raise ValueError(f"pick a loaded fine-tune (0..{len(acc.ft_refs) - 1}), got {index}")
        ref = acc.ft_refs[index]
        m = next((m for m in (cfg.models if cfg is not None else []) if m.model == ref), None)
        cfg = cfg or MergeConfig(base_model=acc.base_ref, models=[])
        density = m.get("density") if m is not None and cfg.prune != "none" else None
        return self.apl.table(index, ref, apl_data=m.get("apl_data") if m is not None else None,
                              domain=m.domain if m is not None else None, examples=cfg.get("apl_examples"),
                              gradient_at=cfg.get("apl_gradient_at"), density=density, apl_lambda=cfg.get("apl_lambda"),
                              compute=compute, progress=progress)

    def pcb_stats(self, cfg: MergeConfig, wait: float | None = None) -> PCBStats | None:
        """PCB's whole-model statistics for `cfg` over the loaded models, as a `scope: model` merge
        computes them, in the background (PCBStatsService): waits up to `wait` seconds (None: until
        they are there). None for another combine, `scope: tensor`, while DP's or APL's density maps
        are being computed, or while the statistics are."""
        if cfg.combine != "pcb" or cfg.get("pcb_scope") != "model":
            return None
        maps = self.dp_maps(cfg)
        if cfg.prune in ("dp", "apl") and maps is None:
            return None
        self.require()
        return self.pcb.get(cfg, self.align(cfg), maps, wait)

    def pcb_progress(self, cfg: MergeConfig) -> Progress | None:
        """The progress of `cfg`'s PCB statistics (None: not asked for, or not PCB at scope model)."""
        if self.pcb is None or cfg.combine != "pcb" or cfg.get("pcb_scope") != "model":
            return None
        return self.pcb.progress(cfg, self.align(cfg))

    def kept_fraction(self, cfg: MergeConfig) -> list[float] | None:
        """Share of each fine-tune's delta entries the prune keeps (None while DP or APL wait)."""
        acc = self.require()
        maps = self.dp_maps(cfg)
        if cfg.prune in ("dp", "apl") and maps is None:
            return None
        return kept_fraction(cfg, {n: acc.shapes[n] for n in acc.float_names}, maps)

    # -- merging

    def working_bytes(self, cfg: MergeConfig) -> int:
        """Memory a streamed merge needs: (n + 2) float32 buffers of the largest tensor plus one
        prefetched set of inputs (PCB's whole-model statistics too: they are streamed); SMILE holds
        every checkpoint and the upscaled model in float32."""
        acc = self.require()
        largest = max((acc.numel[n] for n in acc.float_names), default=0)
        n = len(cfg.models)
        if cfg.upscale == "smile":
            return 4 * ((n + 1) * acc.n_params + self.smile_parameters(cfg))
        return (n + 2) * largest * 4 + (n + 1) * largest * 4

    def merge(self, source, controls=None, progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> Run:
        """Merge into a new run folder with the CLI's streaming engine (one merge at a time across
        sessions). DP reuses the session's statistics (waiting for them if they are still being
        computed); `amplification: auto` is searched first. Refuses, with the numbers, a merge
        whose working set does not fit in free memory."""
        cfg = copy.deepcopy(self.config(source))
        need, free = self.working_bytes(cfg), modelbuild.free_memory()["cpu"]
        if need > free:
            raise MergeRefused(f"this merge needs about {need / 2**30:.2f} GB of working memory but only "
                               f"{free / 2**30:.2f} GB is free; merge fewer models or wait for other merges")
        idx = self.align(cfg)
        alpha = {}
        if cfg.prune == "apl":          # the engine then finds every importance in apl's cache
            self.apl.wait(cfg, idx, cancel=cancel)
        with self.queue.slot():
            stats = None
            if cfg.prune == "dp":
                full = self.stats.wait(cfg.get("dp_outlier_m"), cancel=cancel)
                stats = [full[j] for j in idx]
            if any(m.get("amplification") == "auto" for m in cfg.models):
                cfg, alpha = self.search_amplification(cfg)
            number, folder = self.runs.next_folder()
            res = gpu.merge(cfg.to_dict(), folder, progress=progress, cancel=cancel, stats=stats,
                            log=lambda s: None)
        run = Run(number=number, config=cfg, folder=folder, seconds=res.seconds, device=res.device,
                  kept_fraction=res.kept_fraction, controls=controls,
                  notices=list(cfg.notices) + self.dp_notices(cfg), alpha_search=alpha,
                  parameters=self._parameters(cfg, folder))
        return self.runs.add(run)

    def _parameters(self, cfg: MergeConfig, folder: Path) -> dict:
        """{"total", "plain"} parameters of a run's model: a merge has the base's; a SMILE model
        adds its experts and routers (smile_model.parameter_count, from the folder's smile_config.json)."""
        if cfg.upscale == "smile":
            import json

            return dict(json.loads((Path(folder) / SMILE_CONFIG).read_text())["parameters"])
        n = self.require().n_params
        return {"total": n, "plain": n}

    # -- SMILE

    def smile_config(self, rank_of_expert: int | None = 64, rank_of_router: int = 8, num_experts_per_tok: int = 1,
                     scope: str = "blocks", others: str = "base") -> MergeConfig:
        """The `merge_method: smile` config of the loaded base and fine-tunes (rank_of_expert None =
        full rank); `merge(config)` builds it into a run folder. Bad values are refused by name."""
        acc = self.require()
        return self.config({"merge_method": "smile", "base_model": acc.base_ref, "models": list(acc.ft_refs),
                            "parameters": {"rank_of_expert": "full" if rank_of_expert is None else rank_of_expert,
                                           "rank_of_router": rank_of_router,
                                           "num_experts_per_tok": num_experts_per_tok,
                                           "smile_scope": scope, "smile_others": others}})

    def smile_parameters(self, cfg: MergeConfig) -> int:
        """The SMILE model's parameter count before it is built (the engine's dry run: ranks checked
        against every projection, no tensor read)."""
        return int(runner.merge(cfg.to_dict(), None, dry_run=True, device="cpu", log=lambda s: None).params)

    def merge_yaml(self, text: str, progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> Run:
        """Merge a config as written (any method and YAML feature: slices, tokenizer surgery, ...)
        into a new run. Every model it names must be reachable under this session's policy (model
        roots, hub rules) before anything is read."""
        stages = self.check_yaml(text)
        with self.queue.slot():
            number, folder = self.runs.next_folder()
            if len(stages) == 1:
                res = gpu.merge(stages[0].config.to_dict(), folder, progress=progress, cancel=cancel,
                                log=lambda s: None)
            else:       # the earlier stages go to a temporary folder beside the run, removed after
                res = gpu.merge_stages(text, folder, progress=progress, cancel=cancel, log=lambda s: None)
        cfg = stages[-1].config
        run = Run(number=number, config=cfg, folder=folder, seconds=res.seconds, device=res.device,
                  kept_fraction=res.kept_fraction, notices=list(cfg.notices) if len(stages) == 1 else
                  [n for n in res.notices if n.startswith("stage ")])
        return self.runs.add(run)

    def check_yaml(self, text: str):
        """The stages of a config (one per YAML document, in run order), every model they read that
        is not an earlier stage's output checked under this session's policy before anything is read."""
        stages = load_stages(text)
        produced = {s.name for s in stages if s.name is not None}
        for s in stages:
            cfg = s.config
            for ref in [*cfg.parents, *([cfg.tokenizer_source] if cfg.tokenizer_source else [])]:
                if ref.partition("+")[0] not in produced:
                    resolve_model(ref, policy=self.policy)
        return stages

    def search_amplification(self, source, log: Callable[[str], None] | None = None
                             ) -> tuple[MergeConfig, dict[str, dict]]:
        """DPPA's greedy α search for the models with `amplification: auto` (every model when none
        is), on the memory-mapped weights; returns the resolved config and {model: {alpha, score, path}}."""
        cfg = copy.deepcopy(self.config(source))
        if cfg.amplify != "dpa":
            raise ValueError("the α search needs a DPA amplify stage (preset dppa)")
        if not any(m.get("amplification") == "auto" for m in cfg.models):
            for m in cfg.models:
                m.settings["amplification"] = "auto"
        idx, loaded, stats = self._search_inputs(cfg)
        acc = self.access
        report = search.search_amplification(cfg, acc.base_dir, [acc.ft_dirs[j] for j in idx], log=log or (lambda s: None),
                                      loaded=loaded, stats=stats)
        return cfg, report

    # -- searches (dppa_ui.search) on the memory-mapped weights

    def _search_inputs(self, cfg: MergeConfig, cancel: Callable[[], bool] | None = None):
        """(index of each config model among the loaded fine-tunes, (base, fine-tunes) as memory-
        mapped views aligned with the config, their DeltaStats when the config prunes with DP)."""
        acc = self.require()
        idx = self.align(cfg)
        stats = None
        if cfg.prune == "dp":
            full = self.stats.wait(cfg.get("dp_outlier_m"), cancel=cancel)
            stats = [full[j] for j in idx]
        base = {n: acc.base.view(n) for n in acc.names}
        fts = [{n: acc.fts[j].view(n) for n in acc.names} for j in idx]
        return idx, (base, fts), stats

    def search(self, source, block: dict | None = None, *, preset: str | None = None,
               on_eval: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None,
               log: Callable[[str], None] | None = None, test: bool = True, threads: int | None = None):
        """A merge-parameter search over the loaded models (one at a time across sessions, in this
        process): `search.run_search` on `source`'s config with the `search:` block `block` (default:
        the config's own), or `preset="lambda"`: PCB's λ_i search (`search.lambda_search`).
        Returns the SearchResult; `on_eval(row)` after every candidate, `cancel()` polled between
        rounds (the result is then the best so far)."""
        cfg = copy.deepcopy(self.config(source))
        if preset not in (None, "lambda"):
            raise ValueError(f"unknown search preset {preset!r}: None (the block) or 'lambda'")
        spec = search.parse_search(cfg, block) if preset is None else None      # refusals before any read
        acc = self.require()
        # each candidate: a merged float32 state dict and the scoring model's copy of it
        need, free = self.working_bytes(cfg) + 2 * acc.n_params * 4, modelbuild.free_memory()["cpu"]
        if need > free:
            raise MergeRefused(f"this search needs about {need / 2**30:.2f} GB of working memory but only "
                               f"{free / 2**30:.2f} GB is free; search fewer models or wait for other merges")
        with self.queue.slot():
            idx, loaded, stats = self._search_inputs(cfg, cancel)
            base_dir, dirs = acc.base_dir, [acc.ft_dirs[j] for j in idx]
            if preset == "lambda":
                return search.lambda_search(cfg, base_dir, dirs, loaded=loaded, stats=stats, log=log,
                                            on_eval=on_eval, cancel=cancel)
            return search.run_search(cfg, spec, base_dir=base_dir, ft_dirs=dirs, loaded=loaded, stats=stats,
                                     on_eval=on_eval, cancel=cancel, log=log, test=test, threads=threads)

    # -- models for chat and score

    def model_dir(self, which: str) -> Path:
        """The folder of "merged" (the last run), "base", a loaded fine-tune's ref, or "run N"."""
        acc = self.require()
        if which == "merged" or which.startswith("run "):
            run = self.runs.last if which == "merged" else self.runs.get(int(which.split()[1]))
            if run is None:
                raise ValueError("no merged model yet: run a merge first")
            if not run.on_disk:
                raise ValueError(f"{run.name}'s files were removed to save disk; merge it again")
            return run.folder
        if which == "base":
            return acc.base_dir
        if which in acc.ft_refs:
            return acc.ft_dirs[acc.ft_refs.index(which)]
        raise ValueError(f"unknown model {which!r}: choose merged, base or one of {', '.join(acc.ft_refs)}")

    def load_kwargs(self) -> dict:
        """How chat and score build a model: disk offload into this session's folder if it must."""
        return {"offload_dir": str(self.temp_dir / "offload")}

    def model(self, which: str):
        """(model, tokenizer) of `which` (see model_dir), from the shared pool."""
        return modelbuild.POOL.get(self.model_dir(which), **self.load_kwargs())

    # -- end of session

    def close(self) -> None:
        """Stop background work and remove every file this session wrote."""
        self._drop_models()
        self.runs.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __del__(self):
        try:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


