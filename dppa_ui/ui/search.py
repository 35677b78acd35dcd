"""7 · Search: the merge settings that score best on dev data (`dppa_ui.search`), on the loaded
models. The parameters that move (with their bounds) sit in a table that follows the preset;
Start merges and scores candidates in memory in a thread of this process, streaming the objective
per evaluation with the best so far and a table of every candidate; Stop ends it after the
current candidate with the best so far; "Load best into controls" puts the result into the method
controls (what they cannot hold is refused by name) and the best YAML is offered for download.
Stop also ends the method column's auto λ. One search, merge or score at a time per server
(concurrency id "merge").
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import gradio as gr

from .. import figures, search
from ..config import ConfigError
from ..controls import MethodControls
from ..workspace import short
from ..zoo import domain_names
from .common import (CONTROL_KEYS, DEFAULT_UI, AppState, UserError, expected, finite, controls_from, fmt, lenient,
                     message, ok, sig, warn)
from .controls_ui import CONTROLS_OUT, controls_of, rounded, show_controls
from .jobs import Job, running, search_threads
from .suites import UPLOAD_SUITE, session_upload, upload_only, upload_report

MAX_BUDGET = 200                         # candidates per search in the app (the CLI has no limit)
DEMO_DEV = "demo dev splits"
GEOMETRIC = "geometric"
HEADERS = ["move", "parameter", "models", "low", "high"]
OPTIMIZER_CHOICES = [("NGOpt", "ngopt"), ("CMA", "cma"), ("OnePlusOne", "oneplusone"), ("random search", "random"),
                     ("greedy walk (DPPA)", "greedy")]
# The table's names of the searchable parameters (search.py's names are accepted too).
LABELS = {"weight": "weight", "density": "density", "lambda": "λ", "dp_lambda": "DP λ", "dp_outlier_m": "DP M",
          "pcb_ratio": "PCB ratio", "clip_ratio": "clip ratio"}
EACH, SHARED, GLOBAL = "each", "shared", "—"


def _domains() -> list[str]:
    return domain_names()


# ----------------------------------------------------------------------------------- parameter rows

def default_rows(c: MethodControls) -> list[list]:
    """The parameters worth moving for the controls' preset: [move, parameter, models, low, high];
    the ticked ones are a good first search (weights, and the preset's main knob)."""
    prune, amplify, combine = c.stages
    rows = [[True, "weight", EACH, 0.5, 1.5], [False, "λ", GLOBAL, 0.5, 2.0]]
    if prune != "none":
        rows.append([True, "density", SHARED, 0.05, 0.6])
    if prune == "dp":
        rows += [[False, "DP λ", GLOBAL, 0.0, 0.3], [False, "DP M", GLOBAL, 2.0, 10.0]]
    if amplify == "dpa":
        rows += [[False, f"α{k + 1}", SHARED, *((1.0, 3.0) if k == 0 else (0.0, 2.0))] for k in range(len(c.alphas))]
    if combine == "pcb":
        rows.append([True, "PCB ratio", GLOBAL, 0.05, 0.5])
    return rows


def _key(label: str) -> str:
    """A table label (or a search.py name) as search.py's parameter key: 'α2' -> amplification[1]."""
    text = str(label or "").strip()
    inverse = {v.lower(): k for k, v in LABELS.items()}
    if text.lower() in inverse:
        return inverse[text.lower()]
    for prefix, key in (("α", "amplification"), ("alpha", "amplification"), ("partition ", "partitions")):
        rest = text[len(prefix):].strip().translate(str.maketrans("₁₂₃₄₅₆₇₈₉", "123456789"))
        if text.lower().startswith(prefix) and rest.isdigit() and int(rest) >= 1:
            return f"{key}[{int(rest) - 1}]"
    return text


def _truthy(x) -> bool:
    return x is True or str(x).strip().lower() in ("true", "1", "yes", "✓", "x")


def parameters_block(rows, refs: list[str]) -> dict:
    """The ticked table rows as a `search.parameters` mapping {name: [low, high]}; a row that names
    no parameter or model, or has a bound that is not a finite number, is refused by its name."""
    out: dict[str, list[float]] = {}
    names = {short(r): i for i, r in enumerate(refs)} | {r: i for i, r in enumerate(refs)}
    for row in _rows(rows):
        if not row or not _truthy(row[0]):
            continue
        row = list(row) + [None] * (5 - len(row))
        key = _key(row[1])
        if not key:
            raise UserError("a ticked row names no parameter: fill in `parameter` or untick it")
        who = str(row[2] if row[2] is not None else "").strip()
        base = key.split("[")[0]
        if "." in key or base not in search.MODEL_PARAMS or who in ("", GLOBAL):
            name = key               # a global parameter, or a full name such as models[1].weight
        elif who == EACH:
            name = f"models[*].{key}"
        elif who in (SHARED, "all"):
            name = key
        elif who in names or (who.isdigit() and int(who) < len(refs)):
            name = f"models[{names.get(who, who)}].{key}"
        else:
            raise UserError(f"parameter {row[1]}: models {who!r} is not '{EACH}', '{SHARED}' or a loaded "
                            f"fine-tune ({', '.join(short(r) for r in refs)})")
        if name in out:
            raise UserError(f"parameter {row[1]} ({who or 'global'}) is ticked twice")
        out[name] = [finite(row[3], f"parameter {row[1]}: low"), finite(row[4], f"parameter {row[1]}: high")]
    if not out:
        raise UserError("tick at least one parameter to move (the `move` column)")
    return out


def _rows(value) -> list[list]:
    """The table's rows whatever form gradio or an API client gives them in."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.get("data") or [])
    if hasattr(value, "values") and hasattr(value, "columns"):        # a pandas DataFrame
        return value.values.tolist()
    return [list(r) for r in value]


def _label(p: search.SearchParam, refs: list[str]) -> str:
    name = LABELS.get(p.key, p.key)
    if p.index is not None:
        name = f"α{p.index + 1}" if p.key == "amplification" else f"partition {p.index + 1}"
    if isinstance(p.model, int):
        return f"{name} {short(refs[p.model]) if p.model < len(refs) else p.model}"
    return name


# ----------------------------------------------------------------------------------- running

def _curve(rows: list[dict], running: bool):
    scored = [r for r in rows if r["phase"] == "search"]
    if not scored:
        return figures.message("merging and scoring the first candidate …" if running else "no candidate scored")
    top = max(scored, key=lambda r: r["objective"])
    title = f"dev objective · best {fmt(top['objective'])} at #{top['eval']}"
    return figures.objective_curve([r["objective"] for r in scored], [r["best"] for r in scored], title)


def _table(rows: list[dict], params: list[search.SearchParam], refs: list[str]) -> dict:
    """Every candidate, newest first: its values, objective, best so far, per-domain scores."""
    domains = list(dict.fromkeys(d for r in rows for d in r["scores"]))
    headers = ["#", *(_label(p, refs) for p in params), "objective", "best so far", *domains, "s"]
    data = [[r["eval"] if r["phase"] == "search" else f"{r['eval']} (chosen)",
             *(sig(r["params"][p.name]) for p in params), sig(r["objective"]), sig(r["best"]),
             *(sig(r["scores"][d]) if d in r["scores"] else "" for d in domains), sig(r["seconds"])]
            for r in reversed(rows)]
    return gr.update(value={"headers": headers, "data": data}, headers=headers)


def _data(state: AppState, choice: str, upload) -> tuple[str | list[str], str | None]:
    """The search's dev data: "zoo", or the uploaded file (only one this session uploaded: it goes
    through /upload_suite's registration), checked and named by its file name."""
    if choice != UPLOAD_SUITE:
        return "zoo", None
    path, _ = session_upload(
        state, upload, 'upload a .jsonl file of {"prompt", "answer", "domain"} lines, or pick the demo dev splits',
        "the search only reads files uploaded in this session: upload it with the box above (API: /search_upload first)")
    return [path], path


def _safe(text: str, path: str | None) -> str:
    """A message without the server's path of an uploaded file (its name only)."""
    return text.replace(path, Path(path).name) if path else text


def start(v: dict):
    """Search the ticked parameters of the current method on the loaded models, streaming the
    objective per evaluation and the table of candidates."""
    state: AppState = v["state"]
    path = None
    try:
        ws = state.workspace()
        c = controls_of(v)
        cfg = ws.config(c)
        refs = [m.model for m in cfg.models]
        budget = finite(v["search_budget"], "budget")
        if not (budget == int(budget) and 1 <= budget <= MAX_BUDGET):
            raise UserError(f"budget {v['search_budget']!r}: a whole number of candidates from 1 to {MAX_BUDGET} "
                            f"(bigger searches: `python -m dppa_ui search`)")
        seed = finite(v["search_seed"] if v["search_seed"] is not None else 0, "seed")
        data, path = _data(state, v["search_data"], v["search_upload"])
        objective = str(v["search_objective"] or GEOMETRIC).strip()
        if data == "zoo" and objective not in (GEOMETRIC, *_domains()):
            raise UserError(f"objective {objective!r}: the geometric mean, or one of the demo domains "
                            f"({', '.join(_domains())})")
        block = {"parameters": parameters_block(v["search_params"], refs), "optimizer": v["search_optimizer"],
                 "budget": int(budget), "objective": objective, "data": data, "seed": int(seed)}
        spec = search.parse_search(cfg, block)          # every refusal before a tensor is read
    except (*expected(), ConfigError) as e:
        yield {"search_status": warn(_safe(message(e), path))}
        return
    state.cancel.clear()
    test = bool(v["search_test"]) and data == "zoo"

    def work(log, on_eval):
        with running(state, "search"):
            return ws.search(cfg, block, on_eval=on_eval, cancel=state.cancel.is_set, log=log, test=test)
    job = Job(work, search_threads(ws))
    names = ", ".join(_label(p, refs) for p in spec.params)
    yield {"search_status": f"⟳ searching {names} ({spec.optimizer}, budget {spec.budget}): scoring the fine-tunes "
                            f"for reference, then each candidate …", "search_plot": _curve([], True),
           "search_file": gr.update(value=None, visible=False), "search_yaml": ""}
    try:
        for _ in job.updates():
            rows = list(job.rows)
            n = sum(r["phase"] == "search" for r in rows)
            yield {"search_plot": _curve(rows, True), "search_rows": _table(rows, spec.params, refs),
                   "search_status": f"⟳ {n}/{spec.budget} candidates scored"
                                    + (f", best {fmt(rows[-1]['best'])}" if rows else "")}
    finally:
        if not job.done.is_set():          # the page went away or the event was cancelled: stop it too
            state.cancel.set()
    if isinstance(job.error, (*expected(), ConfigError)):
        yield {"search_status": warn(f"search failed: {_safe(message(job.error), path)}"),
               "search_plot": _curve(job.rows, False), "search_rows": _table(job.rows, spec.params, refs)}
        return
    if job.error is not None:
        raise job.error
    res = job.result
    file = ws.temp_dir / "search_best.yaml"
    file.write_text(res.config.to_yaml())
    yield {"search_plot": _curve(res.rows, False), "search_rows": _table(res.rows, spec.params, refs),
           "search_status": _summary(res, spec, refs), "search_yaml": res.config.to_yaml(),
           "search_file": gr.update(value=str(file), visible=True), "search_best": res}


def _summary(res, spec, refs) -> str:
    n = sum(r["phase"] == "search" for r in res.rows)
    values = ", ".join(f"{_label(p, refs)} {fmt(res.values[p.name])}" for p in spec.params)
    head = (f"stopped after {n} candidate(s): best so far" if res.cancelled else f"searched {n} candidates:")
    busy = sum(r["seconds"] for r in res.rows if r["phase"] == "search")
    text = (f"{head} {values} · dev objective **{fmt(res.objective)}** · {fmt(res.seconds)} s in all, "
            f"{fmt(n / max(busy, 1e-9))} candidates/s")
    if res.test:
        em = ", ".join(f"{d} {s['em']:.2f}" for d, s in res.test["scores"].items() if s.get("em") is not None)
        text += f"  \ntest split (scored once, never searched): objective **{fmt(res.test['objective'])}**; EM {em}"
    return ok(text + "  \nLoad it into the controls to merge it, or download the YAML below.")


def stop(v: dict) -> dict:
    """End the session's search (or auto λ) after its current candidate, with its best so far."""
    state: AppState = v["state"]
    what = state.running if isinstance(state, AppState) else None
    if what not in ("search", "auto λ"):
        return {"search_status": "nothing to stop: no search is running"}
    state.cancel.set()
    return {"search_status": f"■ stop requested: the {what} ends after the current candidate, with its best so far"}


def load_best(v: dict) -> dict:
    """The last search's best config into the method controls. Parameters the controls cannot hold
    (per-model densities, clip ratio, ...) are refused by name; the YAML still runs with the CLI."""
    state: AppState = v["state"]
    res = v["search_best"]
    try:
        ws = state.workspace()
        if res is None:
            raise UserError("no search result yet: start a search first")
        ws.align(res.config)
        refs = [m.model for m in res.config.models]
        try:
            c = MethodControls.from_config(res.config)
            held = c.to_config(res.config.base_model, refs)
        except ConfigError as e:
            raise UserError(f"the method controls cannot hold {', '.join(res.values)}: {e}") from None
        lost = [n for n, want, got in _held(res, held) if not math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)]
        if lost:
            raise UserError(f"the method controls cannot hold {', '.join(lost)} (no control sets "
                            f"{'it' if len(lost) == 1 else 'them'} this way); download the YAML and run it with "
                            f"`python -m dppa_ui merge`")
        shown = rounded(c)
        moved = list(dict.fromkeys(      # a shared value once ("density", not once per model)
            (n.split(" (")[0], want, got) for n, want, got in _held(res, shown.to_config(res.config.base_model, refs))
            if not math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)))
    except expected() as e:
        return {"search_status": warn(message(e))}
    out = show_controls(shown)
    note = ("" if not moved else "; shown to 3 significant digits (" + ", ".join(
        f"{n} {want:.6g} → {fmt(got)}" for n, want, got in moved) + "), the YAML below keeps the exact values")
    out["search_status"] = ok(f"the best settings are in the method controls (2 · Method){note}: merge to use them")
    return out


