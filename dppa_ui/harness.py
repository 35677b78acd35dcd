"""lm-evaluation-harness (lm-eval) tasks on the model objects this project builds.

  check_limit(n, what)            a document limit must be a whole number >= 1
  index(include_path, full)       lm-eval's task index: the folder's alone, or lm-eval's whole index
  load_tasks(names, include_path) lm-eval's task objects, their data loaded: an unknown name or data
                                  that cannot be loaded (offline) is a one-line ValueError naming
                                  the task, before any model is built
  loaded_task(name, ...)          load_tasks of one name, kept per few-shot count (the app's scores)
  wrap(model, tokenizer, batch)   lm-eval's HFLM around a model already built (accelerate-placed,
                                  offloaded, SMILE): nothing is loaded twice
  run(lm, tasks, ...)             lm-eval's simple_evaluate: its results dict, as its CLI writes it
  score(lm, tasks, samples, ...)  the same evaluation without simple_evaluate's environment report
                                  (it runs subprocesses, ~1 s a call): what a search calls per candidate
  metrics(results), table(results), to_json(results)

lm-eval is imported only inside these functions, so importing this module (and starting the app)
costs nothing. Task indexes are cached per include path: lm-eval's own index of every task takes
seconds to build, so names that a local folder (`include_path`) holds are looked up there alone.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .evaluation import load_weights, scoring_model
from .modelbuild import input_device

DEFAULT_BATCH = 8          # lm-eval keeps a batch's logits, batch x tokens x vocabulary in float32
STAT_KEYS = ("alias", "name", "sample_len", "samples")
_MANAGERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def check_limit(limit, what: str = "--limit") -> int | None:
    """`limit` (documents per task) as an int, None when not given; 0, negative, fractional or
    non-numeric values are refused by name."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float, str)):
        raise ValueError(f"{what} must be a whole number of documents per task (>= 1), got {limit!r}")
    try:
        value = float(limit)
    except ValueError:
        raise ValueError(f"{what} must be a whole number of documents per task (>= 1), got {limit!r}") from None
    if value < 1 or value != int(value):
        raise ValueError(f"{what} must be a whole number of documents per task (>= 1), got {limit!r}")
    return int(value)


def check_fewshot(k, what: str = "--num-fewshot") -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{what} must be a whole number of examples (>= 0), got {k!r}")
    return k


