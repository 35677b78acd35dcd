"""6 · Score: the merged model, the base and each fine-tune per domain (each model scored once and
shared by every session), the geometric-mean objective, the session's leaderboard (reload any
run's settings) and the YAML that the CLI runs. A suite file is read only if this session uploaded
it through the page. For a SMILE model, the routing accuracy per domain (how often a domain's
tokens reach its own fine-tune's expert) sits beside the scores."""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from .. import evaluation, figures, gpu
from ..config import ConfigError
from ..controls import MethodControls
from ..engine import layer_stack
from ..refs import files_identity
from ..runner import merge as run_merge, merge_stages
from ..workspace import params_text, short
from . import lm_eval
from .choices import all_choices
from .common import CONTROL_KEYS, SCORE_PER_DOMAIN, AppState, UserError, expected, fmt, message, ok, warn
from .controls_ui import SHOW_OUT, controls_of, show_controls, yaml_into_controls
from .jobs import running
from .reports import LEADERBOARD_HEADERS, LEADERBOARD_WIDTHS, leaderboard, model_rows, run_summary
from .suites import (DEMO_SUITE, SUITE_FORMAT, UPLOAD_SUITE, demo_items, session_upload, upload_only,
                     upload_report)

_SCORES: OrderedDict = OrderedDict()        # (model files identity, suite key) -> scores, every session
_SCORES_LOCK = threading.Lock()
ROUTING_HEADERS = ["domain", "own expert: all tokens", "own expert: answer tokens", "items mostly routed to it"]
ROUTING_HELP = ("**Routing accuracy of the SMILE model**: the share of (layer, token) routing decisions whose top "
                "expert is the domain's own fine-tune's (chance: 1 / experts), over every token of prompt and answer "
                "and over the positions that predict the answer; and the share of items whose most-picked expert "
                "is their own.")


def build(page) -> None:
    with gr.Row(equal_height=True):
        page.add("suite", gr.Radio([DEMO_SUITE, UPLOAD_SUITE], value=DEMO_SUITE, label="Suite", scale=2,
                                   info=f"demo: the first {SCORE_PER_DOMAIN} held-out test items of each domain",
                                   elem_id="suite"))
        # No file_types: gradio would refuse another file with a bare "Error"; upload_suite names the problem
        page.add("upload", upload_only(gr.File(label="Suite file (.jsonl)", scale=2, elem_id="suite-upload",
                                               height=120)))
        page.add("score_btn", gr.Button("Score", variant="primary", scale=1, elem_id="score-btn"))
    page.add("score_status", gr.Markdown("", elem_id="score-status", elem_classes=["status"]))
    gr.Markdown(f"Suite file: {SUITE_FORMAT}.", elem_id="suite-help")
    page.add("objective", gr.Markdown("", elem_id="objective"))
    page.add("score_plot", gr.Plot(label="Scores", elem_id="score-plot"))
    # Under the scores rather than beside them: a plot drawn before a column appears beside it
    # keeps its width and is cut off.
    with gr.Group(visible=False, elem_id="routing-col") as routing_col:
        gr.Markdown(ROUTING_HELP, elem_id="routing-help")
        page.add("routing_table", gr.Dataframe(headers=ROUTING_HEADERS, label="Routing accuracy per domain",
                                               interactive=False, wrap=True, elem_id="routing-table",
                                               column_widths=["22%", "26%", "26%", "26%"]))
        page.add("routing_status", gr.Markdown("", elem_id="routing-status", elem_classes=["status"]))
    page.add("routing_col", routing_col)
    with gr.Accordion("All scores (JSON)", open=False):
        page.add("score_json", gr.JSON(label="Scores (all models)", elem_id="score-json"))
    lm_eval.build(page)
    page.add("leaderboard", gr.Dataframe(headers=LEADERBOARD_HEADERS, label="Session leaderboard", interactive=False,
                                         elem_id="leaderboard", wrap=True, column_widths=LEADERBOARD_WIDTHS))
    with gr.Row(equal_height=True):
        page.add("run_no", gr.Number(value=1, precision=0, label="Run", elem_id="run-number", scale=1))
        page.add("reload_btn", gr.Button("Load that run's settings", elem_id="reload-run-btn", scale=2))
        page.add("export_btn", gr.Button("Export the current settings as YAML", elem_id="export-yaml-btn", scale=2))
    page.add("runs_status", gr.Markdown("", elem_id="runs-status", elem_classes=["status"]))
    page.add("yaml_file", gr.File(label="YAML file", interactive=False, elem_id="yaml-file", visible=False, height=60))
    page.add("yaml_code", gr.Code(language="yaml", label="Config (runs with: python -m dppa_ui merge FILE --out DIR)",
                                  elem_id="yaml-code", interactive=True, max_lines=24))
    with gr.Row():
        page.add("load_yaml_btn", gr.Button("Load the YAML above into the controls", elem_id="load-yaml-btn",
                                            size="sm"))
        page.add("plan_yaml_btn", gr.Button("Plan: what this YAML builds", elem_id="plan-yaml-btn", size="sm"))
        page.add("merge_yaml_btn", gr.Button("Merge this YAML as written", elem_id="merge-yaml-btn", size="sm"))
    page.add("yaml_status", gr.Markdown("", elem_id="yaml-status", elem_classes=["status"]))
    page.add("yaml_plan", gr.Markdown("", elem_id="yaml-plan"))
    page.add("layer_stack", gr.Dataframe(headers=["output layer", "from model", "its layer"], interactive=False,
                                         visible=False, elem_id="layer-stack", label="Layer stack"))


