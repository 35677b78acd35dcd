"""What the Inspect and Score sections show: thresholds, histograms, heatmaps, masks, score bars.

Everything reads a `session.Workspace`'s cached deltas and statistics; nothing re-reads weights,
so a slider move costs a few rank look-ups and one small figure. Pruning and combining are the
pipeline's own functions on the one tensor shown (same seeds, same tie rules), so what is drawn is
what the merge does. Plotly figures only; no gradio.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from .config import MergeConfig
from .methods import band_edges, keep_count, magnitude_mask, random_mask, tensor_generator
from .methods.pcb import clip_abs, pcb_scale
from .methods.ties import elect_sign
from .pipeline import Step, plan_steps, prune_amplify
from .stats import HIST_SAMPLE, sample_flat

HIST_BINS = 80
MASK_SIDE = 256
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
METRICS = {"mean_abs": "mean |δ|", "outlier_pct": "outlier %", "dp_density": "DP density"}


_AXIS = dict(gridcolor="#ebf0f8", linecolor="#ebf0f8", zeroline=False, automargin=True)


def _figure(data: list, **layout) -> go.Figure:
    """A figure built in one go with a plain white look. Plotly's named templates and its
    per-property updates (make_subplots, update_xaxes) cost tens of ms each, most of a slider
    update's budget, so the layout is one dict validated once."""
    for key, value in list(layout.items()):
        if key.startswith(("xaxis", "yaxis")):
            layout[key] = {**_AXIS, **value}
    base = dict(template="none", paper_bgcolor="white", plot_bgcolor="white",
                font=dict(family="Arial, sans-serif", size=12, color="#2a3f5f"))
    return go.Figure(data=data, layout={**base, **layout})


def _np(t: torch.Tensor, digits: int = 3) -> np.ndarray:
    """float32 numpy (rounded): plotly sends numpy arrays as compact base64, lists as slow JSON."""
    return torch.round(t.float() * 10 ** digits).div_(10 ** digits).numpy()


