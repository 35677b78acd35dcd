"""The app's charts, from analysis.py's data (plotly only, no gradio).

One colour per fine-tune everywhere (its index among the loaded models), the merged model in
near-black and the base in grey, so a histogram line, a mask panel and a score bar of the same
model look alike. Legends sit below the plots, where a long list never squeezes the drawing.
Figures are built in one go (one layout dict): plotly's templates and per-property updates cost
tens of milliseconds each, most of a slider update's budget.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#bcbd22", "#7f7f7f"]
MERGED_COLOR, BASE_COLOR = "#111827", "#9ca3af"
_AXIS = dict(gridcolor="#ebf0f8", linecolor="#ebf0f8", zeroline=False, automargin=True)
def legend_below(entries: list[str], width: int = 760) -> tuple[dict, int]:
    """(legend, bottom margin) for a legend under the plot, in the figure's own bottom margin
    (below the x axis title, which it never covers): rows estimated from the entries' lengths."""
    per_row, rows, used = max(width, 200), 1, 0
    for e in entries:
        w = 40 + 6.5 * len(e)
        if used and used + w > per_row:
            rows, used = rows + 1, 0
        used += w
    legend = dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom",
                  font=dict(size=11), tracegroupgap=0)
    return legend, 56 + 21 * rows


def fmt(x, digits: int = 3) -> str:
    """A number for people: `digits` significant digits (0.292, 21.4, 0.00981), whole numbers of
    1000 and more with separators (12,345), never 0.2916666666666667."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def color(index: int) -> str:
    """The colour of the loaded fine-tune with this index."""
    return COLORS[index % len(COLORS)]


def short(ref: str) -> str:
    ref = str(ref)
    return ref.split(":", 1)[1] if ref.startswith("demo:") else ref.rstrip("/").split("/")[-1]


def figure(data: list, **layout) -> go.Figure:
    for key, value in list(layout.items()):
        if key.startswith(("xaxis", "yaxis")):
            layout[key] = {**_AXIS, **value}
    base = dict(template="none", paper_bgcolor="white", plot_bgcolor="white",
                font=dict(family="Arial, sans-serif", size=12, color="#2a3f5f"))
    return go.Figure(data=data, layout={**base, **layout})


def warm_up() -> None:
    """Load what plotly imports on first use (each trace type, the layout's parts, its JSON
    encoder: ~0.3 s on a small machine), so the first view a user waits for does not pay it."""
    fig = figure([go.Scatter(x=[1], y=[1], line=dict(width=1)), go.Bar(x=[1], y=[1]), go.Heatmap(z=[[1]])],
                 title=dict(text="t"), legend=dict(font=dict(size=10)), margin=dict(l=1),
                 xaxis=dict(title=dict(text="x"), type="log"), yaxis=dict(title=dict(text="y")),
                 annotations=[dict(text="a", font=dict(size=10))], shapes=[dict(type="line", x0=0, x1=1, y0=0, y1=1)])
    fig.to_json()


def _np(t: torch.Tensor, digits: int = 3) -> np.ndarray:
    """float32 numpy, rounded: plotly sends numpy arrays as compact base64, lists as slow JSON."""
    return torch.round(t.float() * 10 ** digits).div_(10 ** digits).numpy()


def message(text: str, height: int = 320) -> go.Figure:
    """An empty chart that says why it is empty (statistics still computing, nothing loaded)."""
    return figure([], height=height, xaxis=dict(visible=False), yaxis=dict(visible=False),
                  annotations=[dict(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                                    font=dict(size=14, color="#6b7280"))])


# ------------------------------------------------------------------------------------ histogram

def histogram(data: dict, method: str, prune: str, amplify: str) -> go.Figure:
    """|δ| histograms (analysis.histogram) on a log axis, one line per fine-tune, with its keep
    threshold (dashed) and DPA band edges (dotted) in its colour; under DPA, the kept entries after
    their band's α (a lighter line), so moving α moves that mass."""
    x, rows = data["centers"], {r["model"]: r for r in data["rows"]}
    traces, peak = [], 1
    for s in data["series"]:
        peak = max(peak, max(s["counts"]))
    for s in data["series"]:
        r, c = rows[s["model"]], color(s["index"])
        label = short(s["model"])
        pct = 100 * r["kept"] / max(r["numel"], 1)
        if s["part"] == "dropped":
            traces.append(go.Scatter(x=x, y=s["counts"], mode="lines", line=dict(shape="hvh", color=c, dash="dot"),
                                     name=f"{label} dropped", legendgroup=label, showlegend=False))
            continue
        if s["part"] == "amplified":
            ratio = r.get("mass_ratio")
            name = f"{label} after α ({'×'.join(fmt(a) for a in r.get('alphas', []))})" + (
                f": kept Σ|δ| ×{fmt(ratio)}" if ratio is not None else "")
            traces.append(go.Scatter(x=x, y=s["counts"], mode="lines", name=name, legendgroup=label,
                                     line=dict(shape="hvh", color=c, width=3), opacity=0.45))
            continue
        if s["part"] == "kept":
            name = f"{label}: kept {fmt(pct)}% (solid), dropped (dotted)"
        elif r["threshold"] is not None:
            name = f"{label}: keep |δ| ≥ {fmt(r['threshold'])}, density {fmt(r['density'])}"
        else:
            name = f"{label}: all kept"
        traces.append(go.Scatter(x=x, y=s["counts"], mode="lines", line=dict(shape="hvh", color=c), name=name,
                                 legendgroup=label))
    for r in data["rows"]:
        c, label = color(r["index"]), short(r["model"])
        if r["threshold"] is not None and r["threshold"] > 0:
            t = r["threshold"]
            traces.append(go.Scatter(x=[t, t], y=[0, peak * 1.05], mode="lines", legendgroup=label, showlegend=False,
                                     line=dict(color=c, dash="dash", width=2),
                                     hovertemplate=f"{label}: keep |δ| ≥ {fmt(t)}<extra></extra>"))
        if r.get("upper") is not None and r["upper"] > 0:
            u = r["upper"]
            traces.append(go.Scatter(x=[u, u], y=[0, peak * 1.05], mode="lines", legendgroup=label, showlegend=False,
                                     line=dict(color=c, dash="dashdot", width=2),
                                     hovertemplate=f"{label}: outliers above {fmt(u)} dropped<extra></extra>"))
        for f, e in zip(r["band_fractions"], r["band_edges"]):
            if e is not None and e > 0:
                traces.append(go.Scatter(x=[e, e], y=[0, peak * 1.05], mode="lines", legendgroup=label,
                                         showlegend=False, line=dict(color=c, dash="dot", width=1.5),
                                         hovertemplate=f"{label}: band edge {fmt(e)} (top {fmt(100 * f)}%)<extra></extra>"))
    n, sampled = data["numel"], data["sampled"]
    what = "all entries" if sampled == n else f"a fixed sample of {sampled:,} of {n:,} entries"
    if data.get("pcb_ratio") is not None:
        key = (f"PCB keeps each fine-tune's top {fmt(100 * data['pcb_ratio'])}% of balancing scores, not of |δ| "
               f"(solid: kept, dotted: dropped)")
    elif prune == "random":
        key = "random drop ignores magnitude: kept and dropped overlap"
    elif prune == "none":
        key = f"{method} prunes nothing" + ("" if data.get("sce_select") is not None else ": no thresholds")
    elif prune == "breadcrumbs":
        key = "kept band between dashed (smallest kept) and dash-dot (outliers above dropped)"
    else:
        key = "dashed: keep threshold" + (", dotted: DPA band edges, light: kept after α" if amplify == "dpa" else "")
    if data.get("sce_select") is not None:
        key += (f"; SCE keeps the {fmt(100 * data['sce_select'])}% of entries that vary most across the models "
                f"(solid: kept, dotted: dropped)")
    if any(r.get("pending") for r in data["rows"]):
        key += "; DP densities pending (target density shown)"
    legend, bottom = legend_below([t.name for t in traces if t.showlegend is not False and t.name])
    return figure(traces, title=dict(text=f"|δ| of {data['name']} — {method}<br><sup>{what}; {key}</sup>"),
                  xaxis=dict(title=dict(text="|δ| (log scale)", standoff=6), type="log"),
                  yaxis=dict(title=dict(text="entries per bin")), legend=legend, height=330 + bottom,
                  margin=dict(t=70, l=60, r=10, b=bottom))


