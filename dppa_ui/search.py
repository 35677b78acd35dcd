"""Merge-parameter search: the merge settings that score best on held-out dev data.

mergekit-evolve's idea (evolve the merge parameters against a score), done on merges held in
memory: every candidate config is merged by `inmemory.merge_state_dicts` (no disk) and scored by
`evaluation` (one batched teacher-forced pass over the dev items). The optimizers are
nevergrad's (NGOpt, CMA, OnePlusOne, random search), plus DPPA's greedy alpha walk
(`methods.dpa.GreedyAlphaWalk`) as one more optimizer of the same loop. So the two searches of
the seed papers are presets of this one search, not separate code:

  amplification: auto   DPPA (python_contral.py): each fine-tune alone (weight 1, sum), its band
                        factors walked greedily from `alpha_start` (official [1.8, 0.0]) in steps
                        of `alpha_step` (0.1); the walk's end state, or its best (`alpha_search`).
  lambda: auto          PCB (pcb-merging.py, vision pcb_ES.py): one lambda_i per model (our model
                        `weight`, which PCB multiplies into the numerator only), NGOpt, init 1.0,
                        bounds [0.8, 1.3], budget 100, maximising the mean dev score over the
                        models' domains and returning nevergrad's recommendation, as pcb_ES.py
                        does (`lambda_objective: geometric` / `lambda_choice: best`: ours). (The
                        NLP merging.py uses [0.5, 3.0] and budget 200: write a `search:` block.)

A `search:` block in the YAML names what moves and how:

  search:
    parameters:                      # any numeric parameter, each with [lower, upper] bounds
      models[*].weight: [0.5, 1.5]   #   one value per model (models[0].weight: one model only;
      models[*].density: [0.1, 0.5]  #   plain `weight`: one value shared by every model)
      lambda: {lower: 0.8, upper: 1.3, init: 1.0}
      models[0].amplification[0]: [1.0, 3.0]
    optimizer: ngopt                 # ngopt | cma | oneplusone | random | greedy
    budget: 100                      # candidates scored
    objective: geometric             # geometric mean over domains of score / the best fine-tune's
                                     #   score there (DPPA's objective); mean (the mean score over
                                     #   domains, PCB's objective); one domain's name; or
                                     #   {lm_eval: [TASKS], metric: acc_norm, limit: N} (below)
    choice: best                     # best: the best point scored; recommendation: nevergrad's own
                                     #   (pcb_ES.py returns it; it may be a point never scored)
    metric: smooth                   # smooth (teacher-forced answer accuracy) | em (greedy decoding)
    data: zoo                        # the demo family's dev splits, or a list of JSONL files
    test_data: [test.jsonl]          # optional (zoo: its test split): scored once, for the result only
    domains: [reverse, cipher]       # optional: the objective's domains (default: the models' own)
    seed: 0

An lm-eval objective (mergekit-evolve's fitness) scores each candidate with lm-evaluation-harness
instead: the mean over the tasks of `metric`, on each task's validation split (or its first
`limit` documents: `harness.split_documents`); optional keys num_fewshot, include_path (a folder of task
YAML files), batch_size, apply_chat_template. `data`, `test_data`, `domains` and the top-level
`metric` do not apply to it. Each worker loads the tasks and wraps its model for lm-eval once.

Global parameters: lambda, dp_lambda, dp_outlier_m (DP), pcb_ratio, clip_ratio (PCB). Per model:
weight, density, amplification[k], partitions[k] (not the last: it is the density). A moved
density scales its model's partitions with it. Values at both bounds are validated as configs
before any tensor is read.

Parallel: candidates are asked in rounds of `batch` (default: the number of workers) and told to
the optimizer in the order asked, so the result depends on the seed, budget and batch only, not
on where or how fast each candidate ran: in-process, `workers` processes, or Ray actors (`ray`:
an address, or "auto"; optional dependency, imported only then). Each process or actor loads the
models once; candidates go to whichever is idle.

The best candidate scored, nevergrad's recommendation (`choice: recommendation`; it can be a point
never scored, which is then scored once more) or the greedy walk's end state is the result; its
config runs unchanged with `merge`. The test split is scored only for that result, never during
the search.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import harness, io
from .config import ConfigError, MergeConfig, load_config, number
from .evaluation import geometric_objective, load_suite, model_domain, score_state_dict, scoring_model
from .harness import Scorer
from .inmemory import merge_state_dicts
from .methods.dpa import GreedyAlphaWalk, official_start
from .refs import resolve_model
from .stats import collect_stats

OPTIMIZERS = {"ngopt": "NGOpt", "cma": "CMA", "oneplusone": "OnePlusOne", "random": "RandomSearch", "greedy": None}
METRICS = ("smooth", "em")
OBJECTIVES = ("geometric", "mean")      # or one domain's name
CHOICES = ("best", "recommendation")
# parameter -> (its internal name, the stage it needs to have an effect)
GLOBAL_PARAMS = {"lambda": ("lambda", "any"), "dp_lambda": ("dp_lambda", "dp"),
                 "dp_outlier_m": ("dp_outlier_m", "dp"), "pcb_ratio": ("pcb_ratio", "pcb"),
                 "clip_ratio": ("clip_ratio", "pcb")}
MODEL_PARAMS = {"weight": "any", "density": "prune", "amplification": "dpa", "partitions": "dpa"}
LIST_PARAMS = ("amplification", "partitions")
BLOCK_KEYS = {"parameters", "optimizer", "budget", "objective", "metric", "data", "test_data", "domains", "seed",
              "step", "mode", "choice"}
LM_EVAL_KEYS = {"lm_eval", "metric", "limit", "num_fewshot", "include_path", "batch_size", "apply_chat_template"}
LAMBDA_BOUNDS, LAMBDA_INIT, LAMBDA_BUDGET = (0.8, 1.3), 1.0, 100     # pcb-merging.py / pcb_ES.py
_NAME = re.compile(r"^(?:models\[(\d+|\*)\]\.)?([a-z_]+)(?:\[(\d+)\])?$")
_NEEDS = {"any": lambda c: True, "prune": lambda c: c.prune != "none", "dp": lambda c: c.prune == "dp",
          "pcb": lambda c: c.combine == "pcb", "dpa": lambda c: c.amplify == "dpa"}
_NEEDS_TEXT = {"prune": "a prune stage", "dp": "prune: dp", "pcb": "combine: pcb", "dpa": "amplify: dpa"}


# ------------------------------------------------------------------------------------ the spec

@dataclass(frozen=True)
class SearchParam:
    """One searched number: `key` of model `model` (an index, "all" = one value shared by every
    model, None = a global parameter), list position `index` for amplification / partitions."""
    name: str
    key: str
    model: int | str | None
    index: int | None
    lower: float
    upper: float
    init: float | None = None


@dataclass
class SearchSpec:
    params: list[SearchParam]
    optimizer: str = "ngopt"
    budget: int = 100
    objective: str = "geometric"
    metric: str = "smooth"
    data: str | list[str] = "zoo"
    test_data: list[str] | None = None
    domains: list[str] | None = None
    seed: int = 0
    step: float = 0.1               # greedy only: the walk's step
    mode: str = "official"          # greedy only: "official" (end state) or "best"
    choice: str = "best"            # nevergrad only: the "best" point scored or its "recommendation"
    lm_eval: Any = None             # harness.Objective when objective is "lm_eval"


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"`search.{key}`: {msg}")


def _bounds(value, name: str) -> tuple[float, float, float | None]:
    if isinstance(value, dict):
        unknown = set(value) - {"lower", "upper", "init"}
        if unknown:
            raise _err(f"parameters.{name}", f"unknown key(s) {sorted(unknown)}; use lower, upper, init")
        lo, hi, init = value.get("lower"), value.get("upper"), value.get("init")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        (lo, hi), init = value, None
    else:
        raise _err(f"parameters.{name}", f"give bounds as [lower, upper] or {{lower, upper, init}}, got {value!r}")
    lo, hi = (number(v, f"search.parameters.{name}.{what}") for what, v in (("lower", lo), ("upper", hi)))
    init = None if init is None else number(init, f"search.parameters.{name}.init")
    if not lo < hi:
        raise _err(f"parameters.{name}", f"empty bounds [{lo}, {hi}]: lower must be below upper")
    if init is not None and not lo <= init <= hi:
        raise _err(f"parameters.{name}", f"init {init} is outside [{lo}, {hi}]")
    return float(lo), float(hi), None if init is None else float(init)


def _params(cfg: MergeConfig, raw) -> list[SearchParam]:
    if not isinstance(raw, dict) or not raw:
        raise _err("parameters", "name at least one parameter to move, e.g. `models[*].weight: [0.5, 1.5]`")
    known = sorted(GLOBAL_PARAMS) + sorted(f"models[i|*].{k}" for k in MODEL_PARAMS) + \
        ["weight", "density", "amplification[k]", "partitions[k]"]
    out: list[SearchParam] = []
    for name, value in raw.items():
        m = _NAME.match(str(name))
        key = m.group(2) if m else None
        is_model = m is not None and (m.group(1) is not None or key in MODEL_PARAMS)
        if m is None or (key not in GLOBAL_PARAMS and key not in MODEL_PARAMS) or \
                (m.group(1) is not None and key not in MODEL_PARAMS):
            raise _err(f"parameters.{name}", f"unknown parameter; known: {', '.join(known)}")
        need = GLOBAL_PARAMS[key][1] if not is_model else MODEL_PARAMS[key]
        if not _NEEDS[need](cfg):
            raise _err(f"parameters.{name}", f"has no effect on {cfg.method_name}: it needs {_NEEDS_TEXT[need]}")
        index = int(m.group(3)) if m.group(3) is not None else None
        if (key in LIST_PARAMS) != (index is not None):
            raise _err(f"parameters.{name}", f"{key}[k] takes a band index" if key in LIST_PARAMS
                       else f"{key} is a number, not a list")
        lo, hi, init = _bounds(value, name)
        if not is_model:
            out.append(SearchParam(name, key, None, None, lo, hi, init))
            continue
        models = range(len(cfg.models)) if m.group(1) in (None, "*") else [int(m.group(1))]
        for i in models:
            if i >= len(cfg.models):
                raise _err(f"parameters.{name}", f"model index {i} is out of range: the config has "
                                                 f"{len(cfg.models)} model(s)")
            if index is not None:
                n_bands = len(cfg.models[i].get("partitions"))
                top = n_bands - 1 if key == "partitions" else n_bands
                if index >= top:
                    raise _err(f"parameters.{name}", f"index {index} is out of range for models[{i}] "
                               f"({n_bands} bands" + ("; the last partition is the density" if key == "partitions"
                                                       else "") + ")")
        if m.group(1) is None:       # `weight`: one value shared by every model
            out.append(SearchParam(name, key, "all", index, lo, hi, init))
        else:
            out += [SearchParam(f"models[{i}].{key}" + (f"[{index}]" if index is not None else ""), key, i, index,
                                lo, hi, init) for i in models]
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _err("parameters", f"{sorted(dup)} named twice")
    return out


def parse_search(cfg: MergeConfig, block: dict | None = None) -> SearchSpec:
    """Validate a `search:` block (default: the config's own) against the config it searches.
    Raises ConfigError naming the key; reads no tensor."""
    block = cfg.search if block is None else block
    if not isinstance(block, dict):
        raise ConfigError(f"`search` must be a mapping with at least `parameters`, got {block!r}")
    for key in block:
        if key not in BLOCK_KEYS:
            raise _err(key, f"unknown key; known: {', '.join(sorted(BLOCK_KEYS))}")
    params = _params(cfg, block.get("parameters"))
    optimizer = str(block.get("optimizer", "ngopt")).lower()
    if optimizer not in OPTIMIZERS:
        raise _err("optimizer", f"{block.get('optimizer')!r} is not one of {', '.join(OPTIMIZERS)}")
    budget = number(block.get("budget", 100), "search.budget", lo=1, integer=True)
    objective = block.get("objective", "geometric")
    choice = block.get("choice", "best")
    if choice not in CHOICES:
        raise _err("choice", f"`best` (the best point scored) or `recommendation` (nevergrad's), got {choice!r}")
    lm_eval = None
    if isinstance(objective, dict):
        lm_eval = _lm_eval_objective(objective, block)
        objective, metric = "lm_eval", lm_eval.metric
    else:
        metric = block.get("metric", "smooth")
        if metric not in METRICS:
            raise _err("metric", f"{metric!r} is not one of {', '.join(METRICS)}")
        if not isinstance(objective, str) or not objective:
            raise _err("objective", f"`geometric`, `mean`, a domain name or {{lm_eval: [TASKS], metric: acc_norm, "
                                    f"limit: N}}, got {objective!r}")
    data = block.get("data", "zoo")
    data = _files(data, "data") if data != "zoo" else "zoo"
    test = block.get("test_data")
    test = _files(test, "test_data") if test is not None else None
    domains = block.get("domains")
    if domains is not None and (not isinstance(domains, list) or not domains
                                or not all(isinstance(d, str) and d for d in domains)):
        raise _err("domains", f"a list of domain names, got {domains!r}")
    seed = number(block.get("seed", cfg.seed), "search.seed", lo=0, integer=True)
    step = number(block.get("step", cfg.get("alpha_step")), "search.step", lo=0, lo_open=True)
    mode = block.get("mode", cfg.get("alpha_search"))
    if mode not in ("official", "best"):
        raise _err("mode", f"`official` (the walk's end state) or `best`, got {mode!r}")
    spec = SearchSpec(params=params, optimizer=optimizer, budget=budget, objective=objective, metric=metric,
                      data=data, test_data=test, domains=domains, seed=seed, step=float(step), mode=mode,
                      choice=choice, lm_eval=lm_eval)
    base = search_base(cfg)
    for p in params:                # both bounds must give a valid config (density <= 1, ...)
        for v in (p.lower, p.upper):
            try:
                load_config(apply_values(base, [p], [v]))
            except ConfigError as e:
                raise _err(f"parameters.{p.name}", f"the bound {v} gives an invalid config: {e}") from None
    return spec


def _lm_eval_objective(obj: dict, block: dict):
    """`objective: {lm_eval: [TASKS], metric: acc_norm, limit: N, ...}` as a harness.Objective;
    only its shape here (the tasks are loaded, and their names, data and metric checked, by
    `run_search` before any tensor is read)."""
    unknown = set(obj) - LM_EVAL_KEYS
    if unknown or "lm_eval" not in obj:
        raise _err("objective", f"an lm-eval objective takes {', '.join(sorted(LM_EVAL_KEYS))} (lm_eval required)"
                   + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    for key in ("data", "test_data", "domains", "metric"):
        if key in block:
            raise _err(key, "does not apply to an lm_eval objective (its tasks are the data; give its metric "
                            "inside `objective`)")
    try:
        tasks = harness.parse_names(obj["lm_eval"] if isinstance(obj["lm_eval"], (str, list)) else "")
        limit = harness.check_limit(obj.get("limit"), "`search.objective.limit`")
        fewshot = harness.check_fewshot(obj.get("num_fewshot"), "`search.objective.num_fewshot`")
    except ValueError as e:
        raise _err("objective", str(e)) from None
    metric = obj.get("metric", "acc_norm")
    if not isinstance(metric, str) or not metric:
        raise _err("objective.metric", f"a metric name lm-eval reports (acc, acc_norm, exact_match...), got {metric!r}")
    batch = obj.get("batch_size")
    if batch is not None:
        batch = number(batch, "search.objective.batch_size", lo=1, integer=True)
    inc = obj.get("include_path")
    if inc is not None and (not isinstance(inc, str) or not Path(inc).is_dir()):
        raise _err("objective.include_path", f"a folder of lm-eval task YAML files, got {inc!r} (no such folder)")
    chat = obj.get("apply_chat_template", False)
    if not isinstance(chat, bool):
        raise _err("objective.apply_chat_template", f"true or false, got {chat!r}")
    return harness.Objective(tasks=tuple(tasks), metric=metric, limit=limit, num_fewshot=fewshot,
                             include_path=inc, batch_size=batch, apply_chat_template=chat)


def _files(value, key: str) -> list[str]:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise _err(key, f"`zoo` or a list of JSONL files, got {value!r}")
    for f in files:
        if not Path(f).is_file():
            raise _err(key, f"file {f!r} does not exist")
    return files


# ------------------------------------------------------------------------ candidates as configs

def search_base(cfg: MergeConfig) -> dict:
    """The config every candidate starts from: explicit values, no search block, no `auto`."""
    d = cfg.to_dict()
    d.pop("search", None)
    if d["parameters"].get("lambda") == "auto":
        d["parameters"]["lambda"] = cfg.get("lambda")
    return d


def current_value(cfg: MergeConfig, p: SearchParam) -> float:
    """The value the config gives parameter `p` (the first model's, for a shared one)."""
    if p.model is None:
        return float(cfg.get(GLOBAL_PARAMS[p.key][0]))
    v = cfg.models[0 if p.model == "all" else p.model].get(p.key)
    return float(v[p.index] if p.index is not None else v)


def apply_values(base: dict, params: Sequence[SearchParam], values: Sequence[float]) -> dict:
    """A config dict: `base` with each parameter set to its value. A moved density scales that
    model's partitions with it, so they still end at the density."""
    d = copy.deepcopy(base)
    for p, v in zip(params, values):
        v = float(v)
        if p.model is None:
            d["parameters"][p.key] = v
            continue
        for i in (range(len(d["models"])) if p.model == "all" else [p.model]):
            mp = d["models"][i]["parameters"]
            if p.key == "density" and mp.get("partitions"):
                old = mp["density"]
                mp["partitions"] = [f * v / old for f in mp["partitions"][:-1]] + [v]
            if p.index is not None:
                mp[p.key] = list(mp[p.key])
                mp[p.key][p.index] = v
            else:
                mp[p.key] = v
    return d


# ------------------------------------------------------------------------------- data, scoring

@dataclass
class Scoring:
    """What a candidate is scored on: the dev items, and how scores become the objective."""
    items: list[dict]
    domains: list[str]
    objective: str = "geometric"
    metric: str = "smooth"
    reference: dict[str, float] | None = None     # per domain: the best fine-tune's score (geometric)
    lm_eval: Any = None                           # harness.Objective: `domains` are its task names

    def value(self, scores: dict) -> float:
        """The objective of per-domain scores ({domain: {metric: value}}, as score_model gives)."""
        if self.lm_eval is not None or self.objective == "mean":
            return sum(float(scores[d][self.metric]) for d in self.domains) / len(self.domains)
        if self.objective != "geometric":
            return float(scores[self.objective][self.metric])
        return geometric_objective(scores, {d: {self.metric: r} for d, r in self.reference.items()},
                                   self.metric, self.domains)

    def rate(self, res: dict) -> dict:
        """A worker's result ({"scores": {domain: metric}, ...}) with its objective (0 if it failed)."""
        ok = res["error"] is None
        return {**res, "objective": self.value({d: {self.metric: v} for d, v in res["scores"].items()}) if ok else 0.0}


def model_domains(cfg: MergeConfig, ft_dirs: Sequence[Path]) -> list[list[str] | None]:
    """Each model's domains: its `domain:`, else what a registered look-up knows (demo models
    know theirs), else None."""
    out = []
    for m, d in zip(cfg.models, ft_dirs):
        dom = m.domain or model_domain(d)
        out.append(None if not dom else [dom] if isinstance(dom, str) else list(dom))
    return out


def load_items(data: str | list[str], split: str, domains: Sequence[str] | None) -> list[dict]:
    if data == "zoo":
        return load_suite("zoo", split, domains=domains)
    items = []
    for f in data:
        items += load_suite(f, split)
    if domains is not None:
        missing = set(domains) - {it["domain"] for it in items}
        if missing:
            raise ValueError(f"the search data has no items for domain(s) {sorted(missing)}")
        items = [it for it in items if it["domain"] in domains]
    return items


def objective_domains(spec: SearchSpec, per_model: list[list[str] | None], what: str) -> list[str] | None:
    """The objective's domains: the block's `domains`, else every model's own; None = every
    domain of JSONL data. Zoo data needs each model's domain (demo models know theirs)."""
    if spec.domains is not None:
        return list(spec.domains)
    if spec.objective not in OBJECTIVES:
        return [spec.objective]
    if any(d is None for d in per_model):
        if spec.data == "zoo":
            raise ValueError(f"{what} needs `domain:` for each model (the dev split it is scored on); "
                             f"demo models know theirs")
        return None
    return list(dict.fromkeys(d for ds in per_model for d in ds))


# --------------------------------------------------------------------------------- evaluation

@dataclass
class EvalTask:
    """What a worker process or Ray actor needs to score candidates (small and picklable): model
    refs are loaded where the job runs, once."""
    base: str
    models: list[str]
    scoring: Scoring
    allow_pickle: bool = False
    config: dict | None = None          # a candidate to prepare for (DP statistics, the scorer's model)


class Evaluator:
    """Holds the models and merges + scores candidate configs (dicts) in memory."""

    def __init__(self, base_dir: Path, base_sd: dict, ft_sds: list[dict], scoring: Scoring,
                 stats: list | None = None, stats_m: float | None = None, harness=None):
        self.base_dir, self.base_sd, self.ft_sds, self.scoring = Path(base_dir), base_sd, ft_sds, scoring
        self._stats = {round(stats_m, 9): stats} if stats is not None and stats_m is not None else {}
        self.harness = harness          # harness.Scorer of an lm-eval objective (its tasks loaded)

    @classmethod
    def from_job(cls, job: EvalTask) -> "Evaluator":
        base_dir = resolve_model(job.base, allow_pickle=job.allow_pickle)
        fts = [io.read_state_dict(resolve_model(m, allow_pickle=job.allow_pickle), allow_pickle=job.allow_pickle)
               for m in job.models]
        scorer = None
        if job.scoring.lm_eval is not None:
            scorer = Scorer(job.scoring.lm_eval, base_dir)
        ev = cls(base_dir, io.read_state_dict(base_dir, allow_pickle=job.allow_pickle), fts, job.scoring,
                 harness=scorer)
        if job.config is not None:         # now, not in the first candidate's time
            ev.stats(load_config(job.config))
            scoring_model(base_dir)
            if scorer is not None:
                scorer.lm()
        return ev

    def stats(self, cfg: MergeConfig):
        if cfg.prune != "dp":
            return None
        key = round(cfg.get("dp_outlier_m"), 9)
        if key not in self._stats:
            names = [n for n, t in self.base_sd.items() if t.is_floating_point()]
            self._stats[key] = collect_stats(names, lambda n: (self.base_sd[n], [sd[n] for sd in self.ft_sds]),
                                             [m.model for m in cfg.models], cfg.get("dp_outlier_m"))
        return self._stats[key]

    def scores(self, state_dict: dict, items: list[dict] | None = None, generate: bool | None = None) -> dict:
        if self.harness is not None:        # lm-eval: the search's documents
            return self.harness(state_dict, "search")
        gen = self.scoring.metric == "em" if generate is None else generate
        return score_state_dict(self.base_dir, state_dict, items if items is not None else self.scoring.items,
                                generate=gen)

    def merged(self, config: dict | MergeConfig) -> dict:
        cfg = config if isinstance(config, MergeConfig) else load_config(config)
        with warnings.catch_warnings():        # "DP pruned a module to density 0" is a candidate's problem
            warnings.simplefilter("ignore")
            return merge_state_dicts(self.base_sd, self.ft_sds, cfg, stats=self.stats(cfg))

    def evaluate(self, config: dict) -> dict:
        """{"scores" (per domain: the metric), "seconds", "error"} for one candidate; a candidate
        that is not a valid config gets no scores and the reason. The objective is computed by
        the caller (`Scoring.rate`), so workers need no reference scores."""
        t0 = time.perf_counter()
        try:
            scores = self.scores(self.merged(config))
        except ConfigError as e:
            return {"scores": {}, "seconds": time.perf_counter() - t0, "error": str(e)}
        return {"scores": {d: s[self.scoring.metric] for d, s in scores.items()},
                "seconds": time.perf_counter() - t0, "error": None}


# ------------------------------------------------------------------------------------ executors

class _Serial:
    def __init__(self, evaluator: Evaluator, threads: int | None = None):
        import torch
        self.ev, self.torch, self.restore = evaluator, torch, torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)

    def map(self, configs: list[dict]) -> list[dict]:
        return [self.ev.evaluate(c) for c in configs]

    def close(self):
        self.torch.set_num_threads(self.restore)


_WORKER: Evaluator | None = None


def _pool_init(job: EvalTask, threads: int) -> None:
    import torch
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = Evaluator.from_job(job)


def _pool_eval(config: dict) -> dict:
    return _WORKER.evaluate(config)


class _Pool:
    """Worker processes, each loading the models once. They start from a fork server that has
    imported torch and transformers but run nothing yet: a process forked after torch's OpenMP
    threads have run hangs in its first parallel op, and a spawned one re-imports everything."""

    def __init__(self, job: EvalTask, n: int, threads: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "transformers", "dppa_ui.search"])
        else:
            ctx = mp.get_context("spawn")
        self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_pool_init, initargs=(job, threads))
        for _ in range(n):      # start every worker now (each submit starts at most one)
            self.pool.submit(int)

    def map(self, configs: list[dict]) -> list[dict]:
        return list(self.pool.map(_pool_eval, configs))

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class _Ray:
    """Ray actors (`ray` imported only here). Each actor loads the models once, by ref, where it
    runs (so the paths or hub ids must resolve on every node); a round's candidates go to idle
    actors as they free up, and come back in the order asked."""

    def __init__(self, job: EvalTask, n: int, address: str, threads: int = 1):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise RuntimeError("--ray needs Ray: pip install 'ray[default]'") from None
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
                     log_to_driver=False)

        @ray.remote(num_cpus=threads)
        class _Actor:
            def __init__(self, job):
                import torch
                torch.set_num_threads(threads)
                self.ev = Evaluator.from_job(job)

            def evaluate(self, config):
                return self.ev.evaluate(config)

        self.ray = ray
        self.actors = [_Actor.remote(job) for _ in range(n)]
        self.pool = ActorPool(self.actors)

    def map(self, configs: list[dict]) -> list[dict]:
        return list(self.pool.map(lambda a, c: a.evaluate.remote(c), configs))

    def close(self):
        for a in self.actors:
            self.ray.kill(a)