def _top(x: torch.Tensor) -> float:
    """Colour-scale top for skewed maps (PCB weights): the 99th percentile, so the structure of the
    many small values shows instead of one saturated outlier."""
    flat = x.reshape(-1).float()
    if flat.numel() > 1 << 16:
        flat = flat[:: flat.numel() // (1 << 16)]
    return max(float(torch.quantile(flat, 0.99)), 1e-3)


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _short(ref: str) -> str:
    return ref[5:] if ref.startswith("demo:") else ref.rstrip("/").split("/")[-1]


def _setup(ws, cfg, name: str | None = None):
    """(MergeConfig, workspace index per config model, steps for `name`)."""
    cfg = ws.config(cfg)
    idx = ws.align(cfg)
    steps = plan_steps(cfg, name, ws.shape(name), ws.dp_maps(cfg)) if name is not None else None
    return cfg, idx, steps


# ------------------------------------------------------------------------------------ thresholds

def thresholds(ws, cfg, name: str) -> list[dict]:
    """Per fine-tune, how tensor `name` is pruned under `cfg`:
    {"model", "density" (what it is pruned at; DP: the module's), "threshold" (smallest kept |δ|;
    None when nothing is kept, for random pruning or no pruning), "band_edges" (|δ| at the DPA band
    boundaries inside the kept set, largest band first), "band_fractions", "kept", "numel", "prune"}.
    """
    cfg, idx, steps = _setup(ws, cfg, name)
    n = ws.shapes_numel[name]
    out = []
    for i, (j, step, m) in enumerate(zip(idx, steps, cfg.models)):
        row = {"model": m.model, "density": step.density if step.prune else 1.0, "threshold": None,
               "band_edges": [], "band_fractions": [], "kept": n, "numel": n,
               "prune": cfg.prune if step.prune else "none"}
        if step.prune and cfg.prune == "random":
            row["kept"] = int(_uniform(ws, cfg.seed, i, name).lt(step.density).sum()) if step.density < 1 else n
        elif step.prune:
            k = keep_count(step.density, n)
            row["kept"] = k
            row["threshold"] = ws.value_at_rank(name, j, k)
            if cfg.amplify == "dpa":
                edges = band_edges(m.partitions, step.offset)[:-1]
                row["band_fractions"] = edges
                row["band_edges"] = [ws.value_at_rank(name, j, keep_count(f, n)) for f in edges]
        out.append(row)
    return out


def _uniform(ws, seed: int, i: int, name: str) -> torch.Tensor:
    """The uniform draws behind DARE's mask for config model i (CPU generator, as a CPU merge
    draws them): entry kept where draw < density. Cached, so a density change is one compare."""
    return ws.memo(("u", int(seed), i, name), lambda: torch.rand(
        ws.shape(name), generator=tensor_generator(seed, i, name, "cpu")).reshape(-1))


# ------------------------------------------------------------------------------------ histograms

def _log_sample(ws, name: str, j: int) -> torch.Tensor:
    """log10 |δ| of the fixed sample of fine-tune j's tensor (zeros as -inf), cached."""
    def compute():
        return sample_flat(ws.delta(name, j).abs(), HIST_SAMPLE).log10()
    return ws.memo(("log", name, j), compute)


def _bins(ws, name: str, idx: list[int]) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for j in idx:
        s = _log_sample(ws, name, j)
        s = s[torch.isfinite(s)]
        if s.numel():
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    if not math.isfinite(lo):
        return -8.0, 0.0
    return lo, max(hi, lo + 1e-6)


def _hist(logs: torch.Tensor, lo: float, hi: float) -> list[int]:
    logs = logs[torch.isfinite(logs)]
    return torch.histc(logs, bins=HIST_BINS, min=lo, max=hi).round().int().tolist()


def histogram_figure(ws, cfg, name: str, th: list[dict] | None = None) -> go.Figure:
    """|δ| histograms of tensor `name` on a log axis, one step line per fine-tune, with each one's
    keep threshold (dashed) and DPA band edges (dotted). Random pruning: kept and dropped entries
    as separate lines, which lie on top of each other because DARE ignores magnitude.
    `th`: `thresholds(ws, cfg, name)` when the caller already has it (each is a rank look-up)."""
    cfg, idx, steps = _setup(ws, cfg, name)
    th = thresholds(ws, cfg, name) if th is None else th
    lo, hi = _bins(ws, name, idx)
    width = (hi - lo) / HIST_BINS
    x = [10 ** (lo + (b + 0.5) * width) for b in range(HIST_BINS)]
    sample_n = min(ws.shapes_numel[name], HIST_SAMPLE)
    traces, peak = [], 1
    for i, (j, step, row) in enumerate(zip(idx, steps, th)):
        label, color = _short(row["model"]), _color(j)
        logs = _log_sample(ws, name, j)
        if cfg.prune == "random" and step.prune:
            u = _uniform(ws, cfg.seed, i, name)
            keep = sample_flat(u, HIST_SAMPLE) < step.density     # the same entries as `logs`
            for part, mask, dash in (("kept", keep, "solid"), ("dropped", ~keep, "dot")):
                counts = _hist(logs[mask], lo, hi)
                peak = max(peak, max(counts))
                traces.append(go.Scatter(x=x, y=counts, mode="lines", line=dict(shape="hvh", color=color, dash=dash),
                                         name=f"{label} {part} ({100 * row['kept'] / row['numel']:.1f}% kept)"
                                         if part == "kept" else f"{label} dropped", legendgroup=label))
        else:
            counts = _hist(logs, lo, hi)
            peak = max(peak, max(counts))
            traces.append(go.Scatter(x=x, y=counts, mode="lines", line=dict(shape="hvh", color=color),
                                     name=label, legendgroup=label))
    for j, row in zip(idx, th):
        label, color = _short(row["model"]), _color(j)
        if row["threshold"] is not None and row["threshold"] > 0:
            t = row["threshold"]
            traces.append(go.Scatter(x=[t, t], y=[0, peak * 1.05], mode="lines", legendgroup=label,
                                     line=dict(color=color, dash="dash", width=2),
                                     name=f"{label} threshold {t:.3g} (density {row['density']:.3f})"))
        for f, e in zip(row["band_fractions"], row["band_edges"]):
            if e is not None and e > 0:
                traces.append(go.Scatter(x=[e, e], y=[0, peak * 1.05], mode="lines", legendgroup=label,
                                         line=dict(color=color, dash="dot", width=1.5),
                                         name=f"{label} band edge {e:.3g} (top {100 * f:.1f}%)"))
    what = "all entries" if sample_n == ws.shapes_numel[name] else f"a fixed sample of {sample_n:,} of {ws.shapes_numel[name]:,}"
    if cfg.prune == "random":
        key = "solid: kept, dotted: dropped (random drop ignores magnitude)"
    elif cfg.prune == "none":
        key = "no pruning: every entry is kept"
    else:
        key = "dashed: keep threshold" + (", dotted: DPA band edges" if cfg.amplify == "dpa" else "")
    return _figure(traces, title=dict(text=f"|δ| of {name} — {cfg.method_name}<br><sup>{what}; {key}</sup>"),
                  xaxis=dict(title=dict(text="|δ| (log scale)"), type="log"),
                  yaxis=dict(title=dict(text="entries per bin")),
                  legend=dict(font=dict(size=10)), margin=dict(t=70, l=60, r=10, b=50))


# ------------------------------------------------------------------------------------ heatmap

def heatmap_values(ws, cfg, metric: str, model_index: int = 0) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(blocks, module types, values[block][type]) of `metric` for config model `model_index`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    cfg, idx, _ = _setup(ws, cfg)
    if not 0 <= model_index < len(idx):
        raise ValueError(f"model_index {model_index} is out of range: the config has {len(idx)} fine-tunes")
    j, m = idx[model_index], cfg.models[model_index]
    blocks, types = ws.blocks(), ws.module_types(matrices_only=True)
    stats = ws.stats_at(cfg.dp_outlier_m)[j]
    dp = ws.dp_map(j, m.density, cfg.dp_lambda, cfg.dp_outlier_m) if metric == "dp_density" else None
    z = []
    for b in blocks:
        row = []
        for t in types:
            name = ws.module_name(b, t)
            if name is None:
                row.append(None)
            elif metric == "mean_abs":
                row.append(stats.tensors[name].mean_abs)
            elif metric == "outlier_pct":
                row.append(stats.tensors[name].pct_outlier)
            else:
                row.append(dp[name].density if name in dp else None)
        z.append(row)
    return blocks, types, z


def heatmap_figure(ws, cfg, metric: str = "mean_abs", model_index: int = 0) -> go.Figure:
    """Blocks x module types heatmap of mean |δ|, outlier % (above M x mean) or DP density, for
    one fine-tune of the config."""
    cfg = ws.config(cfg)
    blocks, types, z = heatmap_values(ws, cfg, metric, model_index)
    m = cfg.models[model_index]
    fmt = ".3g" if metric == "mean_abs" else ".2f"
    text = [[("" if v is None else format(v, fmt)) for v in row] for row in z]
    sub = {"mean_abs": "mean |δ| per tensor",
           "outlier_pct": f"% of entries above {cfg.dp_outlier_m:g} x the tensor's mean |δ|",
           "dp_density": f"density DP gives each module at target {m.density:g}, λ_dp = {cfg.dp_lambda:g}, "
                         f"M = {cfg.dp_outlier_m:g}"}[metric]
    heat = go.Heatmap(z=z, x=types, y=[str(b) for b in blocks], text=text, texttemplate="%{text}",
                      colorscale="Viridis", colorbar=dict(title=dict(text=METRICS[metric])),
                      hovertemplate="block %{y}, %{x}: %{z:" + fmt + "}<extra></extra>")
    return _figure([heat], title=dict(text=f"{METRICS[metric]} — {_short(m.model)}<br><sup>{sub}</sup>"),
                  xaxis=dict(title=dict(text="module type")),
                  yaxis=dict(title=dict(text="block"), autorange="reversed", type="category"),
                  margin=dict(t=70, l=60, r=10, b=80))


# ------------------------------------------------------------------------------------ masks

def _pool(x: torch.Tensor, side: int = MASK_SIDE) -> torch.Tensor:
    """Mean over cells so the 2-D map is at most side x side (1-D tensors become one row)."""
    x = x.float().reshape(x.shape[0], -1) if x.dim() >= 2 else x.float().reshape(1, -1)
    out = (min(x.shape[0], side), min(x.shape[1], side))
    if out == tuple(x.shape):
        return x
    return F.adaptive_avg_pool2d(x[None, None], out)[0, 0]


def keep_mask(cfg: MergeConfig, i: int, name: str, delta: torch.Tensor, step: Step) -> torch.Tensor:
    """Boolean mask of the entries config model i keeps in tensor `name` (as prune_amplify does)."""
    if not step.prune or step.density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if cfg.prune == "random":
        return random_mask(delta.shape, step.density, tensor_generator(cfg.seed, i, name, delta.device), delta.device)
    return magnitude_mask(delta, step.density)


def combine_maps(ws, cfg, name: str) -> dict:
    """Full-resolution masks of tensor `name`: each model's keep mask, the pruned deltas, and after
    the combine the winner of each entry (largest |contribution|, -1 where all are 0), the sign
    conflicts (some kept entry against the elected sign) and, for PCB, the balancing weights."""
    cfg, idx, steps = _setup(ws, cfg, name)
    masks, pruned = [], []
    for i, (j, step) in enumerate(zip(idx, steps)):
        d = ws.delta(name, j)
        masks.append(keep_mask(cfg, i, name, d, step))
        pruned.append(prune_amplify(cfg, i, name, d, step))
    stacked = torch.stack(pruned)
    n = stacked.shape[0]
    w = torch.tensor([m.weight for m in cfg.models], dtype=torch.float32).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    elected = elect_sign(weighted)
    conflict = ((weighted != 0) & (weighted.sign() != elected)).any(dim=0)
    scale = None
    if cfg.combine == "ties":
        contrib = weighted * (weighted.sign() == elected)
    elif cfg.combine == "pcb":
        flat = stacked.reshape(n, -1)
        a = clip_abs(flat)
        scale = pcb_scale(flat, cfg.pcb_ratio, clipped_abs=a)
        contrib = (w.reshape(n, 1) * torch.sign(flat) * a * scale).view_as(stacked)
        scale = scale.view_as(stacked)
    else:
        contrib = weighted
    mag = contrib.abs()
    winner = torch.where(mag.amax(dim=0) > 0, mag.argmax(dim=0), torch.full_like(mag[0], -1, dtype=torch.long))
    return {"cfg": cfg, "idx": idx, "masks": masks, "pruned": stacked, "winner": winner,
            "conflict": conflict, "pcb_scale": scale}


def mask_figure(ws, cfg, name: str) -> tuple[go.Figure, dict]:
    """Kept masks per fine-tune (downsampled to <= 256 x 256: kept fraction per cell), then which
    fine-tune wins each entry, where signs conflict (TIES) and, for PCB, each one's weights.
    Returns the figure and the numbers: {"kept_pct": {model: %}, "winner_pct": {model: %},
    "no_winner_pct", "conflict_pct", "pcb_mean_weight" ({model: mean} or None), "shape", "cell"}."""
    maps = combine_maps(ws, cfg, name)
    cfg, idx = maps["cfg"], maps["idx"]
    labels = [_short(m.model) for m in cfg.models]
    n = len(labels)
    shape = list(ws.shape(name))
    numel = ws.shapes_numel[name]
    kept_pct = {m.model: 100.0 * float(k.sum()) / numel for m, k in zip(cfg.models, maps["masks"])}
    winner = maps["winner"]
    winner_pct = {m.model: 100.0 * float((winner == i).sum()) / numel for i, m in enumerate(cfg.models)}
    info = {"name": name, "shape": shape, "kept_pct": kept_pct, "winner_pct": winner_pct,
            "no_winner_pct": 100.0 * float((winner < 0).sum()) / numel,
            "conflict_pct": 100.0 * float(maps["conflict"].sum()) / numel,
            "pcb_mean_weight": ({m.model: float(s.mean()) for m, s in zip(cfg.models, maps["pcb_scale"])}
                                if maps["pcb_scale"] is not None else None)}
    pooled_masks = [_pool(k) for k in maps["masks"]]
    info["downsampled_to"] = list(pooled_masks[0].shape)
    rows2d = shape[0] if len(shape) >= 2 else 1
    info["cell"] = [math.ceil(rows2d / info["downsampled_to"][0]), math.ceil(numel / rows2d / info["downsampled_to"][1])]
    # The winner map: per cell, the model that wins most of its entries (none: blank).
    onehot = torch.stack([(winner == i) for i in range(-1, n)]).float()
    share = torch.stack([_pool(o) for o in onehot])
    cell_winner = share.argmax(dim=0).float() - 1
    cell_winner[cell_winner < 0] = float("nan")

    has_pcb = maps["pcb_scale"] is not None
    nrows, cols = (3 if has_pcb else 2), max(n, 2)
    # Discrete colours: model i -> its colour in every other plot.
    scale = []
    for i in range(n):
        scale += [[i / n, _color(idx[i])], [(i + 1) / n, _color(idx[i])]]
    if n == 1:
        scale = [[0, _color(idx[0])], [1, _color(idx[0])]]
    hover = "row %{y}, col %{x}: "
    cells = {}          # (row, col) -> (title, heatmap kwargs)
    for c, (p, lab, m) in enumerate(zip(pooled_masks, labels, cfg.models)):
        cells[(0, c)] = (f"{lab} kept {kept_pct[m.model]:.1f}%",
                         dict(z=_np(p), zmin=0, zmax=1, colorscale="Blues", showscale=c == 0,
                              colorbar=dict(title=dict(text="kept"), len=0.3, y=1, yanchor="top"),
                              hovertemplate=hover + "%{z:.0%} kept<extra></extra>"))
    cells[(1, 0)] = ("winner per entry",
                     dict(z=cell_winner.numpy(), zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=True,
                          colorbar=dict(title=dict(text="winner"), tickvals=list(range(n)), ticktext=labels,
                                        len=0.3, y=1 - 1 / nrows, yanchor="top", x=1.08),
                          hovertemplate=hover + "model %{z}<extra></extra>"))
    cells[(1, 1)] = (f"sign conflicts {info['conflict_pct']:.1f}%",
                     dict(z=_np(_pool(maps["conflict"])), zmin=0, zmax=1, colorscale="Reds", showscale=False,
                          hovertemplate=hover + "%{z:.0%} in conflict<extra></extra>"))
    if has_pcb:
        for c, (sc, lab, m) in enumerate(zip(maps["pcb_scale"], labels, cfg.models)):
            cells[(2, c)] = (f"{lab} PCB weight (mean {info['pcb_mean_weight'][m.model]:.3g})",
                             dict(z=_np(_pool(sc)), zmin=0, zmax=_top(_pool(sc)), colorscale="Greens", showscale=False,
                                  hovertemplate=hover + "weight %{z:.2f}<extra></extra>"))
    # The subplot grid by hand (one layout dict instead of make_subplots + update_*axes).
    hgap, vgap = 0.03, 0.1
    w, h = (1 - hgap * (cols - 1)) / cols, (1 - vgap * (nrows - 1)) / nrows
    traces, layout, notes = [], {}, []
    bottom = {c: max(r for r, cc in cells if cc == c) for _, c in cells}
    for (r, c), (title, kw) in cells.items():
        k = r * cols + c + 1
        sx = sy = "" if k == 1 else str(k)
        x0, y1 = round(c * (w + hgap), 6), round(1 - r * (h + vgap), 6)
        traces.append(go.Heatmap(xaxis=f"x{sx}", yaxis=f"y{sy}", **kw))
        layout[f"xaxis{sx}"] = dict(ticks="", domain=[x0, min(round(x0 + w, 6), 1.0)], anchor=f"y{sy}", showticklabels=False,
                                    showgrid=False, title=dict(text="columns" if r == bottom[c] else ""))
        layout[f"yaxis{sy}"] = dict(ticks="", domain=[max(round(y1 - h, 6), 0.0), y1], anchor=f"x{sx}", autorange="reversed", showticklabels=False,
                                    showgrid=False, title=dict(text="rows" if c == 0 else ""))
        notes.append(dict(text=title, x=x0 + w / 2, y=y1, xref="paper", yref="paper", xanchor="center",
                          yanchor="bottom", showarrow=False, font=dict(size=11)))
    cell = "x".join(str(c) for c in info["cell"])
    fig = _figure(traces, title=dict(text=f"Masks of {name} {shape} — {cfg.method_name}<br><sup>each cell: share of "
                                          f"{cell} entries; row 2: after the {cfg.combine} combine</sup>"),
                  annotations=notes, height=230 * nrows + 90, margin=dict(t=90, l=50, r=90, b=40), **layout)
    return fig, info


# ------------------------------------------------------------------------------------ scores

def _score_rows(rows) -> list[dict]:
    if isinstance(rows, dict):
        return [{"model": k, "scores": v} for k, v in rows.items()]
    return [dict(r) for r in rows]


def scores_figure(rows, metric: str = "smooth") -> go.Figure:
    """Grouped bars per domain (one bar group per domain, one colour per model: merged, base,
    fine-tunes), with each row's geometric-mean objective in its legend entry and in the title.
    `rows`: [{"model": label, "scores": {domain: {"em", "smooth", "loglik", "n"}}, "objective": x|None}]
    or {label: scores}."""
    rows = _score_rows(rows)
    domains = []
    for r in rows:
        for d in r["scores"]:
            if d not in domains:
                domains.append(d)
    bars = []
    for k, r in enumerate(rows):
        y = [r["scores"].get(d, {}).get(metric) for d in domains]
        obj = r.get("objective")
        name = r["model"] + (f" (objective {obj:.3f})" if isinstance(obj, (int, float)) else "")
        bars.append(go.Bar(x=domains, y=y, name=name, marker_color=_color(k),
                           text=[("" if v is None else f"{v:.2f}") for v in y], textposition="outside"))
    objs = [f"{r['model']} {r['objective']:.3f}" for r in rows if isinstance(r.get("objective"), (int, float))]
    sub = ("geometric-mean objective: " + ", ".join(objs)) if objs else "per-domain scores"
    yaxis = {}
    if metric in ("em", "smooth"):
        yaxis["range"] = [0, 1.12]
    yaxis["title"] = dict(text=metric)
    return _figure(bars, title=dict(text=f"{metric} per domain<br><sup>{sub}</sup>"), barmode="group",
                  xaxis=dict(title=dict(text="domain")), yaxis=yaxis, margin=dict(t=70, l=60, r=10, b=50))


# ------------------------------------------------------------------------------------ configs from controls

def make_config(ws, preset: str, *, prune_rate: float = 0.0, weights=None, lambda_: float = 1.0,
                dp_lambda: float = 0.08, dp_outlier_m: float = 5.0, partitions=None, amplification=None,
                pcb_ratio: float = 0.1, seed: int = 0, normalize: bool | None = None) -> dict:
    """A config dict (what `load_config` reads and the CLI runs) from the app's controls.

    `prune_rate` = 1 - density, for every fine-tune. `partitions`: the inner DPA band bounds as
    fractions of all entries (below the density; the density is appended as the last bound);
    `amplification`: one factor per band (missing ones are 1.0), or "auto". Presets without a
    stage ignore its controls.
    """
    from .config import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    prune, amplify, combine = PRESETS[preset]
    density = 1.0 if prune == "none" else round(1.0 - float(prune_rate), 6)
    if prune != "none" and density <= 0:
        raise ValueError("the prune rate must be below 1 (it is 1 - density)")
    weights = list(weights) if weights is not None else [1.0] * len(ws.ft_refs)
    if len(weights) != len(ws.ft_refs):
        raise ValueError(f"{len(weights)} weights for {len(ws.ft_refs)} fine-tunes")
    models = []
    for ref, w in zip(ws.ft_refs, weights):
        p = {"weight": float(w), "density": density}
        if amplify == "dpa":
            inner = sorted(float(f) for f in (partitions or [density / 2]) if 0 < float(f) < density)
            parts = inner + [density]
            if amplification == "auto":
                amp = "auto"
            else:
                amp = [float(a) for a in (amplification or [1.8])][: len(parts)]
                amp += [1.0] * (len(parts) - len(amp))
            p.update(partitions=parts, amplification=amp)
        models.append({"model": ref, "parameters": p})
    params = {"lambda": float(lambda_)}
    if normalize is not None:
        params["normalize"] = bool(normalize)
    if prune == "dp":
        params.update(dp_lambda=float(dp_lambda), dp_outlier_m=float(dp_outlier_m))
    if combine == "pcb":
        params["pcb_ratio"] = float(pcb_ratio)
    return {"merge_method": preset, "base_model": ws.base_ref, "models": models, "parameters": params,
            "seed": int(seed)}