# ----------------------------------------------------------------------------------- suites

def upload_suite(v: dict) -> dict:
    """A suite file arrived through the upload box: remember it for this session and check it."""
    text, registered = upload_report(v["state"], v["upload"])
    return {"score_status": text, **({"suite": UPLOAD_SUITE} if registered else {})}


def suite_items(state: AppState, choice: str, upload) -> tuple[list[dict], str, str]:
    """(items, cache key, label) of the chosen suite."""
    if choice != UPLOAD_SUITE:
        return demo_items(), f"zoo:test:{SCORE_PER_DOMAIN}", f"demo suite (first {SCORE_PER_DOMAIN} test items per domain)"
    path, items = session_upload(
        state, upload, 'upload a .jsonl file of {"prompt", "answer", "domain"} lines, or pick the demo suite',
        "score only reads suite files uploaded in this session: upload it with the suite box (API: /upload_suite first)")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return items, f"upload:{digest}", Path(path).name


# ----------------------------------------------------------------------------------- scoring

def score_folder(folder: Path, items, key: str, load_kwargs: dict) -> dict:
    """Scores of the model in `folder` on a suite, once per (model bytes, suite) for all sessions."""
    ck = (files_identity(folder), key)
    with _SCORES_LOCK:
        if ck in _SCORES:
            _SCORES.move_to_end(ck)
            return _SCORES[ck]
    scores = gpu.score(folder, items, **load_kwargs)
    with _SCORES_LOCK:
        _SCORES[ck] = scores
        while len(_SCORES) > 512:
            _SCORES.popitem(last=False)
    return scores


def objective_of(merged: dict, per_ft: dict[str, dict]) -> float | None:
    """Geometric mean over domains of merged / the best fine-tune on that domain (smooth score)."""
    ref = {}
    for d in merged:
        vals = [s[d] for s in per_ft.values() if d in s and s[d].get("smooth") is not None]
        if vals:
            ref[d] = max(vals, key=lambda x: x["smooth"])
    try:
        return evaluation.geometric_objective(merged, ref, "smooth", list(ref)) if ref else None
    except ValueError:
        return None


def score(v: dict):
    """Score merged (the last run), base and every fine-tune on the suite."""
    state: AppState = v["state"]
    progress = v["progress"]
    try:
        ws = state.workspace()
        run = ws.runs.last
        if run is None:
            raise UserError("merge first (4 · Merge): scoring compares the merged model with the base and fine-tunes")
        items, key, label = suite_items(state, v["suite"], v["upload"])
        whos = ["merged", "base", *ws.access.ft_refs]
        results = {}
        for i, who in enumerate(whos):
            progress((i, len(whos)), desc=f"scoring {short(who)}")
            results[who] = score_folder(ws.model_dir(who), items, key, ws.load_kwargs())
    except expected() as e:
        return {"score_status": warn(message(e))}
    obj = objective_of(results["merged"], {r: results[r] for r in ws.access.ft_refs})
    run.scores, run.objective, run.suite = results["merged"], obj, label
    rows = model_rows(run, ws.access.ft_refs, results, obj)
    obj_md = (f"**Objective of {run.name}** (geometric mean over domains of merged ÷ best fine-tune, smooth score): "
              f"**{fmt(obj)}**" if obj is not None else "**Objective**: n/a (no fine-tune scored on these domains)")
    return {"score_plot": figures.scores(rows), "objective": obj_md, "leaderboard": leaderboard(state),
            "score_json": results, "score_status": ok(f"scored {len(whos)} models on {label} ({len(items)} items)")}


SCORE_OUT = ["score_plot", "objective", "leaderboard", "score_json", "score_status"]


