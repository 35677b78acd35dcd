"""6 · Score › lm-eval tasks: lm-evaluation-harness tasks beside the JSONL suites. The merged
model, the base and each fine-tune are scored on the picked tasks as `python -m dppa_ui score
--lm-eval` scores one model (the same model object, lm-eval's evaluation with its default seeds),
each (model files, task, limit, few-shot) once for every session; the merged model's numbers go
to its leaderboard row.

The picker starts with the demo tasks (assets/lm_eval, the only task folder the app reads: no
include path comes from the browser); searching loads lm-eval's own index of ~14,700 names once
per server (about 15 s). lm-eval's own tasks read their data from the Hugging Face hub, so they
are scored only where the server may download (online, DPPA_UI_ALLOW_DOWNLOADS on). lm-eval is
imported by the first search or score, never at start-up.
"""
from __future__ import annotations

import difflib
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from .. import figures, gpu, harness, zoo
from ..refs import files_identity
from ..workspace import short
from .common import (MAX_UPLOAD_ITEMS, AppState, UserError, expected, fmt, hub_offline, lenient, message, ok,
                     policy, warn)
from .reports import leaderboard, model_rows

TASK_FOLDER = Path(zoo.ZOO_DIR).parent / "lm_eval"       # the one include path the app uses
DEFAULT_TASKS = ["zoo_mc"]
DEFAULT_LIMIT = 50
MAX_MATCHES = 100
_RESULTS: OrderedDict = OrderedDict()     # (model files identity, task, limit, few-shot) -> result, every session
_LOCK = threading.Lock()
_NAME = re.compile(r"^(?:task|tag):\s*(\S+)\s*$", re.M)


def demo_tasks() -> list[str]:
    """The task and tag names of the demo folder, read from its YAML files as text (the picker's
    first choices, without importing lm-eval)."""
    names = {n for f in TASK_FOLDER.glob("*.yaml") for n in _NAME.findall(f.read_text(encoding="utf-8"))}
    return sorted(names)


def build(page) -> None:
    with gr.Group(elem_id="lm-eval-group"):
        gr.Markdown("**lm-eval tasks** ([lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness)): "
                    "the merged model, the base and each fine-tune on lm-eval's tasks, as `python -m dppa_ui score "
                    "MODEL --lm-eval TASKS` scores one. The demo tasks (`zoo_*`) are the demo domains; groups and "
                    "tags are scored task by task; each bar is the task's first metric.", elem_id="lm-eval-help")
        with gr.Row(equal_height=True):
            page.add("lm_query", gr.Textbox(label="Search lm-eval's tasks", placeholder="e.g. arc, hellaswag, mmlu_*",
                                            scale=3, elem_id="lm-eval-search"))
            page.add("lm_find_btn", gr.Button("Search lm-eval's index", scale=1, elem_id="lm-eval-find-btn"))
        page.add("lm_index_status", gr.Markdown("", elem_id="lm-eval-index-status", elem_classes=["status"]))
        with gr.Row(equal_height=True):
            page.add("lm_tasks", gr.Dropdown(demo_tasks(), value=DEFAULT_TASKS, multiselect=True, allow_custom_value=True,
                                             filterable=True, label="lm-eval tasks", scale=3, elem_id="lm-eval-tasks"))
            page.add("lm_limit", lenient(gr.Number(value=DEFAULT_LIMIT, label="Limit (documents per task)", scale=1,
                                                   minimum=1, maximum=MAX_UPLOAD_ITEMS, elem_id="lm-eval-limit")))
            page.add("lm_fewshot", lenient(gr.Number(value=0, label="Few-shot", scale=1, minimum=0,
                                                     elem_id="lm-eval-fewshot")))
            page.add("lm_btn", gr.Button("Score on lm-eval tasks", variant="primary", scale=1, elem_id="lm-eval-btn"))
        page.add("lm_status", gr.Markdown("", elem_id="lm-eval-status", elem_classes=["status"]))
        page.add("lm_plot", gr.Plot(label="lm-eval scores", elem_id="lm-eval-plot"))


# ----------------------------------------------------------------------------------- the picker