# ------------------------------------------------------------------------------------ heatmap

def heatmap(blocks: list[int], types: list[str], z: list[list], metric_label: str, model: str,
            subtitle: str) -> go.Figure:
    fmt = ".2f" if metric_label != "mean |δ|" else ".3g"
    text = [[("" if v is None else format(v, fmt)) for v in row] for row in z]
    heat = go.Heatmap(z=z, x=types, y=[str(b) for b in blocks], text=text, texttemplate="%{text}",
                      colorscale="Viridis", colorbar=dict(title=dict(text=metric_label)),
                      hovertemplate="block %{y}, %{x}: %{z:" + fmt + "}<extra></extra>")
    return figure([heat], title=dict(text=f"{metric_label} — {short(model)}<br><sup>{subtitle}</sup>"),
                  xaxis=dict(title=dict(text="module type")),
                  yaxis=dict(title=dict(text="block"), autorange="reversed", type="category"),
                  height=max(320, 26 * len(blocks) + 160), margin=dict(t=70, l=60, r=10, b=80))


# ------------------------------------------------------------------------------------ APL

def _module_labels(modules: list[str]) -> list[str]:
    """Module types by their last part (q_proj, down_proj) when that is unambiguous."""
    tails = [m.rsplit(".", 1)[-1] for m in modules]
    return tails if len(set(tails)) == len(tails) else list(modules)