# ------------------------------------------------------------------------------------ optimizers

@contextlib.contextmanager
def _quiet_nevergrad():
    """Silence nevergrad's and cma's chatter, and make its meta-model work on numpy >= 2.4:
    nevergrad 1.0.12 calls float() on a one-element array from sklearn's LinearRegression.predict
    (its issue #1612), which numpy 2.4 turned from a warning into a TypeError. During our ask and
    tell, predict returns a 0-d array for one row; nothing else changes."""
    import sklearn.linear_model as lm
    orig = lm.LinearRegression

    class _LinearRegression(orig):
        def predict(self, X):
            out = super().predict(X)
            return out.reshape(()) if getattr(out, "shape", None) == (1,) else out

    lm.LinearRegression = _LinearRegression
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lm.LinearRegression = orig


class _Nevergrad:
    def __init__(self, name: str, params: list[SearchParam], init: list[float], budget: int, batch: int, seed: int,
                 choice: str = "best"):
        import numpy as np
        self.choice_rule = choice
        with _quiet_nevergrad():
            import nevergrad as ng
            arr = ng.p.Array(init=np.array(init, dtype=float), lower=np.array([p.lower for p in params]),
                             upper=np.array([p.upper for p in params]))
            arr.random_state = np.random.RandomState(seed)
            self.opt = ng.optimizers.registry[OPTIMIZERS[name]](parametrization=arr, budget=budget, num_workers=batch)
        self.pending: dict[int, Any] = {}

    def ask(self, n: int) -> list[tuple[int, list[float]]]:
        out = []
        with _quiet_nevergrad():
            for _ in range(n):
                cand = self.opt.ask()
                self.pending[id(cand)] = cand
                out.append((id(cand), [float(x) for x in cand.value]))
        return out

    def tell(self, token: int, objective: float) -> None:
        with _quiet_nevergrad():
            self.opt.tell(self.pending.pop(token), -float(objective))     # nevergrad minimises

    def choice(self, rows: list[dict]) -> list[float] | None:
        if self.choice_rule == "recommendation":      # what nevergrad's minimize returns
            with _quiet_nevergrad():
                return [float(x) for x in self.opt.provide_recommendation().value]
        return None        # the best candidate scored


