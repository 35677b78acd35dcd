"""2 · Method: every method of the registry (delta pipelines, interpolations, layer stacking), and
only the controls it uses: the common quantities, its other parameters (built from the registry's
records) and a per-layer editor for the ones that can vary over the layers. Controls commit on
release (a slider drag is one update, not one per pixel); the inspect views follow each commit."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import params as P
from ..controls import MethodControls, extra_params, picker_methods
from ..registry import METHODS
from ..workspace import short
from .common import (CONTROL_KEYS, DEFAULT_UI, EXTRA_SPECS, GRADIENT_HEADERS, AppState, UserError, _expected,
                     controls_from, extra_default, gradient_settings, message, ok, values_of, warn)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"


def example_files() -> dict[str, Path]:
    files = {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}
    files.update({f"mergekit/{p.stem}": p for p in sorted((EXAMPLES_DIR / "mergekit").glob("*.yaml"))})
    return files


FAMILY_LABELS = {"pipeline": "prune → combine", "interpolation": "interpolation", "stacking": "layer stacking"}


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
        return gr.Slider(p.lo, p.hi, value=value, step=0.01, **kw)
    return gr.Number(value=value, precision=0 if p.kind in ("int", "rank") else None, **kw)


def build(page) -> None:
    d = DEFAULT_UI
    # One per row: the picker's labels ("DELLA (linear) · prune → combine") need the column's width
    page.add("preset", gr.Dropdown(method_choices(), value=d["preset"], label="Method", elem_id="preset"))
    page.add("example", gr.Dropdown(list(example_files()), value=None, label="Example config", elem_id="example-config"))
    page.add("preset_info", gr.Markdown(preset_info(d["preset"]), elem_id="preset-info"))
    page.add("density", gr.Slider(0.01, 1.0, value=d["density"], step=0.01, elem_id="density",
                                  label="Density: share of each δ kept",
                                  info="prune rate = 1 − density (0.2 keeps 20%, prunes 80%)"))
    with gr.Row():
        page.add("lambda_", gr.Slider(0.0, 3.0, value=d["lambda_"], step=0.05, label="λ: scale of the merged δ",
                                      elem_id="lambda"))
        page.add("weights", gr.Textbox(value=d["weights"], label="Weights", placeholder="1 each, or 1, 0.5, …",
                                       elem_id="weights"))
    with gr.Group(visible=True) as dp_group:
        page.add("dp_lambda", gr.Slider(0.0, 0.5, value=d["dp_lambda"], step=0.01, label="DP λ", elem_id="dp-lambda",
                                        info="how far layer and module densities move from the target"))
        page.add("dp_outlier_m", gr.Slider(1.0, 20.0, value=d["dp_outlier_m"], step=0.5, label="DP M",
                                           elem_id="dp-m", info="outlier: |δ| above M × the module mean"))
    page.add("dp_group", dp_group)
    with gr.Group(visible=True) as dpa_group:
        page.add("n_bands", gr.Radio([1, 2, 3], value=d["n_bands"], label="DPA bands", elem_id="n-bands"))
        with gr.Row():
            page.add("band1", gr.Slider(0.05, 0.95, value=d["band1"], step=0.05, label="Band edge 1", elem_id="bound1",
                                        info="top band: this share of the kept entries"))
            page.add("band2", gr.Slider(0.05, 0.95, value=d["band2"], step=0.05, label="Band edge 2", visible=False,
                                        elem_id="bound2"))
        with gr.Row():
            page.add("alpha1", gr.Slider(0.0, 4.0, value=d["alpha1"], step=0.05, label="α₁ (top band)", elem_id="alpha1"))
            page.add("alpha2", gr.Slider(0.0, 4.0, value=d["alpha2"], step=0.05, label="α₂", elem_id="alpha2"))
            page.add("alpha3", gr.Slider(0.0, 4.0, value=d["alpha3"], step=0.05, label="α₃", visible=False,
                                         elem_id="alpha3"))
        with gr.Row(equal_height=True):
            page.add("auto_alpha_btn", gr.Button("auto α", scale=1, elem_id="auto-alpha-btn", size="sm"))
            page.add("alpha_per_model", gr.Textbox(value=d["alpha_per_model"], scale=3, elem_id="alpha-per-model",
                                                   label="Per-model α (auto α writes it; clear to use the sliders)"))
        page.add("alpha_log", gr.Textbox(label="α search log", lines=2, max_lines=8, interactive=False,
                                         elem_id="alpha-log"))
    page.add("dpa_group", dpa_group)
    # PCB's λ search: one λ per model into the weights (wired, with its handler, by search.py)
    page.add("auto_lambda_btn", gr.Button("auto λ: PCB's search of one λ per model (→ weights)", size="sm",
                                          elem_id="auto-lambda-btn"))
    page.add("lambda_log", gr.Textbox(label="λ search log", lines=2, max_lines=8, interactive=False, visible=False,
                                      elem_id="lambda-log"))
    page.add("pcb_ratio", gr.Slider(0.01, 1.0, value=d["pcb_ratio"], step=0.01, label="PCB ratio", visible=False,
                                    elem_id="pcb-ratio", info="share of entries kept after balancing"))
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
    page.add("method_status", gr.Markdown("", elem_id="method-status", elem_classes=["status"]))


def preset_info(preset: str) -> str:
    m = METHODS.get(preset) or METHODS[DEFAULT_UI["preset"]]
    how = (f"prune **{m.stages[0]}** → amplify **{m.stages[1]}** → combine **{m.stages[2]}**" if m.stages
           else f"{FAMILY_LABELS[m.family]} of the weights")
    return f"{m.doc}  \n{how} · [paper]({m.paper})" if m.paper else f"{m.doc}  \n{how}"


def preset_view(v: dict) -> dict:
    """Only the controls the method uses (its other parameters at the method's defaults), and two
    lines on what it does with its paper."""
    preset = v["preset"] if v["preset"] in picker_methods() else DEFAULT_UI["preset"]
    m = METHODS[preset]
    prune, amplify, combine = m.stages or ("none", "none", "none")
    keys = {p.key for p in m.params}
    own = {p.key: p for p in extra_params(preset)}
    out = {"preset_info": preset_info(preset), "density": gr.update(visible=prune != "none"),
           "lambda_": gr.update(visible="lambda" in keys), "weights": gr.update(visible="weight" in keys),
           "dp_group": gr.update(visible=prune == "dp"), "dpa_group": gr.update(visible=amplify == "dpa"),
           "pcb_ratio": gr.update(visible=combine == "pcb"),
           "seed": gr.update(visible=prune in ("random", "della", "apl")),
           "extra_group": gr.update(visible=bool(own)),
           "gradient_acc": gr.update(visible=any(p.per_tensor for p in own.values()))}
    for key in EXTRA_SPECS:
        p = own.get(key)
        out[f"x_{key}"] = gr.update(visible=p is not None, **({"value": extra_default(p), "info": p.doc}
                                                             if p is not None else {}))
    return out


VIEW_OUT = ["preset_info", "density", "lambda_", "weights", "dp_group", "dpa_group", "pcb_ratio", "seed",
            "extra_group", "gradient_acc", *[f"x_{k}" for k in EXTRA_SPECS]]


def gradient_view(v: dict) -> dict:
    """The per-layer editor's curves over the loaded model's layers (for every filter it names)."""
    from .. import figures
    state: AppState = v["state"]
    n = len(state.ws.access.blocks()) if state.ws is not None and state.ws.loaded else 8
    try:
        settings = gradient_settings(v["gradients"], v["preset"])
    except _expected() as e:
        return {"method_status": warn(message(e))}
    curves = []
    for key, setting in settings.items():
        filters = [e.get("filter") for e in setting if isinstance(e, dict)] if isinstance(setting, list) and \
            setting and isinstance(setting[0], dict) else [None]
        for f in filters:
            curves.append((f"{key}" + (f" · {f}" if f else ""), P.gradient_curve(setting, f or "", n)))
    return {"gradient_plot": figures.layer_curves(curves, n), "method_status": ""}
def bands_view(v: dict) -> dict:
    n = int(v["n_bands"] or 1)
    return {"band1": gr.update(visible=n >= 2), "band2": gr.update(visible=n >= 3),
            "alpha2": gr.update(visible=n >= 2), "alpha3": gr.update(visible=n >= 3)}


def controls_of(v: dict) -> MethodControls:
    return controls_from({k: v[k] for k in CONTROL_KEYS})


def show_controls(c: MethodControls, base: str | None = None, fts: list[str] | None = None,
                  choices: list[str] | None = None) -> dict:
    """Outputs that put `c` (and optionally the model pickers) on the page, with the views that
    depend on the preset and band count."""
    out = dict(values_of(c))
    for k, upd in {**preset_view(out), **bands_view(out)}.items():
        out[k] = gr.update(value=out[k], visible=upd["visible"]) if k in out else upd
    if base is not None:
        out["base"] = gr.update(choices=choices, value=base)
        out["fts"] = gr.update(choices=choices, value=fts)
    return out


CONTROLS_OUT = [*CONTROL_KEYS, "preset_info", "dp_group", "dpa_group", "extra_group", "gradient_acc"]   # show_controls
SHOW_OUT = ["base", "fts", *CONTROLS_OUT]


def auto_alpha(v: dict):
    """DPPA's greedy α search per fine-tune on its domain's dev split (demo models know theirs),
    streaming the search log; the result goes into the per-model α box."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        if c.stages[1] != "dpa":
            raise UserError("auto α searches the DPA band factors: pick the dppa method first")
    except _expected() as e:
        yield {"method_status": warn(message(e))}
        return
    yield {"alpha_log": "searching … (each step scores the pruned fine-tune on its dev split)", "method_status": ""}
    from .search import Job, search_threads       # the log streams while the walk runs
    job = Job(lambda log, on_eval: ws.search_amplification(c, log=log), search_threads(ws))
    for _ in job.updates():
        yield {"alpha_log": "\n".join(job.lines[-12:])}
    if isinstance(job.error, _expected()):
        yield {"method_status": warn(message(job.error))}
        return
    if job.error is not None:
        raise job.error
    cfg, report = job.result
    lines = job.lines
    per_model = {m.model: list(m.amplification) for m in cfg.models}
    text = "; ".join(f"{r}=" + ",".join(f"{a:g}" for a in al) for r, al in per_model.items())
    log = "\n".join(lines[-40:])
    yield {"alpha_log": log, "alpha_per_model": text,
           "method_status": ok("α found per fine-tune: " + ", ".join(
               f"{short(r)} {al}" for r, al in per_model.items()) + " (merge to use them)")}


def load_example(v: dict) -> dict:
    """An example config from assets/examples into the controls."""
    from .score import load_yaml_into_controls
    files = example_files()
    if v["example"] not in files:
        return {"method_status": warn(f"no example named {v['example']!r}")}
    out = load_yaml_into_controls({"state": v["state"], "yaml_code": files[v["example"]].read_text()})
    out["method_status"] = out.pop("score_status")
    return out


def wire(page) -> None:
    page.on(page["preset"].input, preset_view, ["preset"], VIEW_OUT, api_name="preset_view", show_progress="hidden")
    page.on([page["gradients"].input, page["gradient_acc"].expand], gradient_view, ["state", "preset", "gradients"],
            ["gradient_plot", "method_status"], api_visibility="private", show_progress="hidden")
    page.on(page["n_bands"].input, bands_view, ["n_bands"], ["band1", "band2", "alpha2", "alpha3"],
            api_visibility="private", show_progress="hidden")
    page.on(page["auto_alpha_btn"].click, auto_alpha, ["state", *CONTROL_KEYS],
            ["alpha_log", "alpha_per_model", "method_status"], api_name="auto_alpha",
            concurrency_limit=1, concurrency_id="merge")


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