def hub_blocked() -> str | None:
    """Why this server fetches no task data from the hub (lm-eval's own tasks), or None."""
    if hub_offline():
        return "this server runs offline (HF_HUB_OFFLINE=1)"
    if not policy().allow_downloads:
        return "this server does not download (DPPA_UI_ALLOW_DOWNLOADS is off)"
    return None


def hub_refusal(name: str) -> str | None:
    """Why lm-eval's own task `name` cannot be scored here (its data comes from the hub), or None."""
    why = hub_blocked()
    if why is None:
        return None
    return (f"{name} is one of lm-eval's own tasks, whose data comes from the Hugging Face hub, and {why}: pick a "
            f"demo task (zoo_…), or run `python -m dppa_ui score MODEL --lm-eval {name}` where the hub is reachable")


def _matches(names: list[str], query: str) -> list[str]:
    """Names containing `query` (case-insensitive; a `*` glob matches whole names), those that
    start with it first."""
    q = query.lower()
    if any(c in q for c in "*?["):
        import fnmatch
        return sorted(n for n in names if fnmatch.fnmatchcase(n.lower(), q))
    hits = [n for n in names if q in n.lower()]
    return sorted(hits, key=lambda n: (not n.lower().startswith(q), n))


def _selected(value) -> list[str]:
    if value is None:
        return []
    return [str(x).strip() for x in ([value] if isinstance(value, str) else value) if str(x).strip()]


def find_tasks(v: dict) -> dict:
    """The picker's choices: the names of lm-eval's index containing the query (the index is
    loaded on the first search, once per server), beside what is picked and the demo tasks."""
    query = (v["lm_query"] or "").strip()
    if not query:
        return {"lm_index_status": warn("type part of a task name (e.g. arc, hellaswag, mmlu) to search lm-eval's index")}
    progress = v.get("progress")
    if progress is not None:
        progress((0, 1), desc="loading lm-eval's task index (about 15 s, once per server)")
    t0 = time.perf_counter()
    try:
        names = sorted(harness.index(TASK_FOLDER, full=True).all_tasks)
    except (*expected(), ImportError, OSError) as e:
        return {"lm_index_status": warn(f"lm-eval's task index cannot be loaded: {message(e)}")}
    took = time.perf_counter() - t0
    found = _matches(names, query)
    picked = _selected(v["lm_tasks"])
    choices = list(dict.fromkeys([*picked, *found[:MAX_MATCHES], *demo_tasks()]))
    shown = ("all in the picker" if len(found) <= MAX_MATCHES
             else f"the first {MAX_MATCHES} in the picker: narrow the search")
    text = (f"{len(found):,} of lm-eval's {len(names):,} task, group and tag names match {query!r} ({shown})"
            + (f"; index loaded in {fmt(took)} s" if took > 1 else ""))
    blocked = hub_blocked()
    if blocked and any(n not in demo_tasks() for n in found):
        text += f". lm-eval's own tasks read their data from the hub and {blocked}: it scores the demo tasks only"
    if not found:
        return {"lm_tasks": gr.update(choices=choices),
                "lm_index_status": warn(f"no name in lm-eval's index of {len(names):,} tasks, groups and tags "
                                        f"contains {query!r}")}
    return {"lm_tasks": gr.update(choices=choices), "lm_index_status": ok(text)}


# ----------------------------------------------------------------------------------- checks

def check_settings(limit, fewshot) -> tuple[int, int]:
    """(limit, few-shot) as whole numbers, or a UserError naming the value and the range."""
    if limit is None or limit == "":
        raise UserError(f"limit: give the number of documents per task to score (1 to {MAX_UPLOAD_ITEMS})")
    n = harness.check_limit(limit, "limit")
    if n > MAX_UPLOAD_ITEMS:
        raise UserError(f"limit {n}: this app scores at most {MAX_UPLOAD_ITEMS} documents per task "
                        f"(DPPA_UI_MAX_UPLOAD_ITEMS; use `python -m dppa_ui score --lm-eval` for more)")
    k = 0 if fewshot is None or fewshot == "" else fewshot
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    return n, harness.check_fewshot(k, "few-shot")