class _Greedy:
    """DPPA's greedy walk over the parameters in order (their start: `init`)."""

    def __init__(self, init: list[float], budget: int, step: float, mode: str):
        self.walk = GreedyAlphaWalk(len(init), init, step, mode, max_evals=budget)

    def ask(self, n: int) -> list[tuple[int, list[float]]]:
        a = self.walk.ask()
        return [] if a is None else [(0, a)]

    def tell(self, token: int, objective: float) -> None:
        self.walk.tell(objective)

    def choice(self, rows: list[dict]) -> list[float] | None:
        return self.walk.result().alpha


# ---------------------------------------------------------------------------------------- search

@dataclass
class SearchResult:
    config: MergeConfig                 # the chosen config (no search block): runs with `merge`
    values: dict[str, float]            # the chosen value of each searched parameter
    objective: float                    # its dev objective
    rows: list[dict] = field(default_factory=list)     # one per candidate scored (see `run_search`)
    test: dict | None = None            # the chosen config on the test split: {"scores", "objective"}
    cancelled: bool = False
    seconds: float = 0.0
    spec: SearchSpec | None = None


def _resolve(cfg: MergeConfig, base_dir, ft_dirs, allow_pickle: bool):
    base_dir = Path(base_dir) if base_dir is not None else resolve_model(cfg.base_model, allow_pickle=allow_pickle)
    ft_dirs = [Path(d) for d in ft_dirs] if ft_dirs is not None else \
        [resolve_model(m.model, allow_pickle=allow_pickle) for m in cfg.models]
    return base_dir, ft_dirs


