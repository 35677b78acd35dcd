"""3 · Inspect: what the current settings keep, before any merge. The tensor on screen is read
on demand; whole-model views (the blocks x modules map, DP's densities) wait for the background
statistics and say how far they are."""
from __future__ import annotations

import gradio as gr

from .. import analysis, figures
from ..workspace import short
from .common import CONTROL_KEYS, AppState, UserError, _expected, message, warn
from .method import controls_of

THRESHOLD_HEADERS = ["fine-tune", "density", "keep |δ| ≥", "DPA band edges", "kept %"]
HEATMAP_METRICS = {"mean |δ|": "mean_abs", "outlier %": "outlier_pct", "DP density": "dp_density"}


def build(page) -> None:
    with gr.Row(equal_height=True):
        page.add("block", gr.Slider(0, 1, value=0, step=1, label="Block (layer)", elem_id="block", scale=2))
        page.add("module", gr.Dropdown([], label="Module", elem_id="module", scale=2))
    page.add("tensor_name", gr.Markdown("", elem_id="tensor-name"))
    page.add("stats_status", gr.Markdown("", elem_id="stats-status", elem_classes=["status"]))
    page.add("histogram", gr.Plot(label="|δ| histogram", elem_id="histogram"))
    page.add("thresholds", gr.Dataframe(headers=THRESHOLD_HEADERS, label="Keep thresholds", interactive=False,
                                        elem_id="thresholds", wrap=False,
                                        column_widths=["28%", "14%", "18%", "26%", "14%"]))
    page.add("inspect_status", gr.Markdown("", elem_id="inspect-status", elem_classes=["status"]))
    with gr.Accordion("Blocks × modules map", open=True, elem_id="heatmap-accordion"):
        with gr.Row():
            page.add("heat_metric", gr.Radio(list(HEATMAP_METRICS), value="mean |δ|", label="Map", elem_id="heatmap-metric"))
            page.add("heat_model", gr.Dropdown([], label="Fine-tune", elem_id="heatmap-model"))
        page.add("heatmap", gr.Plot(label="Blocks × modules", elem_id="heatmap"))
        page.add("heatmap_note", gr.Markdown("", elem_id="heatmap-note", elem_classes=["status"]))
    with gr.Accordion("Masks of a weight matrix", open=True, elem_id="masks-accordion"):
        page.add("matrix", gr.Dropdown([], label="Weight matrix", elem_id="mask-matrix"))
        page.add("mask_plot", gr.Plot(label="Masks", elem_id="mask-plot"))
        page.add("mask_numbers", gr.Markdown("", elem_id="mask-numbers"))
    page.add("stats_timer", gr.Timer(1.0, active=False))


def _setup(v: dict):
    state: AppState = v["state"]
    ws = state.workspace()
    cfg = ws.config(controls_of(v))
    if cfg.prune == "dp":
        ws.stats.start(cfg.dp_outlier_m)
    return ws, cfg


def pending_text(ws, cfg) -> str:
    p = ws.stats_progress(cfg.dp_outlier_m)
    return f"whole-model statistics {p.text()}" if p.state != "done" else ""


def threshold_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        thr = r["threshold"]
        edges = ", ".join("empty" if e is None or e <= 0 else f"{e:.3g}" for e in r["band_edges"])
        out.append([short(r["model"]), f"{r['density']:.3f}" + (" *" if r["pending"] else ""),
                    "" if thr is None else f"{thr:.4g}", edges, f"{100.0 * r['kept'] / max(r['numel'], 1):.2f}"])
    return out


def inspect(v: dict) -> dict:
    """The |δ| histogram of the (block, module) tensor with each fine-tune's keep threshold and
    DPA band edges, and the numbers. The mask viewer follows to the same tensor."""
    try:
        ws, cfg = _setup(v)
        if not v["module"]:
            raise UserError("pick a module type")
        name = ws.access.tensor_name(int(v["block"]), v["module"])
        rows = analysis.thresholds(ws, cfg, name)
        fig = figures.histogram(analysis.histogram(ws, cfg, name, rows), cfg.method_name, cfg.prune, cfg.amplify)
    except _expected() as e:
        return {"inspect_status": warn(message(e))}
    notes = []
    if rows and rows[0]["pending"]:
        notes.append(f"* DP's module densities: {pending_text(ws, cfg)}; the target density is shown until then")
    notes += [f"⚠ {n}" for n in ws.dp_notices(cfg)]
    out = {"histogram": fig, "thresholds": threshold_rows(rows), "tensor_name": f"`{name}`",
           "inspect_status": "  \n".join(notes)}
    state: AppState = v["state"]
    if name != state.shown_tensor:      # the histogram moved to another tensor: the masks follow
        state.shown_tensor = name
        if name in ws.access.matrix_names():
            out["matrix"] = gr.update(value=name)
    return out