def apl_importance(table: dict, model: str, index: int, gradient_at: str = "midpoint") -> go.Figure:
    """apl.importance_table as three panels: the exact intervention per (block, module), its
    gradient approximation on the same diverging scale (red: the loss rises without that delta),
    and per block the exact value (the whole block's delta removed) beside the gradient's sum."""
    blocks = [str(b) for b in table["blocks"]]
    mods = _module_labels(table["modules"])
    exact, grad = table["exact"], table["gradient"]
    values = [abs(v) for grid in (exact, grad) for row in grid for v in row if v is not None]
    top = max(values, default=1.0) or 1.0
    dens = table.get("density")

    def cells(grid):
        return [[("" if v is None else format(v, ".2g")) for v in row] for row in grid]

    scale = dict(colorscale="RdBu", reversescale=True, zmid=0, zmin=-top, zmax=top)
    hover_d = "; APL keeps %{customdata:.3f}" if dens is not None else ""
    heat_e = go.Heatmap(z=exact, x=mods, y=blocks, text=cells(exact), texttemplate="%{text}", customdata=dens,
                        textfont=dict(size=10), xaxis="x", yaxis="y", showscale=False, **scale,
                        hovertemplate="block %{y}, %{x}: exact ΔL %{z:.4g}" + hover_d + "<extra></extra>")
    heat_g = go.Heatmap(z=grad, x=mods, y=blocks, text=cells(grad), texttemplate="%{text}", xaxis="x2", yaxis="y2",
                        textfont=dict(size=10), colorbar=dict(title=dict(text="ΔL"), x=0.745, xanchor="left",
                                                              thickness=10, len=0.9), **scale,
                        hovertemplate="block %{y}, %{x}: gradient −δ·∇L %{z:.4g}<extra></extra>")
    c = color(index)
    bar_e = go.Bar(y=blocks, x=table["block_exact"], orientation="h", name="exact: the block's delta removed",
                   marker_color=c, xaxis="x3", yaxis="y3", showlegend=False,
                   hovertemplate="block %{y}: exact (its whole delta removed) %{x:.4g}<extra></extra>")
    bar_g = go.Bar(y=blocks, x=table["block_gradient"], orientation="h", name="gradient: sum over its modules",
                   marker=dict(color=c, opacity=0.4), xaxis="x3", yaxis="y3", showlegend=False,
                   hovertemplate="block %{y}: gradient (sum over its modules) %{x:.4g}<extra></extra>")
    ycat = dict(type="category", autorange="reversed", showgrid=False)
    layout = dict(
        xaxis=dict(domain=[0, 0.355], title=dict(text="exact intervention"), tickangle=-40, showgrid=False),
        yaxis=dict(title=dict(text="block"), anchor="x", **ycat),
        xaxis2=dict(domain=[0.385, 0.74], title=dict(text=f"gradient at the {gradient_at}"), tickangle=-40,
                    showgrid=False),
        yaxis2=dict(anchor="x2", showticklabels=False, ticks="", **ycat),
        xaxis3=dict(domain=[0.84, 1.0], title=dict(text="per block<br>dark: exact · light: gradient", font=dict(size=11)),
                    zeroline=True, zerolinecolor="#9ca3af"),
        yaxis3=dict(anchor="x3", showticklabels=False, ticks="", **ycat))
    what = (f"loss rise on {table['examples']} examples ({table['data']}) when a delta is removed; "
            f"the whole delta: {table['model_exact']:+.3g}")
    return figure([heat_e, heat_g, bar_e, bar_g],
                  title=dict(text=f"APL importance — {short(model)}<br><sup>{what}</sup>"), barmode="group",
                  height=max(340, 34 * len(blocks) + 230), margin=dict(t=70, l=60, r=10, b=40), **layout)