def parse_names(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a list (lm-eval's CLI takes `a,b,c`)."""
    raw = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [t.strip() for t in raw if str(t).strip()]
    if not names:
        raise ValueError("no lm-eval task named: give one or more, e.g. --lm-eval hellaswag,arc_easy")
    return names


@contextlib.contextmanager
def quiet(bars: bool = True):
    """lm-eval's warnings on a pre-built model ("`pretrained` is not of type str", ...) and
    transformers' on a generation config with max_new_tokens off, unless DPPA_UI_DEBUG is set;
    `bars=False`: lm-eval's progress bars too (a search scores hundreds of candidates). The bars
    have no switch in lm-eval's evaluate, so its modules' `tqdm` is a disabled one meanwhile."""
    import functools

    from transformers.utils import logging as hf_logging
    log = logging.getLogger("lm_eval")
    level, hf_level = log.level, hf_logging.get_verbosity()
    patched = []
    if not os.environ.get("DPPA_UI_DEBUG"):
        log.setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
    if not bars:
        import importlib
        for name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
            mod = importlib.import_module(name)
            patched.append((mod, mod.tqdm))
            mod.tqdm = functools.partial(_silent_bar, mod.tqdm)
    try:
        yield
    finally:
        for mod, orig in patched:
            mod.tqdm = orig
        log.setLevel(level)
        hf_logging.set_verbosity(hf_level)


def _silent_bar(bar, *args, **kwargs):
    return bar(*args, **{**kwargs, "disable": True})


def _manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager
    key = (str(include_path or ""), defaults)
    with _LOCK:
        if key not in _MANAGERS:
            with quiet():
                _MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=defaults)
        return _MANAGERS[key]


def resolve(manager, name: str) -> list[str]:
    """The names `manager` knows that `name` stands for: itself, or what its `*` glob matches."""
    if any(c in name for c in "*?["):
        return [n for n in manager.all_tasks if fnmatch.fnmatchcase(n, name)]
    return [name] if name in manager.all_tasks else []


def _folder(include_path: str | os.PathLike) -> str:
    inc = Path(include_path)
    if not inc.is_dir():
        raise ValueError(f"--include-path {include_path}: no such folder (it should hold lm-eval task YAML files)")
    return str(inc.resolve())


def index(include_path: str | os.PathLike | None = None, full: bool = True):
    """lm-eval's TaskManager: the include folder's tasks alone (`full=False`, milliseconds), or
    lm-eval's whole index plus the folder (seconds, once per process)."""
    inc = None if include_path is None else _folder(include_path)
    return _manager(inc, defaults=full or inc is None)


def task_manager(names: Sequence[str], include_path: str | os.PathLike | None = None):
    """lm-eval's TaskManager that knows every name: the include folder's alone when it holds
    them all (milliseconds), else lm-eval's full index plus the folder (seconds, once per process)."""
    if include_path is not None:
        local = index(include_path, full=False)
        if all(resolve(local, n) for n in names):
            return local
    return index(include_path, full=True)


@dataclass
class Tasks:
    """Loaded lm-eval tasks: `loaded` is TaskManager.load's dict (leaf tasks, groups, group map);
    `names` the names asked for (after glob expansion), in order; `members` each name's leaf tasks."""
    names: list[str]
    loaded: dict
    manager: Any
    members: dict[str, list[str]]

    @property
    def leaves(self) -> dict:
        return self.loaded["tasks"]


def _load_error(name: str, e: Exception) -> ValueError:
    """One line for a task that cannot be built: its data (datasets' errors, a connection or a
    file) with what to do offline, or its config."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if not (isinstance(e, OSError) or type(e).__module__.startswith("datasets")):
        return ValueError(f"lm-eval task {name!r} cannot be built ({type(e).__name__}: {first})")
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    hint = ("it is not in the local datasets cache and the hub is off (HF_HUB_OFFLINE=1): run it once online, "
            "or use a local task folder with --include-path") if offline else \
        "check the network, or use a local task folder with --include-path"
    return ValueError(f"lm-eval task {name!r}: its data cannot be loaded ({type(e).__name__}: {first}); {hint}")


def load_tasks(names: str | Sequence[str], include_path: str | os.PathLike | None = None) -> Tasks:
    """The named tasks (groups and tags expand; `*` globs) with their data loaded. Raises a
    one-line ValueError naming the first unknown task or the first whose data cannot be loaded."""
    names = parse_names(names)
    manager = task_manager(names, include_path)
    expanded: list[str] = []
    for n in names:
        found = resolve(manager, n)
        if not found:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3, cutoff=0.75)
            where = "lm-eval's task index" + (" or --include-path" if include_path else "")
            raise ValueError(f"unknown lm-eval task {n!r}: not in {where}"
                             + (f"; did you mean {', '.join(close)}?" if close else
                                "; list them with `python -m lm_eval ls tasks`"))
        expanded += [f for f in found if f not in expanded]
    tasks: dict = {}
    groups: dict = {}
    group_map: dict = {}
    members: dict[str, list[str]] = {}
    with quiet():
        for n in expanded:
            try:
                part = manager.load([n])
            except Exception as e:        # datasets' ConnectionError, DatasetNotFoundError, a bad YAML...
                raise _load_error(n, e) from None
            tasks.update(part["tasks"])
            members[n] = list(part["tasks"])
            groups.update(part.get("groups", {}))
            group_map.update(part.get("group_map", {}))
    return Tasks(names=expanded, loaded={"tasks": tasks, "groups": groups, "group_map": group_map},
                 manager=manager, members=members)


_LOADED: "OrderedDict[tuple, Tasks]" = OrderedDict()
_LOADED_LOCK = threading.Lock()       # not _LOCK: that one is held while the full index builds


def loaded_task(name: str, include_path: str | os.PathLike | None, num_fewshot: int | None) -> Tasks:
    """load_tasks of one name, kept (the last 32) per (name, include path, few-shot count), so
    scoring several models on it loads its data once. One set of objects per count: lm-eval sets
    the count on the task object and keeps a 0 once set (its rule for tasks that fix 0)."""
    key = (name, str(include_path or ""), num_fewshot)
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    tasks = load_tasks(name, include_path)
    with _LOADED_LOCK:
        _LOADED[key] = tasks
        while len(_LOADED) > 32:
            _LOADED.popitem(last=False)
    return tasks


def first_metric(task) -> str:
    """The metric a task lists first (acc for multiple choice, exact_match for the demo's
    generate tasks): the one a bar chart shows."""
    return next(iter(task.aggregation()))


def check_metric(tasks: Tasks, metric: str, what: str = "metric") -> None:
    """Every leaf task must report `metric` (e.g. acc_norm: multiple-choice tasks; exact_match:
    generate tasks): refused by name before any model is built."""
    name = metric.split(",")[0]
    for t, task in tasks.leaves.items():
        have = sorted(task.aggregation())
        if name not in have:
            raise ValueError(f"{what} {metric!r}: lm-eval task {t!r} does not report it (it reports {', '.join(have)})")


# ------------------------------------------------------------------------------------ the model

def wrap(model, tokenizer, batch_size: int | str | None = None):
    """lm-eval's HFLM around a model this project built (modelbuild.load, smile_model.load, a search's
    skeleton). HFLM takes `model.device` for the inputs, the first parameter's: for a model that
    accelerate spread over devices or disk the inputs go where its first placed module is."""
    from lm_eval.models.huggingface import HFLM

    with quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or DEFAULT_BATCH)
    lm._device = input_device(model)
    return lm


def _prepare(tasks: Tasks, num_fewshot: int | None, fewshot_seed: int) -> None:
    """What simple_evaluate does to the tasks before it evaluates them: the few-shot count (a task
    whose config fixes 0 keeps it) and a fresh few-shot sampler seed, so every call draws the same
    examples whichever process makes it."""
    for task in tasks.leaves.values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)


def run(lm, tasks: Tasks, *, limit: int | None = None, num_fewshot: int | None = None,
        apply_chat_template: bool = False, bootstrap_iters: int = 0, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on loaded tasks, with its default seeds: its results dict (results,
    groups, configs, versions, n-shot, config, environment), what its CLI writes.
    `bootstrap_iters` 0: no stderr (lm-eval's default, 100000, takes seconds per metric)."""
    from lm_eval import simple_evaluate
    with quiet():
        return simple_evaluate(model=lm, tasks=_top_level(tasks), task_manager=tasks.manager, limit=limit,
                               num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                               bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def _top_level(tasks: Tasks) -> list:
    """The task and group objects asked for (a group's children travel inside it)."""
    inner = {c for kids in tasks.loaded["group_map"].values() for c in kids}
    out = [g for n, g in tasks.loaded["groups"].items() if n not in inner]
    in_groups = {t.task_name for g in out for t in g.get_all_tasks()}
    return out + [t for n, t in tasks.leaves.items() if n not in in_groups]


def score(lm, tasks: Tasks, *, samples: dict[str, list[int]] | None = None, limit: int | None = None,
          num_fewshot: int | None = None, apply_chat_template: bool = False) -> dict:
    """lm-eval's evaluate on loaded tasks, seeded and prepared as simple_evaluate does it (the same
    numbers as `run` on the same documents), without its environment report."""
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    set_torch_seed(DEFAULT_OTHER_SEED)
    _prepare(tasks, num_fewshot, DEFAULT_OTHER_SEED)
    with quiet(bars=False):
        return evaluate(lm=lm, task_dict=tasks.loaded, limit=limit, samples=samples, bootstrap_iters=0,
                        log_samples=False, apply_chat_template=apply_chat_template,
                        fewshot_as_multiturn=True)        # simple_evaluate's default


# ---------------------------------------------------------------------------------- the results

def metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task or group: {metric: value}} from lm-eval's results (",none", the default filter, dropped
    from the metric names; stderr left out)."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for name, row in (results.get(section) or {}).items():
            vals = {}
            for key, v in row.items():
                if key in STAT_KEYS or "_stderr" in key or not isinstance(v, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                vals[metric if filt in ("", "none") else key] = float(v)
            if vals:
                out.setdefault(name, {}).update(vals)
    return out


def value(results: dict, tasks: Tasks, name: str, metric: str) -> float:
    """One asked-for name's metric: a task's or a group's as lm-eval reports it, a tag's (which
    lm-eval does not aggregate) the mean of its tasks'."""
    got = metrics(results)
    if name in got and metric in got[name]:
        return got[name][metric]
    leaves = [got.get(t, {}).get(metric) for t in tasks.members.get(name, [])]
    if not leaves or any(v is None for v in leaves):
        raise KeyError(f"lm-eval reported no {metric!r} for {name!r}")
    return sum(leaves) / len(leaves)


def table(results: dict) -> str:
    """lm-eval's own per-task table (and its group table when there are groups)."""
    from lm_eval.utils import make_table
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def to_json(results: dict) -> str:
    """lm-eval's results as its CLI writes them (numpy values and callables made plain)."""
    from lm_eval.utils import handle_non_serializable
    return json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                      default=handle_non_serializable, ensure_ascii=False)