def heatmap(v: dict) -> dict:
    """The blocks x modules map of one fine-tune (mean |δ|, outlier % or DP density)."""
    try:
        ws, cfg = _setup(v)
        metric = HEATMAP_METRICS.get(v["heat_metric"], v["heat_metric"])
        i = int(v["heat_model"] or 0)
        i = i if 0 <= i < len(cfg.models) else 0          # the model set changed under the picker
        blocks, types, z = analysis.heatmap_values(ws, cfg, metric, i)
    except _expected() as e:
        return {"heatmap_note": warn(message(e))}
    label = analysis.METRICS[metric]
    if z is None:
        return {"heatmap": figures.message(f"{label}: {pending_text(ws, cfg)}"),
                "heatmap_note": "the map needs every tensor's statistics; it appears when they are computed"}
    m = cfg.models[i]
    sub = {"mean_abs": "mean |δ| per tensor",
           "outlier_pct": f"% of entries above {cfg.dp_outlier_m:g} × the tensor's mean |δ|",
           "dp_density": f"density DP gives each module at target {m.density:g}, DP λ {cfg.dp_lambda:g}, "
                         f"M {cfg.dp_outlier_m:g}"}[metric]
    return {"heatmap": figures.heatmap(blocks, types, z, label, m.model, sub), "heatmap_note": ""}


def numbers_markdown(d: dict) -> str:
    lines = [f"`{d['name']}` {d['shape']}, each cell {'×'.join(map(str, d['cell']))} entries"]
    lines.append("- **kept**: " + ", ".join(f"{short(k)} {p:.1f}%" for k, p in d["kept_pct"].items()))
    lines.append("- **wins the entry**: " + ", ".join(f"{short(k)} {p:.1f}%" for k, p in d["winner_pct"].items())
                 + f", none {d['no_winner_pct']:.1f}%")
    lines.append(f"- **sign conflicts**: {d['conflict_pct']:.1f}% of entries")
    if d["pcb_mean_weight"]:
        lines.append("- **mean PCB weight**: " + ", ".join(f"{short(k)} {w:.3f}" for k, w in d["pcb_mean_weight"].items()))
    return "\n".join(lines)


def masks(v: dict) -> dict:
    """Kept masks per fine-tune, the winner of each entry after the combine, sign conflicts and
    PCB's weights, for one weight matrix."""
    try:
        ws, cfg = _setup(v)
        if not v["matrix"]:
            raise UserError("pick a weight matrix")
        d = analysis.mask_data(ws, cfg, v["matrix"])
    except _expected() as e:
        return {"mask_numbers": warn(message(e))}
    return {"mask_plot": figures.masks(d, cfg.method_name, cfg.combine), "mask_numbers": numbers_markdown(d)}


INSPECT_IN = ["state", "block", "module", *CONTROL_KEYS]
HEATMAP_IN = ["state", "heat_metric", "heat_model", *CONTROL_KEYS]
MASKS_IN = ["state", "matrix", *CONTROL_KEYS]
VIEW_IN = ["state", "block", "module", "matrix", "heat_metric", "heat_model", *CONTROL_KEYS]
INSPECT_OUT = ["histogram", "thresholds", "tensor_name", "matrix", "inspect_status"]
HEATMAP_OUT = ["heatmap", "heatmap_note"]
MASKS_OUT = ["mask_plot", "mask_numbers"]


def stats_tick(v: dict) -> dict:
    """Every second while the background statistics run: their progress; when they finish, every
    view that waited for them, and the timer stops."""
    from .models import summary_markdown
    state: AppState = v["state"]
    if state.ws is None or not state.ws.loaded:
        return {"stats_timer": gr.Timer(active=False)}
    ws = state.ws
    try:
        m = controls_of(v).dp_outlier_m
    except _expected():
        m = 5.0
    ms = sorted({5.0, m})
    progress = [ws.stats_progress(x) for x in ms]
    if any(p.state == "running" for p in progress):
        p = next(p for p in progress if p.state == "running")
        return {"stats_status": f"⏳ whole-model statistics {p.text()}"}
    out = {"stats_timer": gr.Timer(active=False), "summary": summary_markdown(ws),
           "stats_status": "" if all(p.state == "done" for p in progress)
           else f"whole-model statistics: {', '.join(p.text() for p in progress)}"}
    for view in (inspect, heatmap, masks):
        out.update(view(v))
    return out


def wire(page, triggers: list, after_load: list) -> None:
    """`triggers`: the method controls' commit events; `after_load`: events that load models."""
    quiet = dict(show_progress="hidden", trigger_mode="always_last")
    ev = page.on([*triggers, page["block"].release, page["module"].input], inspect, INSPECT_IN, INSPECT_OUT,
                 api_name="inspect", **quiet)
    ev = page.then(ev, heatmap, HEATMAP_IN, HEATMAP_OUT, api_name="heatmap", **quiet)
    page.then(ev, masks, MASKS_IN, MASKS_OUT, api_name="masks", **quiet)
    page.on([page["heat_metric"].input, page["heat_model"].input], heatmap, HEATMAP_IN, HEATMAP_OUT,
            api_visibility="private", **quiet)
    page.on(page["matrix"].input, masks, MASKS_IN, MASKS_OUT, api_visibility="private", **quiet)
    page.on(page["stats_timer"].tick, stats_tick, VIEW_IN,
            ["stats_status", "stats_timer", "summary", *INSPECT_OUT, *HEATMAP_OUT, *MASKS_OUT],
            api_visibility="private", **quiet)
    for ev in after_load:
        refresh(page, ev)


def refresh(page, event):
    """After an event that changes models or controls: redraw the three views (not as API endpoints)."""
    quiet = dict(show_progress="hidden", api_visibility="private")
    ev = page.then(event, inspect, INSPECT_IN, INSPECT_OUT, **quiet)
    ev = page.then(ev, heatmap, HEATMAP_IN, HEATMAP_OUT, **quiet)
    return page.then(ev, masks, MASKS_IN, MASKS_OUT, **quiet)