@dataclass
class Optimized:
    values: list[float]                 # the chosen point
    objective: float                    # its objective
    rows: list[dict]
    cancelled: bool = False


def optimize(spec: SearchSpec, evaluate: Callable[[list[list[float]]], list[dict]],
             init: Sequence[float] | None = None, batch: int = 1,
             on_eval: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None) -> Optimized:
    """The search loop on any objective: `evaluate(points)` returns, per point (a value per
    spec parameter), {"objective", and optionally "scores", "seconds", "error"}. Rounds of
    `batch` points are asked, evaluated together and told in the order asked. The choice: the
    greedy walk's (end state or best), else the best point scored (the first of equals); a
    chosen point never scored is scored once more (a row with phase "final"). `spec.choice`
    "recommendation": nevergrad's recommendation instead of the best point scored."""
    init = [min(max(p.init if p.init is not None else v, p.lower), p.upper)
            for p, v in zip(spec.params, init or [p.init if p.init is not None else p.lower for p in spec.params])]
    if spec.optimizer == "greedy":
        batch = 1                                    # each step needs the last score
    opt = _Greedy(init, spec.budget, spec.step, spec.mode) if spec.optimizer == "greedy" else \
        _Nevergrad(spec.optimizer, spec.params, init, spec.budget, batch, spec.seed, spec.choice)
    rows: list[dict] = []
    best = -math.inf

    def record(values, res, phase):
        nonlocal best
        if phase == "search":
            best = max(best, res["objective"])
        row = {"eval": len(rows) + 1, "phase": phase, "params": {p.name: float(v) for p, v in zip(spec.params, values)},
               "objective": float(res["objective"]), "best": best, "scores": res.get("scores", {}),
               "seconds": res.get("seconds", 0.0), "error": res.get("error")}
        rows.append(row)
        if on_eval:
            on_eval(row)
        return row

    cancelled, done = False, 0
    while done < spec.budget:
        if cancel and cancel():
            cancelled = True
            break
        asked = opt.ask(min(batch, spec.budget - done))
        if not asked:
            break
        for (token, values), res in zip(asked, evaluate([v for _, v in asked])):
            opt.tell(token, res["objective"])
            record(values, res, "search")
        done += len(asked)
    scored = [r for r in rows if r["phase"] == "search"]
    chosen = None if cancelled else opt.choice(rows)
    if chosen is None:
        if not scored:
            raise InterruptedError("search cancelled before any candidate was scored")
        top = max(scored, key=lambda r: r["objective"])
        return Optimized([top["params"][p.name] for p in spec.params], top["objective"], rows, cancelled)
    seen = [r for r in scored if all(abs(r["params"][p.name] - v) < 1e-9 for p, v in zip(spec.params, chosen))]
    objective = seen[-1]["objective"] if seen else record(chosen, evaluate([chosen])[0], "final")["objective"]
    return Optimized(list(chosen), objective, rows, cancelled)