def _held(res, held) -> list[tuple[str, float, float]]:
    """(name, best value, the value the controls' config gives) for every searched parameter."""
    out = []
    for p in res.spec.params:
        models = [None] if p.model is None else range(len(held.models)) if p.model == "all" else [p.model]
        for i in models:
            q = replace(p, model=i)
            label = p.name if p.model != "all" else f"{p.name} ({short(held.models[i].model)})"
            out.append((label, search.current_value(res.config, q), search.current_value(held, q)))
    return out


def rows_for_preset(v: dict) -> dict:
    """The parameter table for the current preset and bands, when they changed since it was made;
    rows the user edited that still apply stay as they are."""
    try:
        c = controls_from({**DEFAULT_UI, "preset": v["preset"], "n_bands": v["n_bands"]})
    except expected():
        return {"search_for": v["search_for"]}
    key = f"{c.preset}/{len(c.alphas)}"
    if key == v["search_for"]:
        return {"search_for": key}              # (gradio needs one output; the table is left alone)
    current = {(_key(r[1]), str(r[2])): r for r in _rows(v["search_params"]) if len(r) >= 5}
    rows = [current.get((_key(r[1]), str(r[2])), r) for r in default_rows(c)]
    return {"search_params": rows, "search_for": key}


def upload(v: dict) -> dict:
    """A JSONL file arrived through the search's upload box: registered exactly as /upload_suite does."""
    text, registered = upload_report(v["state"], v["search_upload"])
    return {"search_status": text, **({"search_data": UPLOAD_SUITE} if registered else {})}