def leaf_tasks(names: list[str], progress=None) -> list[str]:
    """The tasks (leaves) the picked names stand for, their data loaded, or a UserError naming the
    first name that is unknown or whose data this server may not fetch."""
    if not names:
        raise UserError("pick one or more lm-eval tasks (the demo tasks are zoo_…)")
    local = harness.index(TASK_FOLDER, full=False)
    others = [n for n in names if not harness.resolve(local, n)]
    if others:
        if progress is not None:
            progress((0, 1), desc="loading lm-eval's task index (about 15 s, once per server)")
        full = harness.index(TASK_FOLDER, full=True)
        for n in others:
            if not harness.resolve(full, n):
                close = difflib.get_close_matches(n, full.all_tasks, n=3, cutoff=0.75)
                raise UserError(f"unknown lm-eval task {n!r}: not among the demo tasks nor in lm-eval's index"
                                + (f"; did you mean {', '.join(close)}?" if close else "; search the index above"))
            refusal = hub_refusal(n)
            if refusal:
                raise UserError(refusal)
    leaves: list[str] = []
    for n in names:
        tasks = harness.load_tasks(n, TASK_FOLDER)        # the data too: before any model is built
        leaves += [t for t in tasks.leaves if t not in leaves]
    return leaves


# ----------------------------------------------------------------------------------- scoring

def task_result(folder: Path, task: str, limit: int, fewshot: int, load_kwargs: dict) -> dict:
    """gpu.lm_eval_task of the model in `folder`, once per (model bytes, task, limit, few-shot)."""
    key = (files_identity(folder), task, limit, fewshot)
    with _LOCK:
        if key in _RESULTS:
            _RESULTS.move_to_end(key)
            return _RESULTS[key]
    result = gpu.lm_eval_task(folder, task, str(TASK_FOLDER), limit, fewshot, **load_kwargs)
    with _LOCK:
        _RESULTS[key] = result
        while len(_RESULTS) > 2048:
            _RESULTS.popitem(last=False)
    return result


def score_lm_eval(v: dict) -> dict:
    """The merged model (the last run), the base and every fine-tune on the picked lm-eval tasks."""
    state: AppState = v["state"]
    progress = v["progress"]
    t0 = time.perf_counter()
    try:
        limit, fewshot = check_settings(v["lm_limit"], v["lm_fewshot"])
        ws = state.workspace()
        run = ws.runs.last
        if run is None:
            raise UserError("merge first (4 · Merge): the bars compare the merged model with the base and fine-tunes")
        leaves = leaf_tasks(_selected(v["lm_tasks"]), progress)
        whos = ["merged", "base", *ws.access.ft_refs]
        results: dict[str, dict] = {w: {} for w in whos}
        total, k = len(whos) * len(leaves), 0
        for task in leaves:
            for who in whos:
                progress((k, total), desc=f"lm-eval {task} on {short(who)}", unit="scores")
                results[who][task] = task_result(ws.model_dir(who), task, limit, fewshot, ws.load_kwargs())
                k += 1
    except (*expected(), RuntimeError, ImportError) as e:
        return {"lm_status": warn(message(e))}
    for task, res in results["merged"].items():
        run.lm_eval[(task, limit, fewshot)] = res
    bars = {who: {f"{t} ({r['metric']})": {"value": r["metrics"][r["metric"]]} for t, r in res.items()}
            for who, res in results.items()}
    fig = figures.scores(model_rows(run, ws.access.ft_refs, bars), "value", axis="lm-eval task (its first metric)",
                         title=f"lm-eval: {limit} documents per task, {fewshot}-shot", y_title="score")
    docs = sorted({r["documents"] for r in results["merged"].values()})
    return {"lm_plot": fig, "leaderboard": leaderboard(state),
            "lm_status": ok(f"scored {len(whos)} models on {len(leaves)} lm-eval task(s) "
                            f"({'/'.join(map(str, docs))} documents each, {fewshot}-shot) in "
                            f"{fmt(time.perf_counter() - t0)} s")}


def wire(page) -> None:
    page.on([page["lm_find_btn"].click, page["lm_query"].submit], find_tasks, ["lm_query", "lm_tasks"],
            ["lm_tasks", "lm_index_status"], progress=True, api_name="lm_eval_tasks")
    page.on(page["lm_btn"].click, score_lm_eval, ["state", "lm_tasks", "lm_limit", "lm_fewshot"],
            ["lm_plot", "lm_status", "leaderboard"], progress=True, api_name="score_lm_eval", concurrency_limit=1,
            concurrency_id="merge")