def routing_folder(folder: Path, items, key: str, load_kwargs: dict) -> dict:
    """Routing accuracy of the SMILE model in `folder` on a suite, once per (model bytes, suite)."""
    ck = (files_identity(folder), key, "routing")
    with _SCORES_LOCK:
        if ck in _SCORES:
            return _SCORES[ck]
    result = gpu.routing_accuracy(folder, items, **load_kwargs)
    with _SCORES_LOCK:
        _SCORES[ck] = result
    return result


def routing_rows(result: dict) -> list[list]:
    return [[d, round(r["all"]["decisions"], 3), round(r["answer"]["decisions"], 3), round(r["all"]["items"], 3)]
            for d, r in result.items()]


def score_routing(v: dict) -> dict:
    """After scoring: the routing accuracy per domain when the merged model is a SMILE model
    (hidden otherwise)."""
    state: AppState = v["state"]
    ws = state.ws
    run = ws.runs.last if ws is not None and ws.loaded else None
    if run is None or not run.is_smile:
        return {"routing_col": gr.update(visible=False), "routing_table": None, "routing_status": ""}
    try:
        items, key, label = suite_items(state, v["suite"], v["upload"])
        result = routing_folder(ws.model_dir("merged"), items, key, ws.load_kwargs())
    except (*expected(), RuntimeError) as e:
        return {"routing_col": gr.update(visible=True), "routing_status": warn(f"routing accuracy: {message(e)}")}
    run.routing = result
    if not result:
        return {"routing_col": gr.update(visible=True), "routing_table": [],
                "routing_status": f"no domain of {label} is the domain of one of the experts"}
    experts = len(run.models)
    return {"routing_col": gr.update(visible=True), "routing_table": routing_rows(result),
            "routing_status": f"{run.name} on {label}: {experts} experts, chance {1 / experts:.2f}"}


ROUTING_IN = ["state", "suite", "upload"]
ROUTING_OUT = ["routing_col", "routing_table", "routing_status"]


# ----------------------------------------------------------------------------------- configs

def reload_run(v: dict) -> dict:
    """A leaderboard row's settings (and models) back into the controls."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        run = ws.runs.get(int(v["run_no"] or 0))
        if run.is_smile:
            raise UserError(f"{run.name} is a SMILE model ({params_text(run.config)}): set these in "
                            f"4 · Merge › Upscale (SMILE)")
        c = run.controls if isinstance(run.controls, MethodControls) else MethodControls.from_config(run.config)
    except (*expected(), ConfigError) as e:
        return {"runs_status": warn(message(e))}
    out = show_controls(c, run.config.base_model, run.models, all_choices(state))
    same = state.ws.access is not None and list(run.models) == list(state.ws.access.ft_refs) and \
        run.config.base_model == state.ws.access.base_ref
    out["runs_status"] = ok(f"{run.name}'s settings are back in the controls"
                            + ("" if same else "; its models are in the pickers: press 'Load models' (1 · Models)"))
    return out


def export_yaml(v: dict) -> dict:
    """The current controls as a YAML file the CLI runs (`python -m dppa_ui merge FILE --out DIR`)."""
    state: AppState = v["state"]
    try:
        fts = [f for f in (v["fts"] or []) if f]
        if not v["base"] or not fts:
            raise UserError("pick a base and at least one fine-tune (1 · Models)")
        cfg = controls_of(v).to_config(v["base"], fts)
        ws = state.workspace()
    except expected() as e:
        return {"runs_status": warn(message(e))}
    text = cfg.to_yaml()
    path = ws.temp_dir / "dppa_merge.yaml"
    path.write_text(text)
    return {"yaml_code": text, "yaml_file": gr.update(value=str(path), visible=True),
            "runs_status": ok("YAML ready below: run it with `python -m dppa_ui merge dppa_merge.yaml --out merged/`")}


def load_yaml_into_controls(v: dict) -> dict:
    """Every control (and the model pickers) from a YAML config; nothing changes if it is refused."""
    try:
        out = yaml_into_controls(v["state"], v["yaml_code"])
    except (*expected(), ConfigError) as e:
        return {"yaml_status": warn(f"this config cannot be loaded: {message(e)}")}
    out["yaml_status"] = ok("config loaded into the controls; press 'Load models' (1 · Models) if the models changed")
    return out


def plan_yaml(v: dict) -> dict:
    """What a config builds, from the checkpoints' headers only: method, models, parameters, the
    tensors' count and, for `slices` (passthrough frankenmerges), the output layer stack; for a
    multi-stage file, the stages in the order they run."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        stages = ws.check_yaml(v["yaml_code"] or "")
        if len(stages) > 1:
            res = merge_stages(v["yaml_code"], None, dry_run=True, log=lambda s: None)
            return {"yaml_plan": "\n".join(f"- {ln}" for ln in plan_lines(res.report)),
                    "layer_stack": gr.update(visible=False),
                    "yaml_status": ok(f"planned: {len(stages)} stages, nothing read yet")}
        cfg = stages[0].config
        res = run_merge(cfg.to_dict(), None, dry_run=True, log=lambda s: None)
        stack = layer_stack(cfg.to_dict())
    except (*expected(), ConfigError) as e:
        return {"yaml_status": warn(f"this config cannot be planned: {message(e)}")}
    lines = [f"**{cfg.method_name}** of {', '.join(short(r) for r in cfg.parents)}: "
             f"{res.tensors} tensors, {res.params:,} parameters"] + [f"- {ln}" for ln in plan_lines(res.report)]
    return {"yaml_plan": "\n".join(lines),
            "layer_stack": gr.update(value=[[j, short(r), layer] for j, r, layer in stack], visible=bool(stack),
                                     label=f"Layer stack: {len(stack)} output layers"),
            "yaml_status": ok("planned: nothing was read but the checkpoints' headers")}