def run_search(config, spec: SearchSpec | None = None, *, base_dir=None, ft_dirs=None,
               loaded: tuple[dict, list[dict]] | None = None, stats: list | None = None,
               workers: int = 1, ray: str | None = None, batch: int | None = None,
               on_eval: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None,
               log: Callable[[str], None] | None = None, test: bool = True,
               threads: int | None = None, allow_pickle: bool = False) -> SearchResult:
    """Search `config`'s `search:` block (or `spec`): merge and score every candidate, return the
    chosen config and every row.

    `loaded` = (base state dict, fine-tunes' state dicts aligned with the config's models) and
    `stats` (their DeltaStats at the config's dp_outlier_m) spare the reads when the caller holds
    them (the app). `workers` > 1: that many processes; `ray`: Ray actors (an address or "auto";
    "local" starts one here) instead. `batch`: candidates per round (default: the workers).
    `threads`: torch threads per worker process (default: the cores / workers) or, in-process, for
    the search's duration (default: unchanged). On a busy machine one thread per process is far
    faster than several: torch's OpenMP threads spin-wait for each other.

    `on_eval(row)` is called after every candidate with the row: {"eval" (1-based), "phase"
    ("search", or "final" for a chosen point the search never scored), "params" {name: value},
    "objective", "best" (best objective so far), "scores" {domain: metric}, "seconds", "error"}.
    `cancel()` is polled between rounds: when it returns True the search stops and returns the
    best found so far (cancelled=True). Nothing is written to disk (see `write_outputs`)."""
    t_start = time.perf_counter()
    log = log or (lambda s: None)
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    spec = spec or parse_search(cfg)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cfg.lambda_auto or any(isinstance(m.get("amplification"), str) for m in cfg.models):
        raise ValueError("resolve `amplification: auto` / `lambda: auto` first (search_amplification, "
                         "search_lambda), or run `python -m dppa_ui search`, which does")
    batch = 1 if spec.optimizer == "greedy" else batch or workers
    base_dir, ft_dirs = _resolve(cfg, base_dir, ft_dirs, allow_pickle)

    # Data and the objective's domains (lm-eval: its tasks, their data and splits): checked before
    # any tensor is read.
    scorer = None
    if spec.lm_eval is not None:
        scorer = Scorer(spec.lm_eval, base_dir)
        items, domains = [], scorer.names
        data_text = f"lm-eval {scorer.describe('search')}"
    else:
        domains = objective_domains(spec, model_domains(cfg, ft_dirs), "the search")
        items = load_items(spec.data, "dev", domains)
        domains = domains or list(dict.fromkeys(it["domain"] for it in items))
        if spec.objective not in OBJECTIVES and spec.objective not in domains:
            raise ValueError(f"search objective {spec.objective!r} is not a domain of the data ({', '.join(domains)})")
        data_text = f"dev, {len(items)} items"
    scoring = Scoring(items=items, domains=domains, objective=spec.objective, metric=spec.metric, lm_eval=spec.lm_eval)

    base_sd, ft_sds = loaded if loaded is not None else (
        io.read_state_dict(base_dir, allow_pickle=allow_pickle),
        [io.read_state_dict(d, allow_pickle=allow_pickle) for d in ft_dirs])
    ev = Evaluator(base_dir, base_sd, ft_sds, scoring, stats, cfg.get("dp_outlier_m"), harness=scorer)
    serial = _Serial(ev, threads if not ray and workers == 1 else None)   # the reference and test run here
    base = search_base(cfg)
    # Workers resolve the config's own refs where they run (a hub id or demo: ref resolves on any node).
    job = EvalTask(cfg.base_model, [m.model for m in cfg.models], scoring, allow_pickle, base)
    pool = None
    try:       # workers start loading the models while the reference is scored here
        pool = _Ray(job, workers, ray, threads or 1) if ray else \
            _Pool(job, workers, threads or max(1, (os.cpu_count() or 1) // workers)) if workers > 1 else None
        if spec.objective == "geometric":         # each domain's reference: the best fine-tune there
            per_ft = [ev.scores(sd) for sd in ft_sds]
            scoring.reference = {d: max(s[d][spec.metric] for s in per_ft) for d in domains}
        executor = pool or serial
        log(f"search: {len(spec.params)} parameter(s), {spec.optimizer}, budget {spec.budget}, batch {batch}, "
            f"{'Ray' if ray else f'{workers} worker(s)'}; objective {spec.objective} ({spec.metric}) on "
            f"{', '.join(domains)} ({data_text})")
        run = optimize(spec, lambda points: [scoring.rate(r) for r in executor.map(
                           [apply_values(base, spec.params, v) for v in points])],
                       init=[current_value(cfg, p) for p in spec.params], batch=batch, on_eval=on_eval, cancel=cancel)
        if pool is not None:
            pool.close()
            pool = None
        best_cfg = load_config(apply_values(base, spec.params, run.values))
        result = SearchResult(config=best_cfg, values={p.name: float(v) for p, v in zip(spec.params, run.values)},
                              objective=run.objective, rows=run.rows, cancelled=run.cancelled, spec=spec)
        if test and not run.cancelled:
            result.test = _test_report(ev, best_cfg, spec, domains)
    finally:
        if pool is not None:
            pool.close()
        serial.close()
    result.seconds = time.perf_counter() - t_start
    log(f"search: chose {result.values} (dev objective {run.objective:.4f}) after "
        f"{sum(r['phase'] == 'search' for r in run.rows)} candidates in {result.seconds:.1f} s")
    return result


def _test_report(ev: Evaluator, cfg: MergeConfig, spec: SearchSpec, domains: list[str]) -> dict | None:
    """The chosen config on the test split (EM and smooth per domain, and the objective against the
    best fine-tune's test score): reported once, never used by the search. lm-eval: its metric per
    task on the documents the search never scored, beside the best fine-tune's there."""
    if ev.harness is not None:
        scores = ev.harness(ev.merged(cfg), "test")
        refs = [ev.harness(sd, "test") for sd in ev.ft_sds]
        ref = {d: max(r[d][spec.metric] for r in refs) for d in domains}
        return {"scores": scores, "objective": ev.scoring.value(scores), "reference": ref,
                "documents": ev.harness.describe("test")}
    if spec.data != "zoo" and not spec.test_data:
        return None
    items = load_items(spec.test_data or "zoo", "test", domains)
    scores = ev.scores(ev.merged(cfg), items, generate=True)
    refs = [ev.scores(sd, items, generate=spec.metric == "em") for sd in ev.ft_sds]
    ref = {d: max(r[d][spec.metric] for r in refs) for d in domains}
    scoring = Scoring(items, domains, spec.objective, spec.metric, ref)
    return {"scores": scores, "objective": scoring.value(scores), "reference": ref}


# ------------------------------------------------------------------------------------- presets

def alpha_search(cfg: MergeConfig, i: int, base_dir, model_dir, *, ft_sd: dict | None = None,
                 base_sd: dict | None = None, stats=None, max_evals: int = 60,
                 log: Callable[[str], None] | None = None, on_eval=None, cancel=None) -> SearchResult:
    """`amplification: auto` for model i: its fine-tune alone (weight 1, lambda 1, sum), the greedy
    walk over its band factors from `alpha_start`, on its own domains' dev split."""
    m = cfg.models[i]
    single = copy.deepcopy(cfg)
    single.models = [copy.deepcopy(m)]
    sm = single.models[0]
    sm.settings["weight"], single.lambda_auto, single.combine = 1.0, False, "sum"
    single.settings.update({"lambda": 1.0, "normalize": False})
    start = list(cfg.get("alpha_start")) if cfg.get("alpha_start") is not None else official_start(len(m.get("partitions")))
    sm.settings["amplification"] = list(start)
    block = dict(cfg.search or {})
    dom = model_domains(single, [model_dir])[0]
    if dom is None and block.get("data", "zoo") == "zoo":
        raise ValueError(f"amplification: auto for {m.model} needs `domain:` (the dev split its alpha is "
                         f"scored on); demo models know theirs")
    spec = SearchSpec(params=[SearchParam(f"models[0].amplification[{k}]", "amplification", 0, k, 0.0, 1e3, a)
                              for k, a in enumerate(start)],
                      optimizer="greedy", budget=max_evals, objective="geometric", metric="smooth",
                      data=block.get("data", "zoo"), domains=dom, step=cfg.get("alpha_step"), mode=cfg.get("alpha_search"))
    loaded = (base_sd, [ft_sd]) if base_sd is not None and ft_sd is not None else None
    return run_search(single, spec, base_dir=base_dir, ft_dirs=[model_dir], loaded=loaded, stats=stats,
                      log=log, on_eval=on_eval, cancel=cancel, test=False)


def lambda_search(cfg: MergeConfig, base_dir, ft_dirs, *, loaded=None, stats=None,
                  budget: int | None = None, bounds: tuple[float, float] | None = None,
                  log=None, on_eval=None, cancel=None, workers: int = 1, ray: str | None = None) -> SearchResult:
    """`lambda: auto`: PCB's search of one lambda_i (model weight) per model, NGOpt from 1.0 within
    [0.8, 1.3], budget 100, on the dev split of every model's domains; the global lambda is 1. It
    maximises `lambda_objective` (official: the mean score over the domains) and returns
    `lambda_choice` (official: nevergrad's recommendation, as pcb_ES.py's `minimize`)."""
    block = dict(cfg.search or {})
    if block.get("data", "zoo") == "zoo" and not block.get("domains") and \
            any(d is None for d in model_domains(cfg, ft_dirs)):
        raise ValueError("lambda: auto needs `domain:` for each model (the dev split it is scored on); "
                         "demo models know theirs")
    budget, bounds = budget or LAMBDA_BUDGET, bounds or LAMBDA_BOUNDS
    c = copy.deepcopy(cfg)
    c.settings["lambda"], c.lambda_auto = 1.0, False
    spec = SearchSpec(params=[SearchParam(f"models[{i}].weight", "weight", i, None, bounds[0], bounds[1], LAMBDA_INIT)
                              for i in range(len(cfg.models))],
                      optimizer="ngopt", budget=budget, objective=cfg.get("lambda_objective"), metric="smooth",
                      data=block.get("data", "zoo"), domains=block.get("domains"), seed=cfg.seed,
                      choice=cfg.get("lambda_choice"))
    return run_search(c, spec, base_dir=base_dir, ft_dirs=ft_dirs, loaded=loaded, stats=stats, log=log,
                      on_eval=on_eval, cancel=cancel, test=False, workers=workers, ray=ray)


def search_amplification(cfg: MergeConfig, base_dir: Path, ft_dirs: list[Path],
                         log: Callable[[str], None] = print, max_evals: int = 60,
                         loaded: tuple[dict, list[dict]] | None = None,
                         stats: list | None = None) -> dict[str, dict]:
    """Resolve `amplification: auto`: DPPA's greedy alpha walk (search.alpha_search), per
    fine-tune alone, on the dev split of its domain, scoring the pruned fine-tune against the
    unpruned one. Sets each model's amplification; returns {model: {alpha, score, path}}.

    `loaded` = (base state dict, fine-tunes' state dicts, aligned with cfg.models) and `stats`
    (their DeltaStats at the config's dp_outlier_m) spare the reads when the caller (the app) holds them."""
    todo = [i for i, m in enumerate(cfg.models) if m.get("amplification") == "auto"]
    if not todo:
        return {}
    base_sd = loaded[0] if loaded else io.read_state_dict(base_dir)
    report = {}
    for i in todo:
        m = cfg.models[i]
        ft_sd = loaded[1][i] if loaded else io.read_state_dict(ft_dirs[i])
        log(f"searching amplification for {m.model} (dev split)")
        res = alpha_search(cfg, i, base_dir, ft_dirs[i], ft_sd=ft_sd, base_sd=base_sd,
                           stats=[stats[i]] if stats else None, max_evals=max_evals,
                           on_eval=lambda r: log(f"  alpha {list(r['params'].values())} -> {r['objective']:.4f}"))
        alpha = [round(v, 9) for v in res.values.values()]
        m.settings["amplification"] = alpha
        path = [([round(v, 9) for v in r["params"].values()], r["objective"]) for r in res.rows if r["phase"] == "search"]
        report[m.model] = {"alpha": alpha, "score": res.objective, "path": path}
        log(f"  chose {alpha} (score {res.objective:.4f})")
    return report


def search_lambda(cfg: MergeConfig, base_dir: Path, ft_dirs: list[Path],
                  log: Callable[[str], None] = print, loaded: tuple[dict, list[dict]] | None = None,
                  stats: list | None = None) -> dict:
    """Resolve `lambda: auto`: PCB's NGOpt search of one lambda_i (model weight) per model
    (search.lambda_search). Sets the weights and lambda 1; returns {weights, score, evaluations}."""
    if not cfg.lambda_auto:
        return {}
    log("searching lambda per model (PCB: NGOpt, init 1.0, bounds [0.8, 1.3], budget 100; dev split)")
    res = lambda_search(cfg, base_dir, ft_dirs, loaded=loaded, stats=stats)
    for m, w in zip(cfg.models, res.config.models):
        m.settings["weight"] = w.get("weight")
    cfg.settings["lambda"], cfg.lambda_auto = 1.0, False
    log(f"  chose weights {[m.get('weight') for m in cfg.models]} (score {res.objective:.4f})")
    return {"weights": [m.get("weight") for m in cfg.models], "score": res.objective, "evaluations": len(res.rows)}


# -------------------------------------------------------------------------------------- outputs

def write_outputs(result: SearchResult, out: Path) -> dict[str, Path]:
    """Into folder `out` (which must exist): best.yaml (runs with `merge`), search_log.csv (one row
    per candidate), search_plot.html (+ .png when kaleido is installed), summary.json."""
    import json
    out = Path(out)
    files = {"yaml": out / "best.yaml", "csv": out / "search_log.csv", "html": out / "search_plot.html",
             "summary": out / "summary.json"}
    files["yaml"].write_text(result.config.to_yaml())
    names = list(result.values)
    domains = list(dict.fromkeys(d for r in result.rows for d in r["scores"]))
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["eval", "phase", *names, "objective", "best_so_far", *(f"score:{d}" for d in domains),
                    "seconds", "error"])
        for r in result.rows:
            w.writerow([r["eval"], r["phase"], *(r["params"][n] for n in names), r["objective"], r["best"],
                        *(r["scores"].get(d, "") for d in domains), round(r["seconds"], 4), r["error"] or ""])
    fig = search_figure(result.rows)
    fig.write_html(str(files["html"]), include_plotlyjs="cdn")
    try:
        fig.write_image(str(out / "search_plot.png"))
        files["png"] = out / "search_plot.png"
    except Exception:          # kaleido (and its browser) are optional
        pass
    files["summary"].write_text(json.dumps({
        "values": result.values, "objective": result.objective, "test": result.test, "cancelled": result.cancelled,
        "seconds": result.seconds, "evaluations": len(result.rows)}, indent=2, default=float))
    return files


def search_figure(rows: list[dict]):
    """Objective per evaluation (dots) and the best so far (line)."""
    import plotly.graph_objects as go
    x = [r["eval"] for r in rows if r["phase"] == "search"]
    fig = go.Figure([go.Scatter(x=x, y=[r["objective"] for r in rows if r["phase"] == "search"], mode="markers",
                                name="objective"),
                     go.Scatter(x=x, y=[r["best"] for r in rows if r["phase"] == "search"], mode="lines",
                                name="best so far", line=dict(shape="hv"))])
    fig.update_layout(xaxis_title="evaluation", yaxis_title="objective (dev)", template="plotly_white",
                      margin=dict(l=50, r=20, t=30, b=40), height=360)
    return fig
