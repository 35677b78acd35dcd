"""3 · Inspect: what the current settings keep, before any merge. The tensor on screen is read
on demand; whole-model views (the blocks x modules map, DP's densities) wait for the background
statistics and say how far they are. A config that prunes with APL waits the same way for each
fine-tune's importance; the APL importance map (exact intervention beside its gradient
approximation) is computed on demand, once per fine-tune."""
from __future__ import annotations

import dataclasses

import gradio as gr
import torch

from .. import analysis, figures
from ..workspace import short
from .common import CONTROL_KEYS, FIRST_VIEW, AppState, UserError, bounded, expected, fmt, lenient, message, warn
from .controls_ui import controls_of
from .reports import summary_markdown

THRESHOLD_HEADERS = ["fine-tune", "density", "keeps", "DPA bands: edge · α · kept Σ|δ|", "kept %"]
HEATMAP_METRICS = {"mean |δ|": "mean_abs", "outlier %": "outlier_pct", "DP density": "dp_density"}


def build(page) -> None:
    with gr.Row(equal_height=True):
        page.add("block", lenient(gr.Slider(0, 1, value=0, step=1, label="Block (layer)", elem_id="block", scale=2)))
        page.add("module", gr.Dropdown([], label="Module", elem_id="module", scale=2))
    page.add("tensor_name", gr.Markdown("", elem_id="tensor-name"))
    page.add("stats_status", gr.Markdown("", elem_id="stats-status", elem_classes=["status"]))
    page.add("histogram", gr.Plot(label="|δ| histogram", elem_id="histogram"))
    page.add("thresholds", gr.Dataframe(headers=THRESHOLD_HEADERS, label="Keep thresholds", interactive=False,
                                        elem_id="thresholds", wrap=True,
                                        column_widths=["17%", "15%", "24%", "32%", "12%"]))
    page.add("inspect_status", gr.Markdown("", elem_id="inspect-status", elem_classes=["status"]))
    with gr.Accordion("Blocks × modules map", open=True, elem_id="heatmap-accordion"):
        with gr.Row():
            page.add("heat_metric", gr.Radio(list(HEATMAP_METRICS), value="mean |δ|", label="Map", elem_id="heatmap-metric"))
            page.add("heat_model", gr.Dropdown([], label="Fine-tune", elem_id="heatmap-model"))
        page.add("heatmap", gr.Plot(label="Blocks × modules", elem_id="heatmap"))
        page.add("heatmap_note", gr.Markdown("", elem_id="heatmap-note", elem_classes=["status"]))
        with gr.Group(elem_id="apl-map-group"):
            with gr.Row(equal_height=True):
                gr.Markdown(APL_INTRO, elem_id="apl-intro")
                page.add("apl_btn", gr.Button("Compute APL importance", size="sm", scale=0, min_width=220,
                                              elem_id="apl-btn"))
            page.add("apl_plot", gr.Plot(label="APL importance", elem_id="apl-map", visible=False))
            page.add("apl_note", gr.Markdown("", elem_id="apl-note", elem_classes=["status"]))
    with gr.Accordion("Masks of a weight matrix", open=True, elem_id="masks-accordion"):
        page.add("matrix", gr.Dropdown([], label="Weight matrix", elem_id="mask-matrix"))
        page.add("mask_plot", gr.Plot(label="Masks", elem_id="mask-plot"))
        page.add("mask_numbers", gr.Markdown("", elem_id="mask-numbers"))
        # What the method does beyond masks: DELLA's keep probabilities, an interpolation's angles
        page.add("method_plot", gr.Plot(label="Method view", elem_id="method-view", visible=False))
        page.add("merged_plot", gr.Plot(label="Merged delta: before / after", elem_id="merged-view", visible=False))
    page.add("stats_timer", gr.Timer(1.0, active=False))


APL_INTRO = ("**APL importance** of the fine-tune picked above ([arXiv 2408.09485](https://arxiv.org/abs/2408.09485)): "
             "how much its loss on a few examples of its own task rises when one module's delta is removed "
             "(exact, one forward pass each), beside the one-backward-pass gradient approximation.")


def _setup(v: dict):
    state: AppState = v["state"]
    ws = state.workspace()
    return ws, ws.config(controls_of(v))