_SETTING = re.compile(r"(\w+)=(\[[^\]]*\]|\{[^}]*\}|[^,]+)")


def plan_lines(plan: str) -> list[str]:
    """The engine's dry-run report for people: no server paths (its base and model lines), no
    per-tensor lines, settings without Python's None and 5.0."""
    out = []
    for ln in plan.splitlines():
        if ln.startswith(("tensor ", "model: ", "base: ", "method: ")):
            continue
        if ln.startswith("parameters: "):
            kv = [(k, v.strip()) for k, v in _SETTING.findall(ln[len("parameters: "):]) if v.strip() != "None"]
            ln = "settings: " + ", ".join(f"{k} {_number(v)}" for k, v in kv)
        out.append(ln)
    return out


def _number(v: str) -> str:
    if v in ("True", "False"):
        return v.lower()                    # as the YAML writes it
    try:
        return fmt(float(v))
    except ValueError:
        return v


def merge_yaml(v: dict) -> dict:
    """Merge the config as written into a run (any method, slices, tokenizer surgery, ...); it is
    then the merged model for chat and score."""
    state: AppState = v["state"]
    progress = v["progress"]
    try:
        ws = state.workspace()
        text = v["yaml_code"] or ""
        ws.check_yaml(text)
        state.cancel.clear()
        with running(state, "merge as written"):
            run = ws.merge_yaml(text, progress=lambda d, t: progress((d, t), desc="merging", unit="tensors"),
                                cancel=state.cancel.is_set)
    except (*expected(), ConfigError, RuntimeError, OSError) as e:
        return {"yaml_status": warn(f"merge refused: {message(e)}"), "state": state}
    return {"merge_summary": run_summary(run), "leaderboard": leaderboard(state),
            "yaml_status": ok(f"{run.name} merged as written in {fmt(run.seconds)} s: chat with it or score it"),
            "state": state}


def wire(page) -> list:
    """Wires the section; returns the events that set the method controls (the views follow them)."""
    page.on(page["upload"].upload, upload_suite, ["state", "upload"], ["suite", "score_status"], api_name="upload_suite")
    scored = page.on(page["score_btn"].click, score, ["state", "suite", "upload"], SCORE_OUT, progress=True,
                     api_name="score", concurrency_limit=1, concurrency_id="merge")
    page.then(scored, score_routing, ROUTING_IN, ROUTING_OUT, api_visibility="private", concurrency_limit=1,
              concurrency_id="merge")
    lm_eval.wire(page)
    reload = page.on(page["reload_btn"].click, reload_run, ["state", "run_no"], [*SHOW_OUT, "runs_status"],
                     api_name="reload_run")
    page.on(page["export_btn"].click, export_yaml, ["state", "base", "fts", *CONTROL_KEYS],
            ["yaml_code", "yaml_file", "runs_status"], api_name="export_yaml")
    load = page.on(page["load_yaml_btn"].click, load_yaml_into_controls, ["state", "yaml_code"],
                   [*SHOW_OUT, "yaml_status"], api_name="load_yaml")
    page.on(page["plan_yaml_btn"].click, plan_yaml, ["state", "yaml_code"], ["yaml_plan", "layer_stack", "yaml_status"],
            api_name="plan_yaml")
    page.on(page["merge_yaml_btn"].click, merge_yaml, ["state", "yaml_code"],
            ["merge_summary", "leaderboard", "yaml_status", "state"], progress=True, api_name="merge_yaml",
            concurrency_limit=1, concurrency_id="merge")
    return [reload, load]