# ------------------------------------------------------------------------------------ masks

def _top(x: torch.Tensor) -> float:
    """Colour-scale top for skewed maps (PCB weights): the 99th percentile."""
    flat = x.reshape(-1).float()
    if flat.numel() > 1 << 16:
        flat = flat[:: flat.numel() // (1 << 16)]
    return max(float(torch.quantile(flat, 0.99)), 1e-3)


def masks(d: dict, method: str, combine: str) -> go.Figure:
    """analysis.mask_data as panels: row 1 each fine-tune's kept share per cell; row 2 the winner
    per cell and the sign conflicts; row 3 (PCB) each fine-tune's balancing weights."""
    labels = [short(r) for r in d["models"]]
    n = len(labels)
    has_pcb = d["pcb"] is not None
    nrows, cols = (3 if has_pcb else 2), max(n, 2)
    scale = []
    for i, j in enumerate(d["index"]):
        scale += [[i / n, color(j)], [(i + 1) / n, color(j)]]
    if n == 1:
        scale = [[0, color(d["index"][0])], [1, color(d["index"][0])]]
    hover = "row %{y}, col %{x}: "
    cells = {}
    for c, (k, lab, ref) in enumerate(zip(d["kept"], labels, d["models"])):
        cells[(0, c)] = (f"{lab}: {fmt(d['kept_pct'][ref])}%",
                         dict(z=_np(k), zmin=0, zmax=1, colorscale=[[0, "#ffffff"], [1, color(d["index"][c])]],
                              showscale=False, hovertemplate=hover + "%{z:.0%} kept<extra></extra>"))
    cells[(1, 0)] = ("winner per cell", dict(z=d["winner"].numpy(), zmin=-0.5, zmax=n - 0.5, colorscale=scale,
                                             showscale=False, hovertemplate=hover + "model %{z}<extra></extra>"))
    # near-black: no fine-tune's colour (a red panel would read as the red fine-tune's)
    cells[(1, 1)] = (f"sign conflicts {fmt(d['conflict_pct'])}%",
                     dict(z=_np(d["conflict"]), zmin=0, zmax=1, colorscale=[[0, "#ffffff"], [1, MERGED_COLOR]],
                          showscale=False, hovertemplate=hover + "%{z:.0%} in conflict<extra></extra>"))
    if has_pcb:
        for c, (sc, lab, ref) in enumerate(zip(d["pcb"], labels, d["models"])):
            cells[(2, c)] = (f"{lab}: w̄ {fmt(d['pcb_mean_weight'][ref])}",
                             dict(z=_np(sc), zmin=0, zmax=_top(sc), colorscale=[[0, "#ffffff"], [1, color(d["index"][c])]],
                                  showscale=False, hovertemplate=hover + "mean weight %{z:.2f}<extra></extra>"))
    hgap, vgap = 0.04, 0.16
    w, h = (1 - hgap * (cols - 1)) / cols, (1 - vgap * (nrows - 1)) / nrows
    traces, layout, notes = [], {}, []
    for (r, c), (title, kw) in cells.items():
        k = r * cols + c + 1
        sx = sy = "" if k == 1 else str(k)
        x0, y1 = round(c * (w + hgap), 6), round(1 - r * (h + vgap), 6)
        traces.append(go.Heatmap(xaxis=f"x{sx}", yaxis=f"y{sy}", **kw))
        layout[f"xaxis{sx}"] = dict(ticks="", domain=[x0, min(round(x0 + w, 6), 1.0)], anchor=f"y{sy}",
                                    showticklabels=False, showgrid=False)
        layout[f"yaxis{sy}"] = dict(ticks="", domain=[max(round(y1 - h, 6), 0.0), y1], anchor=f"x{sx}",
                                    autorange="reversed", showticklabels=False, showgrid=False)
        notes.append(dict(text=title, x=x0 + w / 2, y=y1 + 0.01, xref="paper", yref="paper", xanchor="center",
                          yanchor="bottom", showarrow=False, font=dict(size=11 if cols <= 3 else 10)))
    legend = " · ".join(f"<span style='color:{color(j)}'>■</span> {lab}" for j, lab in zip(d["index"], labels))
    cell = "×".join(str(c) for c in d["cell"])
    pending = " (DP densities pending: target density shown)" if d.get("pending") else ""
    rows = f"row 1: what each keeps{' (PCB: its top ' + fmt(100 * d['pcb_ratio']) + '% of scores)' if has_pcb else ''}; " \
           f"row 2: after the {combine} combine" + ("; row 3: PCB's weights (w̄: mean of the kept)" if has_pcb else "")
    # a top margin that holds the three title lines above the panels' titles (they crossed at five fine-tunes)
    fig = figure(traces, title=dict(text=f"Masks of {d['name']} {d['shape']} — {method}{pending}<br><sup>each cell: "
                                         f"share of its {cell} entries; {rows}<br>{legend}</sup>"),
                 annotations=notes, height=210 * nrows + 170, margin=dict(t=150, l=20, r=20, b=20), **layout)
    return fig


# ------------------------------------------------------------------------------------ scores

def scores(rows: list[dict], metric: str = "smooth", *, axis: str = "domain", title: str | None = None,
           y_title: str | None = None) -> go.Figure:
    """Grouped bars per domain (or lm-eval task: `axis`), one bar per model in its colour. rows:
    [{"label", "color", "scores": {domain: {...}}, "objective": x | None}]. Only the merged model's
    bars carry numbers (hover shows every bar's), so labels never overlap."""
    domains = []
    for r in rows:
        for d in r["scores"]:
            if d not in domains:
                domains.append(d)
    bars, values = [], []
    for r in rows:
        y = [r["scores"].get(d, {}).get(metric) for d in domains]
        values += [v for v in y if v is not None]
        obj = r.get("objective")
        name = r["label"] + (f" (objective {obj:.3f})" if isinstance(obj, (int, float)) else "")
        merged = r.get("merged", False)
        bars.append(go.Bar(x=domains, y=y, name=name, marker_color=r["color"],
                           text=[("" if v is None else f"{v:.2f}") for v in y] if merged else None,
                           textposition="outside", cliponaxis=False,
                           hovertemplate=f"{r['label']}, %{{x}}: %{{y:.3f}}<extra></extra>"))
    yaxis = {"title": dict(text=y_title or metric)}
    if metric in ("em", "smooth") or (values and all(0 <= v <= 1 for v in values)):
        yaxis["range"] = [0, 1.15]
    legend, bottom = legend_below([b.name for b in bars])
    return figure(bars, title=dict(text=f"{title or f'{metric} per {axis}'}<br><sup>merged model's value on its bar; "
                                        f"hover for the others</sup>"), barmode="group",
                  xaxis=dict(title=dict(text=axis, standoff=6)), yaxis=yaxis, legend=legend, height=340 + bottom,
                  margin=dict(t=70, l=60, r=10, b=bottom))


def layer_curves(curves: list[tuple[str, list]], n_layers: int, title: str = "per-layer values") -> go.Figure:
    """Values over the layers, one line per (parameter, filter): what a gradient editor draws."""
    if not curves:
        return message("no per-layer values: add a row (parameter, filter, values)", height=260)
    x = list(range(n_layers))
    lines = [go.Scatter(x=x, y=[None if v is None else float(v) for v in ys], mode="lines+markers", name=label,
                        line=dict(color=COLORS[k % len(COLORS)])) for k, (label, ys) in enumerate(curves)]
    legend, bottom = legend_below([ln.name for ln in lines], width=300)
    return figure(lines, title=dict(text=title),
                  xaxis=dict(title=dict(text="layer", standoff=6), dtick=1 if n_layers <= 32 else None),
                  yaxis=dict(title=dict(text="value")), legend=legend, height=220 + bottom,
                  margin=dict(t=40, l=60, r=10, b=bottom))


def objective_curve(values: list[float], best: list[float], title: str) -> go.Figure:
    """An objective per evaluation with the best so far (searches)."""
    x = list(range(1, len(values) + 1))
    legend, bottom = legend_below(["evaluation", "best so far"])
    return figure([go.Scatter(x=x, y=values, mode="markers", name="evaluation", marker=dict(color=COLORS[0])),
                   go.Scatter(x=x, y=best, mode="lines", name="best so far", line=dict(color=MERGED_COLOR))],
                  title=dict(text=title), xaxis=dict(title=dict(text="evaluation", standoff=6)),
                  yaxis=dict(title=dict(text="objective")), legend=legend, height=250 + bottom,
                  margin=dict(t=50, l=60, r=10, b=bottom))


_DELLA_RESCALE = {"l1": "kept entries rescaled so each delta keeps its L1 norm",
                  "paper": "each kept entry divided by its p", "none": "kept entries keep their values"}


def merged_delta(d: dict) -> go.Figure:
    """analysis.merged_delta: |merged δ| of the tensor under the method beside task arithmetic's."""
    nz0, nz1 = d["nonzero"]
    traces = [go.Scatter(x=d["centers"], y=d["before"], mode="lines", line=dict(shape="hvh", color=BASE_COLOR, width=2),
                         name=f"task arithmetic λ Σ wᵢδᵢ: {fmt(100 * nz0)}% non-zero"),
              go.Scatter(x=d["centers"], y=d["after"], mode="lines", line=dict(shape="hvh", color=MERGED_COLOR),
                         name=f"{d['method']}: {fmt(100 * nz1)}% non-zero")]
    ratio = "" if d["norm_ratio"] is None else f"; ‖{d['method']}‖ / ‖task arithmetic‖ = {fmt(d['norm_ratio'])}"
    legend, bottom = legend_below([t.name for t in traces])
    return figure(traces, title=dict(text=f"Merged δ of {d['name']}: before / after {d['method']}<br><sup>the same "
                                          f"models, weights and λ {fmt(d['lambda'])}{ratio}</sup>"),
                  xaxis=dict(title=dict(text="|merged δ| (log scale)", standoff=6), type="log"),
                  yaxis=dict(title=dict(text="entries per bin")), legend=legend, height=300 + bottom,
                  margin=dict(t=70, l=60, r=10, b=bottom))


def _pcb_scores(d: dict) -> go.Figure:
    traces = []
    peak = max((max(r["counts"]) for r in d["series"]), default=1)
    for r in d["series"]:
        lab, c, cut = short(r["model"]), color(r["index"]), r["cut"]
        traces.append(go.Scatter(x=d["centers"], y=r["counts"], mode="lines", line=dict(shape="hvh", color=c),
                                 name=f"{lab}: cut {fmt(cut)}, keeps {fmt(100 * r['kept'] / max(r['numel'], 1))}% "
                                      f"({fmt(100 * r['not_positive'])}% score ≤ 0)", legendgroup=lab))
        if cut > 0:
            traces.append(go.Scatter(x=[cut, cut], y=[0, peak * 1.05], mode="lines", legendgroup=lab, showlegend=False,
                                     line=dict(color=c, dash="dash", width=2),
                                     hovertemplate=f"{lab}: weights above {fmt(cut)}<extra></extra>"))
    scope = "; scope: model (the merge balances over the whole model; shown: this tensor alone)" \
        if d.get("scope") == "model" else ""
    legend, bottom = legend_below([t.name for t in traces if t.showlegend is not False])
    return figure(traces, title=dict(text=f"PCB's balancing scores in {d['name']}<br><sup>score = intra × inter "
                                          f"balancing; each fine-tune keeps its top {fmt(100 * d['ratio'])}% (dashed: "
                                          f"its cut), weighted by the min-max of the scores above it{scope}</sup>"),
                  xaxis=dict(title=dict(text="score > 0 (log scale)", standoff=6), type="log"),
                  yaxis=dict(title=dict(text="entries per bin")), legend=legend,
                  height=300 + bottom, margin=dict(t=70, l=60, r=10, b=bottom))


def _positive(s: torch.Tensor) -> list:
    """Singular values for a log axis: those below 1e-5 of the largest (float32 rounding of a 0)
    left out."""
    top = float(s.max()) if s.numel() else 0.0
    return [float(x) if x > 1e-5 * top else None for x in s.tolist()]


def _svd_spectra(d: dict) -> go.Figure:
    """analysis.svd_view: each fine-tune's singular values beside the merged delta's and task
    arithmetic's (left, log scale), and the share of each fine-tune's delta energy in the merged
    delta's top-k subspace beside the share in task arithmetic's (right)."""
    x = list(range(1, d["rank"] + 1))
    what = "wᵢδᵢ" if d["combine"] == "tsv_m" else "δᵢ"
    traces = [go.Scatter(x=x, y=_positive(s), mode="lines", name=f"{short(ref)}: σ of its {what}",
                         line=dict(color=color(j)), legendgroup=short(ref))
              for ref, j, s in zip(d["models"], d["index"], d["spectra"])]
    traces += [go.Scatter(x=x, y=_positive(d["task_sum"]), mode="lines", name="task arithmetic Σ wᵢδᵢ",
                          line=dict(color=BASE_COLOR, dash="dash")),
               go.Scatter(x=x, y=_positive(d["merged"]), mode="lines", name=f"{d['method']}: merged M (before λ)",
                          line=dict(color=MERGED_COLOR, width=2.5))]
    vals = [v for t in traces for v in t.y if v is not None]
    lo, hi = (min(vals), max(vals)) if vals else (1e-6, 1.0)
    marks = [(d["k_merged"], f"merged subspace: M's top {d['k_merged']} (95 % of ‖M‖)", MERGED_COLOR, "dot")]
    if d["combine"] == "tsv_m":
        marks.append((d["k_task"], f"TSV-M: each task's top {d['k_task']} = ⌊{d['rank']}/{len(d['models'])}⌋",
                      "#6b7280", "dash"))
    if d["combine"] == "iso_cts":
        marks.append((d["common"], f"Iso-CTS: common {d['common']} + {d['specific']} per task", "#6b7280", "dash"))
    traces += [go.Scatter(x=[k, k], y=[lo, hi], mode="lines", name=label, line=dict(color=c, dash=dash, width=1.5),
                          hovertemplate=f"{label}<extra></extra>") for k, label, c, dash in marks if k]
    names = [short(r) for r in d["models"]]
    traces += [go.Bar(x=names, y=[100 * v for v in d["kept"]], name=f"share of δᵢ in M's top {d['k_merged']}",
                      marker=dict(color=[color(j) for j in d["index"]]), xaxis="x2", yaxis="y2",
                      text=[fmt(100 * v) for v in d["kept"]], textposition="outside", cliponaxis=False,
                      hovertemplate="%{x}: %{y:.1f}% in the merged subspace<extra></extra>"),
               go.Bar(x=names, y=[100 * v for v in d["kept_sum"]], marker=dict(color=BASE_COLOR), xaxis="x2",
                      yaxis="y2", name=f"share of δᵢ in task arithmetic's top {d['k_sum']}",
                      hovertemplate="%{x}: %{y:.1f}% in task arithmetic's subspace<extra></extra>")]
    legend, bottom = legend_below([t.name for t in traces if t.showlegend is not False])
    return figure(traces, title=dict(text=f"{d['method']}: singular values in {d['name']} {d['shape']}<br><sup>left: "
                                          f"each spectrum (log scale); right: how much of each fine-tune's delta the "
                                          f"merged subspace holds (defined above)</sup>"),
                  xaxis=dict(title=dict(text="singular value index", standoff=6), domain=[0, 0.6]),
                  yaxis=dict(title=dict(text="singular value"), type="log"),
                  xaxis2=dict(domain=[0.7, 1], anchor="y2"),
                  yaxis2=dict(title=dict(text="% of ‖δᵢ‖²"), anchor="x2", range=[0, 115]),
                  barmode="group", legend=legend, height=340 + bottom, margin=dict(t=70, l=60, r=10, b=bottom))


def method_view(d: dict) -> go.Figure:
    """analysis.method_view: PCB's balancing scores with each fine-tune's cut, DELLA's keep
    probability by |δ| rank, an interpolation's angle between the base and each model per layer
    (with slerp's t over the layers), or TSV-M's / Iso's singular values and kept shares."""
    if d["kind"] == "pcb":
        return _pcb_scores(d)
    if d["kind"] == "svd":
        return _svd_spectra(d)
    if d["kind"] == "della":
        lines = []
        for ref, j, curve in d["curves"]:
            if curve is None:
                continue
            x = [k / max(len(curve) - 1, 1) for k in range(len(curve))]
            lines.append(go.Scatter(x=x, y=curve, mode="lines", name=short(ref), line=dict(color=color(j))))
        legend, bottom = legend_below([ln.name for ln in lines])
        return figure(lines, title=dict(text=f"DELLA: keep probability by |δ| rank in a row of {d['name']}<br><sup>"
                                             f"rank 0 = the row's smallest |δ|, 1 = its largest ({d['cols']} per row); "
                                             f"{_DELLA_RESCALE.get(d.get('rescale'), '')}</sup>"),
                      xaxis=dict(title=dict(text="|δ| rank within its row", standoff=6)),
                      yaxis=dict(title=dict(text="keep probability"), rangemode="tozero"),
                      legend=legend, height=300 + bottom, margin=dict(t=70, l=60, r=10, b=bottom))
    traces = [go.Scatter(x=d["blocks"], y=angles, mode="lines+markers", name=f"{short(ref)}: angle to the base",
                         line=dict(color=color(j))) for ref, j, angles in d["angles"]]
    layout = {}
    if d["t"] is not None:
        traces.append(go.Scatter(x=d["blocks"], y=d["t"], mode="lines", name="t over the layers", yaxis="y2",
                                 line=dict(color=MERGED_COLOR, dash="dash")))
        layout["yaxis2"] = dict(title=dict(text="t"), overlaying="y", side="right", range=[0, 1], showgrid=False)
    legend, bottom = legend_below([t.name for t in traces])
    return figure(traces, title=dict(text=f"{d['method']}: the {d['module']} weights of each model against the base's"
                                          f"<br><sup>degrees between the flattened tensors per layer (slerp walks this "
                                          f"arc; near 0 it equals linear interpolation)</sup>"),
                  xaxis=dict(title=dict(text="layer", standoff=6), dtick=1),
                  yaxis=dict(title=dict(text="angle (degrees)"), rangemode="tozero"),
                  legend=legend, height=310 + bottom, margin=dict(t=70, l=60, r=50, b=bottom), **layout)