# ------------------------------------------------------------------------------------ searches

@dataclass(frozen=True)
class Objective:
    """A search's lm-eval objective, `objective: {lm_eval: [TASKS], metric: acc_norm, limit: N}`
    (mergekit-evolve's fitness): the mean over the named tasks of `metric`. Small and picklable:
    each worker loads the tasks and builds its lm-eval model itself, once."""
    tasks: tuple[str, ...]
    metric: str = "acc_norm"
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    batch_size: int | None = None
    apply_chat_template: bool = False


def split_documents(tasks: Tasks, limit: int | None) -> dict[str, tuple[str | None, list[int] | None, list[int] | None]]:
    """Per leaf task: (the split the search scores, its documents, the test report's documents);
    the test report never sees a document the search saw. A task with a validation and a test split
    is searched on the first `limit` validation documents (all without a limit) and reported on the
    first `limit` test documents; a task with one split is searched on its documents [0, limit) and
    reported on [limit, 2 limit), so it needs a limit. None: every document."""
    plan = {}
    for name, task in tasks.leaves.items():
        if task.has_validation_docs() and task.has_test_docs():
            nv, nt = len(task.validation_docs()), len(task.test_docs())
            plan[name] = ("validation", None if limit is None else list(range(min(limit, nv))),
                          None if limit is None else list(range(min(limit, nt))))
            continue
        n = len(task.eval_docs)
        if limit is None:
            raise ValueError(f"lm-eval task {name!r} has one split only: give the objective a `limit: N` (the search "
                             f"scores its first N documents, the test report the next N; it has {n})")
        if limit >= n:
            raise ValueError(f"lm-eval task {name!r} has {n} documents: the search scores the first `limit` and the "
                             f"test report the next ones, so limit must be below {n}, got {limit}")
        plan[name] = (None, list(range(limit)), list(range(limit, min(2 * limit, n))))
    return plan


