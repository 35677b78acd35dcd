"""2 · Method: every method of the registry (delta pipelines, interpolations, layer stacking), and
only the controls it uses: the common quantities, its other parameters (built from the registry's
records) and a per-layer editor for the ones that can vary over the layers. Controls commit on
release (a slider drag is one update, not one per pixel); the inspect views follow each commit,
after `check` has said, in the column's one status line, what is wrong with the controls, if
anything. auto α (DPA's bands) and auto λ (PCB's λ_i) search on dev data and write what they found
into the controls, their result beside their button."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gradio as gr

from .. import figures, search
from .. import params as P
from ..controls import picker_methods
from ..workspace import short
from .common import (CONTROL_KEYS, DEFAULT_UI, EXTRA_SPECS, GRADIENT_HEADERS, AppState, UserError, expected,
                     extra_default, fmt, gradient_settings, lenient, message, ok, values_of, warn)
from .controls_ui import (FAMILY_LABELS, SHOW_OUT, VIEW_OUT, bands_view, controls_of, preset_info, preset_view,
                          yaml_into_controls)
from .jobs import Job, running, search_threads

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"


def example_files() -> dict[str, Path]:
    files = {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}
    files.update({f"mergekit/{p.stem}": p for p in sorted((EXAMPLES_DIR / "mergekit").glob("*.yaml"))})
    return files


def method_choices() -> list[tuple[str, str]]:
    """(label, name) per method of the picker, grouped by family."""
    return [(f"{m.title} · {FAMILY_LABELS[m.family]}", n) for n, m in picker_methods().items()]


def extra_component(key: str, p):
    """A control for registry parameter `p` (its first spec among the picker's methods)."""
    kw = dict(label=key, info=p.doc, visible=False, elem_id=f"param-{key.replace('_', '-')}")
    value = extra_default(p)
    if p.kind in ("choice", "rescale"):
        return gr.Dropdown(list(p.choices), value=value, **kw)
    if p.kind == "bool":
        return gr.Checkbox(value=bool(value), **kw)
    if p.kind == "float" and p.lo is not None and p.hi is not None and p.hi - p.lo <= 1:
        return lenient(gr.Slider(p.lo, p.hi, value=value, step=0.01, **kw))
    return gr.Number(value=value, precision=0 if p.kind in ("int", "rank") else None, **kw)


def density_hint(density) -> str:
    """The density slider's line under its label, for the value it holds."""
    try:
        d = float(density)
    except (TypeError, ValueError):
        return "prune rate = 1 − density"
    if not 0 < d <= 1:
        return "density: the share of each δ kept, from 0.01 to 1"
    return f"prune rate = 1 − density: keeps {fmt(100 * d)}%, prunes {fmt(100 * (1 - d))}%"


def build(page) -> None:
    d = DEFAULT_UI
    # One per row: the picker's labels ("DELLA (linear) · prune → combine") need the column's width
    page.add("preset", gr.Dropdown(method_choices(), value=d["preset"], label="Method", elem_id="preset"))
    page.add("example", gr.Dropdown(list(example_files()), value=None, label="Example config", elem_id="example-config"))
    page.add("preset_info", gr.Markdown(preset_info(d["preset"]), elem_id="preset-info"))
    page.add("density", lenient(gr.Slider(0.01, 1.0, value=d["density"], step=0.01, elem_id="density",
                                          label="Density: share of each δ kept", info=density_hint(d["density"]))))
    with gr.Row():
        page.add("lambda_", lenient(gr.Slider(0.0, 3.0, value=d["lambda_"], step=0.05, label="λ: scale of the merged δ",
                                              elem_id="lambda")))
        page.add("weights", gr.Textbox(value=d["weights"], label="Weights", placeholder="1 each, or 1, 0.5, …",
                                       elem_id="weights"))
    # PCB's λ search writes the weights: it sits under them, its result beside it
    with gr.Group(visible=False, elem_id="auto-lambda-group") as lambda_group:
        page.add("auto_lambda_btn", gr.Button("auto λ: PCB's search of one λ per model (→ weights)", size="sm",
                                              elem_id="auto-lambda-btn"))
        page.add("lambda_status", gr.Markdown("", elem_id="lambda-status", elem_classes=["status"]))
        page.add("lambda_log", gr.Textbox(label="λ search log", lines=2, max_lines=8, interactive=False,
                                          visible=False, elem_id="lambda-log"))
    page.add("auto_lambda_group", lambda_group)
    with gr.Group(visible=True) as dp_group:
        page.add("dp_lambda", lenient(gr.Slider(0.0, 0.5, value=d["dp_lambda"], step=0.01, label="DP λ",
                                                elem_id="dp-lambda",
                                                info="how far layer and module densities move from the target")))
        page.add("dp_outlier_m", lenient(gr.Slider(1.0, 20.0, value=d["dp_outlier_m"], step=0.5, label="DP M",
                                                   elem_id="dp-m", info="outlier: |δ| above M × the module mean")))
    page.add("dp_group", dp_group)
    with gr.Group(visible=True) as dpa_group:
        page.add("n_bands", gr.Radio([1, 2, 3], value=d["n_bands"], label="DPA bands", elem_id="n-bands"))
        with gr.Row():
            page.add("band1", lenient(gr.Slider(0.05, 0.95, value=d["band1"], step=0.05, label="Band edge 1",
                                                elem_id="bound1", info="top band: this share of the kept entries")))
            page.add("band2", lenient(gr.Slider(0.05, 0.95, value=d["band2"], step=0.05, label="Band edge 2",
                                                visible=False, elem_id="bound2")))
        with gr.Row():
            page.add("alpha1", lenient(gr.Slider(0.0, 4.0, value=d["alpha1"], step=0.05, label="α₁ (top band)",
                                                 elem_id="alpha1")))
            page.add("alpha2", lenient(gr.Slider(0.0, 4.0, value=d["alpha2"], step=0.05, label="α₂", elem_id="alpha2")))
            page.add("alpha3", lenient(gr.Slider(0.0, 4.0, value=d["alpha3"], step=0.05, label="α₃", visible=False,
                                                 elem_id="alpha3")))
        with gr.Row(equal_height=True):
            page.add("auto_alpha_btn", gr.Button("auto α", scale=1, elem_id="auto-alpha-btn", size="sm"))
            page.add("alpha_per_model", gr.Textbox(value=d["alpha_per_model"], scale=3, elem_id="alpha-per-model",
                                                   label="Per-model α (auto α writes it; clear to use the sliders)"))
        page.add("alpha_status", gr.Markdown("", elem_id="alpha-status", elem_classes=["status"]))
        page.add("alpha_log", gr.Textbox(label="α search log", lines=2, max_lines=8, interactive=False,
                                         elem_id="alpha-log"))
    page.add("dpa_group", dpa_group)
    page.add("pcb_ratio", lenient(gr.Slider(0.01, 1.0, value=d["pcb_ratio"], step=0.01, label="PCB ratio",
                                            visible=False, elem_id="pcb-ratio",
                                            info="share of entries kept after balancing")))
    page.add("seed", gr.Number(value=d["seed"], precision=0, label="Seed (the random drop's masks)", visible=False,
                               elem_id="seed"))
    with gr.Group(visible=True) as extra_group:
        for key, p in EXTRA_SPECS.items():
            page.add(f"x_{key}", extra_component(key, p))
    page.add("extra_group", extra_group)
    with gr.Accordion("Per-layer values (gradients)", open=False, visible=False, elem_id="gradient-editor") as acc:
        gr.Markdown("A row sets one parameter over the layers: values spread evenly from the first layer to the "
                    "last, as mergekit's gradients; a filter (e.g. `self_attn`, `mlp`) limits the row to the "
                    "tensors whose name contains it; a row without a filter is the value everywhere else.",
                    elem_id="gradient-help")
        page.add("gradients", gr.Dataframe(headers=GRADIENT_HEADERS, value=d["gradients"], interactive=True,
                                           column_count=(3, "fixed"), elem_id="gradients", wrap=True))
        page.add("gradient_plot", gr.Plot(label="Values over the layers", elem_id="gradient-plot"))
    page.add("gradient_acc", acc)
    # The column's one status line (what is wrong with the controls); it stays in view (app.css)
    page.add("method_status", gr.Markdown("", elem_id="method-status", elem_classes=["status"]))


def slider_bounds(page) -> dict[str, tuple[float, float]]:
    """{key: (minimum, maximum)} of the method controls that are sliders."""
    return {k: (page[k].minimum, page[k].maximum) for k in CONTROL_KEYS if isinstance(page[k], gr.Slider)}


def check(v: dict, bounds: dict[str, tuple[float, float]]) -> dict:
    """The controls as the views are about to draw them: a slider value typed outside its range is
    set to the nearest end (as the slider then shows it) and said so; any other problem is said in
    the column's status line (the views show a one-line state instead of a figure)."""
    out, notes = {}, []
    for k, (lo, hi) in bounds.items():
        try:
            x = float(v[k])
        except (TypeError, ValueError):
            continue
        if x < lo or x > hi:
            end = lo if x < lo else hi
            out[k] = end
            v = {**v, k: end}
            notes.append(f"{LABELS.get(k, k)} {fmt(x)} is outside the slider's range {fmt(lo)} to {fmt(hi)}: "
                         f"set to {fmt(end)}")
    out["density"] = gr.update(info=density_hint(v["density"]), **({"value": out["density"]} if "density" in out
                                                                    else {}))
    try:
        ws = v["state"].ws
        c = controls_of(v)
        if ws is not None and ws.loaded:
            ws.config(c)
    except expected() as e:
        notes.append(message(e))
    out["method_status"] = "  \n".join(f"⚠ {n}" for n in notes)
    return out


LABELS = {"density": "density", "lambda_": "λ", "dp_lambda": "DP λ", "dp_outlier_m": "DP M", "band1": "band edge 1",
          "band2": "band edge 2", "alpha1": "α₁", "alpha2": "α₂", "alpha3": "α₃", "pcb_ratio": "PCB ratio"}


def gradient_view(v: dict) -> dict:
    """The per-layer editor's curves over the loaded model's layers (for every filter it names)."""
    state: AppState = v["state"]
    n = len(state.ws.access.blocks()) if state.ws is not None and state.ws.loaded else 8
    try:
        settings = gradient_settings(v["gradients"], v["preset"])
    except expected() as e:
        return {"gradient_plot": figures.message(f"not drawn: {message(e)}", height=260)}
    curves = []
    for key, setting in settings.items():
        filters = [e.get("filter") for e in setting if isinstance(e, dict)] if isinstance(setting, list) and \
            setting and isinstance(setting[0], dict) else [None]
        for f in filters:
            curves.append((f"{key}" + (f" · {f}" if f else ""), P.gradient_curve(setting, f or "", n)))
    return {"gradient_plot": figures.layer_curves(curves, n)}


def auto_alpha(v: dict):
    """DPPA's greedy α search per fine-tune on its domain's dev split (demo models know theirs),
    streaming the search log; the result goes into the per-model α box."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        if c.stages[1] != "dpa":
            raise UserError("auto α searches the DPA band factors: pick the dppa method first")
    except expected() as e:
        yield {"alpha_status": warn(message(e))}
        return
    yield {"alpha_log": "searching … (each step scores the pruned fine-tune on its dev split)",
           "alpha_status": "⟳ auto α: searching each fine-tune's α on its dev split …"}
    job = Job(lambda log, on_eval: ws.search_amplification(c, log=log), search_threads(ws))
    for _ in job.updates():
        yield {"alpha_log": "\n".join(job.lines[-12:])}
    if isinstance(job.error, expected()):
        yield {"alpha_status": warn(message(job.error))}
        return
    if job.error is not None:
        raise job.error
    cfg, report = job.result
    per_model = {m.model: list(m.get("amplification")) for m in cfg.models}
    text = "; ".join(f"{r}=" + ",".join(f"{a:g}" for a in al) for r, al in per_model.items())
    found = ", ".join(f"{short(r)} [{', '.join(fmt(a) for a in al)}]" for r, al in per_model.items())
    yield {"alpha_log": "\n".join(job.lines[-40:]), "alpha_per_model": text,
           "alpha_status": ok(f"α per fine-tune: {found} → per-model α (merge to use them)")}


def auto_lambda(v: dict):
    """PCB's λ search (search.lambda_search: one λ_i per model, the model weight, NGOpt from 1.0 in
    [0.8, 1.3], budget 100, on each model's dev split), streaming its log; the λ_i found go into
    the weights box and λ to 1, as `lambda: auto` resolves."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        if c.stages[2] != "pcb":
            raise UserError("auto λ is PCB's search of one λ per model: pick a method that combines by PCB")
        cfg = ws.config(c)
    except expected() as e:
        yield {"lambda_status": warn(message(e))}
        return
    refs = [short(m.model) for m in cfg.models]
    state.cancel.clear()

    def line(r: dict) -> str:
        lam = ", ".join(fmt(x) for x in r["params"].values())
        return f"#{r['eval']}: λ {lam} → {fmt(r['objective'])} (best {fmt(r['best'])})"

    def work(log, on_eval):
        with running(state, "auto λ"):          # the Search tab's Stop ends it
            return ws.search(cfg, preset="lambda", log=log, on_eval=on_eval, cancel=state.cancel.is_set)
    job = Job(work, search_threads(ws))
    head = (f"λ per model ({', '.join(refs)}): NGOpt from 1.0 in {list(search.LAMBDA_BOUNDS)}, budget "
            f"{search.LAMBDA_BUDGET}, dev splits")
    yield {"lambda_log": gr.update(value=head, visible=True),
           "lambda_status": f"⟳ auto λ: 0/{search.LAMBDA_BUDGET} candidates (Stop in 7 · Search ends it early)"}
    try:
        for _ in job.updates():
            yield {"lambda_log": "\n".join([head, *(line(r) for r in job.rows[-12:])]),
                   "lambda_status": f"⟳ auto λ: {len(job.rows)}/{search.LAMBDA_BUDGET} candidates (Stop in "
                                    f"7 · Search ends it early)"}
    finally:
        if not job.done.is_set():
            state.cancel.set()
    if isinstance(job.error, InterruptedError):       # Stop before the first candidate was scored
        yield {"lambda_status": "■ auto λ stopped early, before any candidate was scored: the weights are "
                                "unchanged"}
        return
    if isinstance(job.error, expected()):
        yield {"lambda_status": warn(f"λ search failed: {message(job.error)}")}
        return
    if job.error is not None:
        raise job.error
    res = job.result
    weights = tuple(round(m.get("weight"), 4) for m in res.config.models)
    text = ", ".join(f"{r} {fmt(w)}" for r, w in zip(refs, weights))
    log = "\n".join([f"chose λ_i {text} (dev objective {fmt(res.objective)}, {len(res.rows)} candidates)", head,
                     *(line(r) for r in res.rows[-12:])])
    shown = values_of(replace(c, weights=weights, lambda_=1.0))
    yield {"weights": shown["weights"], "lambda_": shown["lambda_"], "lambda_log": log,
           "lambda_status": ok(f"λ per model{' (stopped early)' if res.cancelled else ''}: {text} → the weights; "
                               f"λ set to 1 (merge to use them)")}


def load_example(v: dict) -> dict:
    """An example config from assets/examples into the controls."""
    files = example_files()
    if v["example"] not in files:
        return {"method_status": warn(f"no example named {v['example']!r}")}
    try:
        out = yaml_into_controls(v["state"], files[v["example"]].read_text())
    except expected() as e:
        return {"method_status": warn(f"this example cannot be loaded: {message(e)}")}
    out["method_status"] = ok(f"{v['example']} is in the controls; press 'Load models' if its models changed")
    return out


def wire(page) -> list:
    """Wires the column's own events; returns the events that set the controls (the views follow)."""
    quiet = dict(api_visibility="private", show_progress="hidden")
    page.on(page["preset"].input, preset_view, ["preset"], VIEW_OUT, api_name="preset_view", show_progress="hidden")
    page.on([page["gradients"].input, page["gradient_acc"].expand], gradient_view, ["state", "preset", "gradients"],
            ["gradient_plot"], **quiet)
    page.on(page["n_bands"].input, bands_view, ["n_bands"], ["band1", "band2", "alpha2", "alpha3"], **quiet)
    page.on(page["auto_alpha_btn"].click, auto_alpha, ["state", *CONTROL_KEYS],
            ["alpha_log", "alpha_per_model", "alpha_status"], api_name="auto_alpha",
            concurrency_limit=1, concurrency_id="merge")
    auto = page.on(page["auto_lambda_btn"].click, auto_lambda, ["state", *CONTROL_KEYS],
                   ["lambda_log", "weights", "lambda_", "lambda_status"], api_name="auto_lambda",
                   concurrency_limit=1, concurrency_id="merge")
    example = page.on(page["example"].input, load_example, ["state", "example"], [*SHOW_OUT, "method_status"],
                      api_name="load_example")
    return [auto, example]


def checker(page):
    """(handler, inputs, outputs) of `check` for this page's sliders: the first step of every chain
    that redraws the views after the controls or the models changed."""
    bounds = slider_bounds(page)

    def check_controls(v: dict) -> dict:
        return check(v, bounds)
    return check_controls, ["state", *CONTROL_KEYS], ["method_status", *bounds]


def commit_triggers(page) -> list:
    """The events on which a method control's value is final: a slider's release (mouse up, or the
    number box losing focus), a textbox's submit or blur, a choice's input."""
    out = []
    for k in CONTROL_KEYS:
        comp = page[k]
        if isinstance(comp, gr.Slider):
            out.append(comp.release)
        elif isinstance(comp, (gr.Textbox, gr.Number)):
            out += [comp.submit, comp.blur]
        else:               # choices, checkboxes, the per-layer table: one event per user edit
            out.append(comp.input)
    return out