def view_config(ws, cfg):
    """(the config the views draw, APL pending). While a `prune: apl` config's importance is being
    computed, the views show the target density with APL's drop rule, as DP's do while its
    statistics are computed."""
    if cfg.prune == "apl" and ws.dp_maps(cfg) is None:
        return dataclasses.replace(cfg, prune="random" if cfg.get("apl_drop") == "random" else "magnitude"), True
    return cfg, False


def apl_pending_text(ws, cfg) -> str:
    p = ws.apl_progress(cfg)
    if p.state == "failed":
        return f"APL importance failed: {p.error}"
    return f"APL importance of the fine-tunes {p.done}/{p.total} computed"


def start_statistics(ws, cfg) -> None:
    """Start the whole-model statistics the views may need (no-op once started). Called after a
    view is computed, so the first view never shares the CPU with them."""
    ws.stats.start(5.0)
    if cfg.prune == "dp":
        ws.stats.start(cfg.get("dp_outlier_m"))
    if cfg.prune == "apl":
        try:
            ws.apl.start(cfg, ws.align(cfg))
        except expected():         # no task data: the views that need APL's densities say so
            pass


def pcb_running(ws, cfg):
    """The progress of PCB's whole-model statistics while they run in the background (else None)."""
    try:
        p = ws.pcb_progress(cfg)
    except expected():          # the views say what is wrong with the config
        return None
    return p if p is not None and p.state == "running" else None


def apl_running(ws, cfg) -> bool:
    """A `prune: apl` config whose importance is being computed in the background."""
    try:
        return cfg.prune == "apl" and ws.apl_progress(cfg).state == "running"
    except expected():
        return False


def pending_text(ws, cfg) -> str:
    p = ws.stats_progress(cfg.get("dp_outlier_m"))
    return f"whole-model statistics {p.text()}" if p.state != "done" else ""


def keep_rule(r: dict) -> str:
    """What decides that an entry is kept, for one fine-tune (a thresholds row)."""
    if r.get("pcb_cut") is not None:
        return f"score > {fmt(r['pcb_cut'])}"
    if r["threshold"] is None:
        return "at random" if r["prune"] in ("random", "della") or r["kept"] < r["numel"] else "every entry"
    if r.get("upper") is not None:
        return f"{fmt(r['threshold'])} ≤ |δ| ≤ {fmt(r['upper'])}"
    return f"|δ| ≥ {fmt(r['threshold'])}"


def bands_text(r: dict) -> str:
    """DPA's bands for one fine-tune: the inner edges (largest band first), each band's α, and the
    kept |δ| mass after the α over before."""
    if not r.get("alphas"):
        return ""
    edges = ", ".join("empty" if e is None or e <= 0 else fmt(e) for e in r["band_edges"])
    mass = "" if r.get("mass_ratio") is None else f" · ×{fmt(r['mass_ratio'])}"
    return f"{edges or '—'} · α {', '.join(fmt(a) for a in r['alphas'])}{mass}"


def threshold_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        density = (f"{fmt(r['pcb_ratio'])} (PCB ratio)" if r.get("pcb_ratio") is not None
                   else fmt(r["density"]) + (" *" if r["pending"] else ""))
        out.append([short(r["model"]), density, keep_rule(r), bands_text(r), fmt(100.0 * r["kept"] / max(r["numel"], 1))])
    return out


def not_drawn(text: str, height: int = 320):
    """A view's one-line state when it cannot draw what the controls describe."""
    return figures.message(f"not drawn: {text}", height=height)