# ----------------------------------------------------------------------------------- layout

def build(page, tab) -> None:
    page.add("search_tab", tab)
    gr.Markdown("Each candidate is merged in memory and scored on dev data; the optimizer picks the next from the "
                "scores. Tick the parameters to move and their range; the other settings are the method "
                "controls'. The test split is scored once, for the best only.", elem_id="search-help")
    page.add("search_for", gr.State(f"{DEFAULT_UI['preset']}/{DEFAULT_UI['n_bands']}"))
    page.add("search_best", gr.State(None))
    rows0 = default_rows(controls_from(DEFAULT_UI))
    # The settings on the left, the buttons and what they start (status, streaming plot) on the right:
    # in view together at 1366 x 768
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=380):
            page.add("search_params", gr.Dataframe(
                value=rows0, headers=HEADERS, type="array", interactive=True,
                datatype=["bool", "str", "str", "number", "number"], column_count=5, row_count=len(rows0),
                label="Parameters (models: each = one value per model, shared = one for all, or a fine-tune's name)",
                elem_id="search-params", column_widths=["18%", "24%", "22%", "18%", "18%"]))
            with gr.Row(equal_height=True):
                page.add("search_optimizer", gr.Dropdown(OPTIMIZER_CHOICES, value="ngopt", label="Optimizer",
                                                         elem_id="search-optimizer", scale=2))
                page.add("search_budget", lenient(gr.Number(value=40, precision=0, minimum=1, maximum=MAX_BUDGET,
                                                            label=f"Budget (≤ {MAX_BUDGET})", scale=1,
                                                            elem_id="search-budget")))
                page.add("search_seed", lenient(gr.Number(value=0, precision=0, minimum=0, label="Seed", scale=1,
                                                          elem_id="search-seed")))
            page.add("search_objective", gr.Dropdown([("geometric mean over domains", GEOMETRIC),
                                                      *((d, d) for d in _domains())], value=GEOMETRIC,
                                                     allow_custom_value=True, label="Objective", elem_id="search-objective",
                                                     info="score ÷ the best fine-tune's, per domain (DPPA's), or one domain's score"))
            with gr.Row(equal_height=True):
                page.add("search_data", gr.Radio([DEMO_DEV, UPLOAD_SUITE], value=DEMO_DEV, label="Data", scale=1,
                                                 elem_id="search-data"))
                # No file_types: gradio would refuse another file with a bare "Error"; upload names the problem
                page.add("search_upload", upload_only(gr.File(label="Dev file (.jsonl)", scale=1, height=90,
                                                              elem_id="search-upload")))
            page.add("search_test", gr.Checkbox(value=True, label="score the best on the test split",
                                                elem_id="search-test"))
        with gr.Column(scale=4, min_width=320):
            with gr.Row():
                page.add("search_btn", gr.Button("Start", variant="primary", elem_id="search-btn", min_width=80))
                page.add("search_stop_btn", gr.Button("Stop", variant="stop", elem_id="search-stop-btn", min_width=80))
                page.add("search_load_btn", gr.Button("Load best into controls", elem_id="search-load-btn",
                                                      min_width=120))
            page.add("search_status", gr.Markdown("", elem_id="search-status", elem_classes=["status"]))
            page.add("search_plot", gr.Plot(label="Objective", elem_id="search-plot"))
    page.add("search_rows", gr.Dataframe(headers=["#", "objective", "best so far"], label="Candidates (newest first)",
                                         interactive=False, elem_id="search-rows", max_height=360, wrap=True))
    with gr.Accordion("Best config (YAML)", open=False, elem_id="search-yaml-accordion"):
        page.add("search_file", gr.File(label="best.yaml", interactive=False, visible=False, elem_id="search-file",
                                        height=60))
        page.add("search_yaml", gr.Code(language="yaml", label="Runs with: python -m dppa_ui merge FILE --out DIR",
                                        interactive=False, elem_id="search-yaml"))