class Scorer:
    """lm-eval scores of state dicts: loaded into a private copy of the model at `model_dir` (a
    dir or ref of the architecture), wrapped once in lm-eval's HFLM. Tasks are loaded and checked
    (names, data, metric, splits) at construction, before any weight is read."""

    def __init__(self, objective: Objective, model_dir=None):
        self.objective = objective
        self.tasks = load_tasks(list(objective.tasks), objective.include_path)
        check_metric(self.tasks, objective.metric, "`search.objective.metric`")
        self.documents = split_documents(self.tasks, objective.limit)
        self.model_dir = model_dir
        self._lm = None

    @property
    def names(self) -> list[str]:
        return list(self.tasks.names)

    def describe(self, role: str = "search") -> str:
        """Which documents `role` ("search" or "test") scores, e.g. "validation split, first 50"."""
        out = set()
        for split, search_docs, test_docs in self.documents.values():
            docs = search_docs if role == "search" else test_docs
            if split:
                out.add(("validation" if role == "search" else "test") + " split"
                        + ("" if docs is None else f", first {len(docs)}"))
            else:
                out.add(f"documents {docs[0]}-{docs[-1]}")
        return "; ".join(sorted(out))

    @contextlib.contextmanager
    def _split(self, role: str):
        """The search scores a two-split task's validation split: lm-eval evaluates the test split
        when a task has one, so it is hidden for the call."""
        hidden = []
        if role == "search":
            for name, (split, _, _) in self.documents.items():
                if split == "validation":
                    task = self.tasks.leaves[name]
                    hidden.append((task, task.config.test_split))
                    task.config.test_split = None
        try:
            yield
        finally:
            for task, split in hidden:
                task.config.test_split = split

    def lm(self):
        if self._lm is None:
            model, tok = scoring_model(self.model_dir)
            self._lm = wrap(model, tok, self.objective.batch_size)
        return self._lm

    def __call__(self, state_dict: dict, role: str = "search") -> dict[str, dict[str, float]]:
        """{task name: {metric: value}} of `state_dict` on the search's documents (role "search")
        or the test report's ("test")."""
        lm = self.lm()
        load_weights(lm.model, state_dict)
        docs = {n: (p[1] if role == "search" else p[2]) for n, p in self.documents.items()}
        samples = {n: d for n, d in docs.items() if d is not None} or None     # a task left out: every document
        with self._split(role):
            results = score(lm, self.tasks, samples=samples, num_fewshot=self.objective.num_fewshot,
                            apply_chat_template=self.objective.apply_chat_template)
        m = self.objective.metric
        return {n: {m: value(results, self.tasks, n, m)} for n in self.tasks.names}