def inspect(v: dict) -> dict:
    """The |δ| histogram of the (block, module) tensor with each fine-tune's keep threshold and
    DPA band edges, and the numbers. The mask viewer follows to the same tensor."""
    try:
        ws, cfg = _setup(v)
        if not v["module"]:
            raise UserError("pick a module type")
        blocks = ws.access.blocks() or [0]
        name = ws.access.tensor_name(bounded(v["block"], "Block", blocks[0], blocks[-1], integer=True), v["module"])
    except expected() as e:      # the controls' problem is said once, beside them (method.check)
        return {"histogram": not_drawn(message(e)), "thresholds": [], "inspect_status": ""}
    state: AppState = v["state"]
    out = {}
    if name != state.shown_tensor:      # the histogram moved to another tensor: the masks follow
        state.shown_tensor = name
        if name in ws.access.matrix_names():
            out["matrix"] = gr.update(value=name)
    try:
        shown, apl_pending = view_config(ws, cfg)
        rows = analysis.thresholds(ws, shown, name)
        drop = "random" if analysis.random_drop(shown) else shown.prune      # how the figure explains its lines
        fig = figures.histogram(analysis.histogram(ws, shown, name, rows), cfg.method_name, drop, cfg.amplify)
    except expected() as e:      # a view that waits (PCB's statistics) or cannot draw says why
        return {**out, "histogram": not_drawn(message(e)), "thresholds": [], "tensor_name": f"`{name}`",
                "inspect_status": ""}
    notes = []
    if rows and rows[0]["pending"]:
        notes.append(f"* DP's module densities: {pending_text(ws, cfg)}; the target density is shown until then")
    if apl_pending:
        notes.append(f"APL's module densities: {apl_pending_text(ws, cfg)}; the target density is shown until then")
    notes += [f"⚠ {n}" for n in ws.dp_notices(cfg)]
    out.update({"histogram": fig, "thresholds": threshold_rows(rows), "tensor_name": f"`{name}`",
                "inspect_status": "  \n".join(notes)})
    FIRST_VIEW.set()
    start_statistics(ws, cfg)
    return out


def heatmap(v: dict) -> dict:
    """The blocks x modules map of one fine-tune (mean |δ|, outlier % or DP density)."""
    try:
        ws, cfg = _setup(v)
        metric = HEATMAP_METRICS.get(v["heat_metric"], v["heat_metric"])
        i = int(v["heat_model"] or 0)
        i = i if 0 <= i < len(cfg.models) else 0          # the model set changed under the picker
        blocks, types, z = analysis.heatmap_values(ws, cfg, metric, i)
    except expected() as e:
        return {"heatmap": not_drawn(message(e)), "heatmap_note": ""}
    label = analysis.METRICS[metric]
    start_statistics(ws, cfg)
    if z is None:
        return {"heatmap": figures.message(f"{label}: {pending_text(ws, cfg)}"),
                "heatmap_note": "the map needs every tensor's statistics; it appears when they are computed"}
    m = cfg.models[i]
    sub = {"mean_abs": "mean |δ| per tensor",
           "outlier_pct": f"% of entries above {cfg.get('dp_outlier_m'):g} × the tensor's mean |δ|",
           "dp_density": f"density DP gives each module at target {m.get('density'):g}, DP λ {cfg.get('dp_lambda'):g}, "
                         f"M {cfg.get('dp_outlier_m'):g}"}[metric]
    return {"heatmap": figures.heatmap(blocks, types, z, label, m.model, sub), "heatmap_note": ""}


def numbers_markdown(d: dict) -> str:
    lines = [f"`{d['name']}` {d['shape']}, each cell {'×'.join(map(str, d['cell']))} entries"]
    what = f" (PCB: its top {fmt(100 * d['pcb_ratio'])}% of balancing scores)" if d.get("pcb_ratio") is not None else ""
    lines.append(f"- **kept**{what}: " + ", ".join(f"{short(k)} {fmt(p)}%" for k, p in d["kept_pct"].items()))
    lines.append("- **wins the entry**: " + ", ".join(f"{short(k)} {fmt(p)}%" for k, p in d["winner_pct"].items())
                 + f", none {fmt(d['no_winner_pct'])}%")
    lines.append(f"- **sign conflicts**: {fmt(d['conflict_pct'])}% of entries")
    if d["pcb_mean_weight"]:
        lines.append("- **mean PCB weight of the kept entries**: "
                     + ", ".join(f"{short(k)} {fmt(w)}" for k, w in d["pcb_mean_weight"].items()))
    return "\n".join(lines)