SEARCH_IN = ["state", "search_params", "search_optimizer", "search_budget", "search_objective", "search_data",
             "search_upload", "search_seed", "search_test", *CONTROL_KEYS]
SEARCH_OUT = ["search_plot", "search_rows", "search_status", "search_yaml", "search_file", "search_best"]


def wire(page) -> list:
    """Wires the section; returns the events that set the method controls (the inspect views follow them)."""
    quiet = dict(show_progress="hidden", api_visibility="private")
    page.on([page["search_tab"].select, page["preset"].input, page["n_bands"].input], rows_for_preset,
            ["preset", "n_bands", "search_for", "search_params"], ["search_params", "search_for"], **quiet)
    page.on(page["search_upload"].upload, upload, ["state", "search_upload"], ["search_data", "search_status"],
            api_name="search_upload")
    page.on(page["search_btn"].click, start, SEARCH_IN, SEARCH_OUT, api_name="search", show_progress="hidden",
            concurrency_limit=1, concurrency_id="merge")
    page.on(page["search_stop_btn"].click, stop, ["state"], ["search_status"], api_name="search_stop", queue=False)
    load = page.on(page["search_load_btn"].click, load_best, ["state", "search_best"], [*CONTROLS_OUT, "search_status"],
                   api_name="search_load_best")
    return [load]
