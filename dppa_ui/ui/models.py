"""1 · Models: pick the base and its fine-tunes (demo family, folders under the model roots, hub
ids), load them (headers only: nothing is read until a view needs it) and start the background
statistics."""
from __future__ import annotations

import gradio as gr

from ..refs import ModelRefError
from ..workspace import Workspace, short
from .choices import all_choices, demo_choices, resolve_user_ref
from .common import TEMP, AppState, UserError, expected, message, ok, policy, roots_text, warn
from .reports import summary_markdown


def build(page) -> None:
    refs, base0, fts0, note = demo_choices()
    with gr.Row():
        page.add("base", gr.Dropdown(refs, value=base0, label="Base model", allow_custom_value=True, scale=2,
                                     elem_id="base-model"))
        page.add("fts", gr.Dropdown(refs, value=fts0, multiselect=True, label="Fine-tunes", allow_custom_value=True,
                                    scale=3, elem_id="finetunes"))
    page.add("add_box", gr.Textbox(label="Add a model", placeholder="a folder, or a hub id org/name",
                                   elem_id="add-model-box", info=f"folders under {roots_text()}"))
    page.add("add_btn", gr.Button("Add", elem_id="add-model-btn", size="sm"))
    page.add("load_btn", gr.Button("Load models", variant="primary", elem_id="load-models-btn"))
    page.add("models_status", gr.Markdown("", elem_id="models-status", elem_classes=["status"]))
    page.add("summary", gr.Markdown(note or "The demo family loads when the page opens.", elem_id="models-summary"))


def add_model(v: dict) -> dict:
    """The model box: validate a path or hub id and offer it in both pickers (selected as a fine-tune)."""
    state: AppState = v["state"]
    try:
        ref = resolve_user_ref(v["add_box"])
    except (*expected(), ModelRefError) as e:
        return {"models_status": warn(message(e))}
    if ref not in state.added:
        state.added.append(ref)
    choices = all_choices(state)
    fts = list(v["fts"] or [])
    if ref not in fts and ref != v["base"]:
        fts.append(ref)
    return {"base": gr.update(choices=choices), "fts": gr.update(choices=choices, value=fts),
            "models_status": ok(f"added {short(ref)}: it is selected as a fine-tune (pick it as the base instead "
                                f"if it is one)")}


def load_models(v: dict) -> dict:
    """Load base + fine-tunes into the session's workspace. Outputs the summary and the inspect
    pickers for the new models; the previous models stay when anything is wrong."""
    state: AppState = v["state"]
    fts = [f for f in (v["fts"] or []) if f]
    before = list(state.ws.access.ft_refs) if state.ws is not None and state.ws.loaded else None
    try:
        if not v["base"]:
            raise UserError("pick a base model first")
        if not fts:
            raise UserError("pick at least one fine-tune to merge into the base")
        ws = state.ws if state.ws is not None else Workspace(policy(), temp_root=TEMP.get())
        report = v.get("progress")      # hub downloads say what they fetch, its size and the cap
        # The statistics start after the first view is drawn (inspect starts them).
        ws.load(v["base"], fts, progress=(lambda text: report(None, desc=text)) if report else None,
                start_stats=False)
    except (*expected(), OSError) as e:
        return {"models_status": warn(message(e)), "state": state}
    state.ws, state.shown_tensor = ws, None
    acc = ws.access
    block, module, matrix = acc.default_view()
    blocks = acc.blocks()
    out = {}
    note = ""
    if before is not None and before != list(acc.ft_refs):
        # One weight and one α list per fine-tune: they meant the previous models
        out = {"weights": "", "alpha_per_model": ""}
        note = "; the weights and per-model α were reset to the sliders' (they are per fine-tune)"
    return {
        **out, "state": state, "summary": summary_markdown(ws),
        "models_status": ok(f"loaded {short(v['base'])} and {len(fts)} fine-tune(s){note}"),
        "block": gr.update(minimum=min(blocks, default=0), maximum=max(max(blocks, default=0), 1), value=block,
                           step=1, interactive=len(blocks) > 1),
        "module": gr.update(choices=acc.module_types(), value=module),
        "matrix": gr.update(choices=acc.matrix_names(), value=matrix),
        "heat_model": gr.update(choices=[(short(r), i) for i, r in enumerate(fts)], value=0),
        "compare": gr.update(choices=["none", "base", *fts], value="base"),
        "stats_timer": gr.Timer(active=True),
        # Folded once loaded, so the method controls below come into view; the label says what is loaded.
        "models_acc": gr.update(open=False, label=f"1 · Models: {short(v['base'])} + {len(fts)} fine-tune(s)"),
    }


LOAD_OUTPUTS = ["state", "summary", "models_status", "block", "module", "matrix", "heat_model", "compare",
                "stats_timer", "models_acc", "weights", "alpha_per_model"]


def wire(page):
    ev = page.on(page["load_btn"].click, load_models, ["state", "base", "fts"], LOAD_OUTPUTS, progress=True,
                 api_name="load_models")
    page.on([page["add_btn"].click, page["add_box"].submit], add_model, ["state", "add_box", "base", "fts"],
            ["base", "fts", "models_status"], api_name="add_model")
    page.loaded_events = [ev]
    return ev