def svd_note(d: dict) -> str:
    """What the singular-value view measures, stated with its numbers (TSV-M, Iso-C, Iso-CTS)."""
    k, r, n = d["k_merged"], d["rank"], len(d["models"])
    order = {"tsv_m": "by the singular value it keeps", "iso_c": "by the task sum's singular values, before the "
             "spectrum is flattened", "iso_cts": "by the singular value each was collected with, before the spectrum "
             "is flattened"}[d["combine"]]
    lines = [f"**Share kept** of fine-tune i = ‖U_k U_kᵀ δᵢ‖²_F / ‖δᵢ‖²_F: the energy of its delta in the span of "
             f"the top k left singular vectors U_k of the merged delta M (ranked {order}), k the fewest that hold "
             f"95 % of ‖M‖_F (‖M_k‖_F ≥ 0.95 ‖M‖_F; Marczak et al.'s rank rule, whose subspace alignment ratio is "
             f"this share's square root). Here k = {k} of r = {r}; for task arithmetic's Σ wᵢδᵢ (grey bars), its own "
             f"top k = {d['k_sum']}."]
    head, cells = ["fine-tune", f"kept by {d['method']}", "kept by task arithmetic"], []
    if d["combine"] == "tsv_m":
        lines.append(f"**TSV-M** keeps each task's top k = ⌊r / T⌋ = ⌊{r} / {n}⌋ = {d['k_task']} singular triplets "
                     f"of wᵢδᵢ, then decorrelates them; *own top {d['k_task']}* = the share of wᵢδᵢ's energy in "
                     f"them (Σ_{{j≤k}} σ_j² / Σ σ_j²).")
        head.append(f"own top {d['k_task']}")
        cells = [[f"{fmt(100 * x)}%"] for x in d["own"]]
    elif d["combine"] == "iso_c":
        lines.append(f"**Iso-C** keeps the singular vectors of Σ δᵢ and sets each of its {r} singular values to "
                     f"their mean σ̄ = {fmt(d['flat'])}: M's spectrum is flat.")
    else:
        lines.append(f"**Iso-CTS** splits r = {r} into a common subspace, the top c = {d['common']} left singular "
                     f"vectors U_c of Σ δᵢ, and {d['specific']} directions per task, the top ones of "
                     f"(I − U_c U_cᵀ) δᵢ; *common* = ‖U_cᵀ δᵢ‖² / ‖δᵢ‖², *own* = the energy of δᵢ's top "
                     f"{d['specific']} directions outside U_c over ‖δᵢ‖².")
        head += ["common", f"own {d['specific']}"]
        cells = [[f"{fmt(100 * c)}%", f"{fmt(100 * o)}%"] for c, o in zip(d["common_share"], d["specific_share"])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, ref in enumerate(d["models"]):
        rows.append("| " + " | ".join([f"`{short(ref)}`", f"{fmt(100 * d['kept'][i])}%",
                                       f"{fmt(100 * d['kept_sum'][i])}%", *(cells[i] if cells else [])]) + " |")
    return "\n\n".join(lines) + "\n\n" + "\n".join(rows)


def masks(v: dict) -> dict:
    """Kept masks per fine-tune, the winner of each entry after the combine, sign conflicts and
    PCB's weights, for one weight matrix; what the method does beyond masks (PCB's scores, DELLA's
    keep probabilities, an interpolation's angles, TSV-M's and Iso's singular values); the merged
    delta before / after the method."""
    hidden = gr.update(visible=False)
    try:
        ws, cfg = _setup(v)
        if not v["matrix"]:
            raise UserError("pick a weight matrix")
        shown, apl_pending = view_config(ws, cfg)
        mv = analysis.method_view(ws, shown, v["matrix"])
        entrywise = cfg.family == "pipeline" and cfg.combine not in analysis.SVD_COMBINES
        d = analysis.mask_data(ws, shown, v["matrix"]) if entrywise else None
        merged = analysis.merged_delta(ws, shown, v["matrix"])
    except (*expected(), torch.linalg.LinAlgError) as e:    # an SVD that does not converge (TSV-M, Iso)
        return {"mask_plot": gr.update(value=not_drawn(message(e)), visible=True), "mask_numbers": "",
                "method_plot": hidden, "merged_plot": hidden}
    view = gr.update(value=figures.method_view(mv), visible=True) if mv else hidden
    after = gr.update(value=figures.merged_delta(merged), visible=True) if merged else hidden
    if d is None:
        if mv and mv["kind"] == "svd":
            why = (f"{cfg.method_name} prunes no entry and elects no winner per entry: it merges each matrix through "
                   f"its singular vectors (the method view below).\n\n" + svd_note(mv))
        else:
            why = (f"{cfg.method_name} interpolates the weights themselves: it keeps every entry, none is pruned or "
                   f"combined (the method view below shows what it does)")
        return {"mask_plot": hidden, "mask_numbers": why, "method_plot": view, "merged_plot": after}
    numbers = numbers_markdown(d)
    if apl_pending:
        numbers += f"\n\n_{apl_pending_text(ws, cfg)}: target density shown until then_"
    return {"mask_plot": gr.update(value=figures.masks(d, cfg.method_name, cfg.combine), visible=True),
            "mask_numbers": numbers, "method_plot": view, "merged_plot": after}


def _apl_index(v: dict, ws) -> int:
    i = int(v["heat_model"] or 0)
    return i if 0 <= i < len(ws.access.ft_refs) else 0


def _apl_figure(ws, cfg, i: int, table: dict) -> dict:
    fig = figures.apl_importance(table, ws.access.ft_refs[i], i, cfg.get("apl_gradient_at"))
    dens = ""
    if table.get("density") is not None:
        m = next(m for m in cfg.models if m.model == ws.access.ft_refs[i])
        dens = f"; hover a cell for the density APL gives it at target {m.get('density'):g} (APL λ {cfg.get('apl_lambda'):g})"
    took = f"computed in {table['seconds']:.1f} s" if table["seconds"] else "from the cache"
    note = (f"loss of the fine-tune {table['loss_finetune']:.3f}, of the base {table['loss_base']:.3f}; "
            f"{took}{dens}")
    return {"apl_plot": gr.update(value=fig, visible=True), "apl_note": note}


def apl_map(v: dict) -> dict:
    """The APL importance map of the picked fine-tune: computed on demand (one forward pass per
    module and per block, one backward pass), then cached for the session and on disk."""
    progress = v.get("progress")
    try:
        ws, cfg = _setup(v)
        i = _apl_index(v, ws)

        def tick(step, total, what):
            if progress is not None:
                progress((step, total), desc=f"APL importance of {short(ws.access.ft_refs[i])}: {what}",
                         unit="steps")

        table = ws.apl_map(i, cfg, progress=tick)
    except (*expected(), RuntimeError) as e:
        return {"apl_note": warn(message(e))}
    return _apl_figure(ws, cfg, i, table)


def apl_view(v: dict) -> dict:
    """The map again after a control or the fine-tune picker changed: from the cache only (the
    button computes it). A `prune: apl` config whose importance, or a PCB config whose whole-model
    statistics, are still being computed turn the statistics timer on, so the views follow when
    they are there. It runs last in every chain that redraws the views."""
    try:
        ws, cfg = _setup(v)
    except expected():
        return {}
    out = {"stats_timer": gr.Timer(active=True)} if apl_running(ws, cfg) or pcb_running(ws, cfg) else {}
    try:
        i = _apl_index(v, ws)
        table = ws.apl_map(i, cfg, compute=False)
    except expected():
        return out
    if table is None:
        return {**out, "apl_plot": gr.update(visible=False),
                "apl_note": f"not computed yet for {short(ws.access.ft_refs[i])}: press the button (a few seconds "
                            f"per fine-tune on the demo family)"}
    return {**out, **_apl_figure(ws, cfg, i, table)}


INSPECT_IN = ["state", "block", "module", *CONTROL_KEYS]
HEATMAP_IN = ["state", "heat_metric", "heat_model", *CONTROL_KEYS]
MASKS_IN = ["state", "matrix", *CONTROL_KEYS]
VIEW_IN = ["state", "block", "module", "matrix", "heat_metric", "heat_model", *CONTROL_KEYS]
INSPECT_OUT = ["histogram", "thresholds", "tensor_name", "matrix", "inspect_status"]
HEATMAP_OUT = ["heatmap", "heatmap_note"]
MASKS_OUT = ["mask_plot", "mask_numbers", "method_plot", "merged_plot"]
APL_IN = ["state", "heat_model", *CONTROL_KEYS]
APL_OUT = ["apl_plot", "apl_note"]
APL_VIEW_OUT = [*APL_OUT, "stats_timer"]


def stats_tick(v: dict) -> dict:
    """Every second while the background statistics run: their progress; when they finish, every
    view that waited for them, and the timer stops."""
    state: AppState = v["state"]
    if state.ws is None or not state.ws.loaded:
        return {"stats_timer": gr.Timer(active=False)}
    ws = state.ws
    try:
        cfg = ws.config(controls_of(v))
    except expected():
        cfg = None
    if state.shown_tensor is None:          # the first view is still being drawn: let it have the CPU
        return {}
    if cfg is not None:
        start_statistics(ws, cfg)
    ms = sorted({5.0, cfg.get("dp_outlier_m") if cfg is not None else 5.0})
    progress = [ws.stats_progress(x) for x in ms]
    running = [p for p in progress if p.state == "running"]
    if running:
        return {"stats_status": f"⟳ whole-model statistics {running[0].text()}"}
    if cfg is not None and apl_running(ws, cfg):
        return {"stats_status": f"⟳ {apl_pending_text(ws, cfg)}"}
    pcb = pcb_running(ws, cfg) if cfg is not None else None
    if pcb is not None:
        return {"stats_status": f"⟳ PCB's whole-model statistics {pcb.text()}"}
    out = {"stats_timer": gr.Timer(active=False), "summary": summary_markdown(ws),
           "stats_status": "" if all(p.state == "done" for p in progress)
           else f"whole-model statistics: {', '.join(p.text() for p in progress)}"}
    for view in (inspect, heatmap, masks):
        out.update(view(v))
    return out


def wire(page, triggers: list, after_load: list, check) -> None:
    """`triggers`: the method controls' commit events; `after_load`: events that load models or set
    the controls; `check`: (handler, inputs, outputs) of the controls' check, the first step of
    every chain that redraws the views."""
    quiet = dict(show_progress="hidden", trigger_mode="always_last")
    # The API's endpoints first: gradio names an unnamed event after its function, taking the name
    ev = page.on([page["block"].release, page["module"].input], inspect, INSPECT_IN, INSPECT_OUT,
                 api_name="inspect", **quiet)
    ev = page.then(ev, heatmap, HEATMAP_IN, HEATMAP_OUT, api_name="heatmap", **quiet)
    ev = page.then(ev, masks, MASKS_IN, MASKS_OUT, api_name="masks", **quiet)
    page.then(ev, apl_view, APL_IN, APL_VIEW_OUT, api_visibility="private", **quiet)
    chain(page, page.on(triggers, *check, api_visibility="private", **quiet))
    page.on([page["heat_metric"].input, page["heat_model"].input], heatmap, HEATMAP_IN, HEATMAP_OUT,
            api_visibility="private", **quiet)
    page.on(page["matrix"].input, masks, MASKS_IN, MASKS_OUT, api_visibility="private", **quiet)
    page.on(page["stats_timer"].tick, stats_tick, VIEW_IN,
            ["stats_status", "stats_timer", "summary", *INSPECT_OUT, *HEATMAP_OUT, *MASKS_OUT],
            api_visibility="private", **quiet)
    page.on(page["apl_btn"].click, apl_map, APL_IN, APL_OUT, progress=True, api_name="apl_map",
            concurrency_limit=1, concurrency_id="merge")
    page.on(page["heat_model"].input, apl_view, APL_IN, APL_VIEW_OUT, api_visibility="private", **quiet)
    for ev in after_load:
        chain(page, page.then(ev, *check, show_progress="hidden", api_visibility="private"))


def chain(page, event):
    """After `event`: redraw the views (not as API endpoints)."""
    quiet = dict(show_progress="hidden", api_visibility="private")
    ev = page.then(event, inspect, INSPECT_IN, INSPECT_OUT, **quiet)
    ev = page.then(ev, heatmap, HEATMAP_IN, HEATMAP_OUT, **quiet)
    ev = page.then(ev, masks, MASKS_IN, MASKS_OUT, **quiet)
    return page.then(ev, apl_view, APL_IN, APL_VIEW_OUT, **quiet)
