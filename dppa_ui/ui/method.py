"""2 · Method: the preset, and only the controls its stages use. Controls commit on release (a
slider drag is one update, not one per pixel); the inspect views follow each commit."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..config import PRESET_INFO, PRESETS
from ..controls import MethodControls
from ..workspace import short
from .common import (CONTROL_KEYS, DEFAULT_UI, AppState, UserError, _expected, controls_from, message, ok,
                     values_of, warn)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"


def example_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def build(page) -> None:
    d = DEFAULT_UI
    with gr.Row(equal_height=True):
        page.add("preset", gr.Dropdown(list(PRESETS), value=d["preset"], label="Preset", scale=3, elem_id="preset"))
        page.add("example", gr.Dropdown(list(example_files()), value=None, label="Example config", scale=2,
                                        elem_id="example-config"))
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
    page.add("seed", gr.Number(value=d["seed"], precision=0, label="Seed (DARE's random masks)", visible=False,
                               elem_id="seed"))
    page.add("method_status", gr.Markdown("", elem_id="method-status", elem_classes=["status"]))


def preset_info(preset: str) -> str:
    prune, amplify, combine = PRESETS.get(preset, PRESETS[DEFAULT_UI["preset"]])
    text, url = PRESET_INFO.get(preset, ("", ""))
    return f"{text}  \nprune **{prune}** → amplify **{amplify}** → combine **{combine}** · [paper]({url})"


def preset_view(v: dict) -> dict:
    """Only the controls the preset's stages use, and two lines on what it does with its paper."""
    preset = v["preset"]
    prune, amplify, combine = PRESETS.get(preset, PRESETS[DEFAULT_UI["preset"]])
    return {"preset_info": preset_info(preset), "density": gr.update(visible=prune != "none"),
            "dp_group": gr.update(visible=prune == "dp"), "dpa_group": gr.update(visible=amplify == "dpa"),
            "pcb_ratio": gr.update(visible=combine == "pcb"), "seed": gr.update(visible=prune == "random")}


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


CONTROLS_OUT = [*CONTROL_KEYS, "preset_info", "dp_group", "dpa_group"]     # what show_controls sets
SHOW_OUT = ["base", "fts", *CONTROLS_OUT]


def auto_alpha(v: dict):
    """DPPA's greedy α search per fine-tune on its domain's dev split (demo models know theirs),
    streaming the search log; the result goes into the per-model α box."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        if c.stages[1] != "dpa":
            raise UserError("auto α searches the DPA band factors: pick the dppa preset first")
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
    page.on(page["preset"].input, preset_view, ["preset"], ["preset_info", "density", "dp_group", "dpa_group",
                                                             "pcb_ratio", "seed"],
            api_name="preset_view", show_progress="hidden")
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
        else:
            out.append(comp.input)
    return out
