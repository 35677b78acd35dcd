"""The data behind the Inspect views, for the one tensor on screen: keep thresholds, DPA band
edges, |δ| histograms, the blocks x modules map, and the masks after prune and combine.

Everything is computed by the merge's own stage functions (pipeline.plan_steps / prune_amplify,
the methods' masks, TIES's sign election, PCB's balancing weights) on the deltas a
`workspace.Workspace` reads lazily, with the same seeds and tie rules, so what is drawn is what the
merge does. DP's module densities need the whole-model statistics: until the background pass has
them, the views use the target density and say so (`pending`). Plotly lives in figures.py.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .config import MergeConfig
from .methods import band_edges, keep_count, magnitude_mask, random_mask, tensor_generator
from .methods.pcb import clip_abs, pcb_scale
from .methods.ties import agreement_mask
from .pipeline import Step, plan_steps, prune_amplify
from .stats import HIST_SAMPLE, sample_flat

HIST_BINS = 80
MASK_SIDE = 256
METRICS = {"mean_abs": "mean |δ|", "outlier_pct": "outlier %", "dp_density": "DP density"}


def steps(ws, cfg: MergeConfig, name: str) -> tuple[list[int], list[Step], bool]:
    """(loaded index per config model, each one's Step for `name`, pending). While DP waits for the
    whole-model statistics, its steps use the target density (pending=True)."""
    idx = ws.align(cfg)
    maps = ws.dp_maps(cfg)
    shape = ws.access.shape(name)
    if cfg.prune == "dp" and maps is None:
        provisional = dataclasses.replace(cfg, prune="magnitude")
        return idx, plan_steps(provisional, name, shape, None), True
    return idx, plan_steps(cfg, name, shape, maps), False


# ------------------------------------------------------------------------------------ thresholds

def thresholds(ws, cfg: MergeConfig, name: str) -> list[dict]:
    """Per fine-tune, how `name` is pruned: {"model", "index" (among the loaded), "prune", "density"
    (DP: the module's), "threshold" (smallest kept |δ|; None for random or no pruning), "band_edges"
    (|δ| at the inner DPA band edges, largest band first; None for a band left empty),
    "band_fractions", "kept", "numel", "pending"}."""
    acc = ws.access
    idx, stp, pending = steps(ws, cfg, name)
    n = acc.numel[name]
    out = []
    for i, (j, step, m) in enumerate(zip(idx, stp, cfg.models)):
        row = {"model": m.model, "index": j, "prune": cfg.prune if step.prune else "none",
               "density": step.density if step.prune else 1.0, "threshold": None, "band_edges": [],
               "band_fractions": [], "kept": n, "numel": n, "pending": pending}
        if step.prune and cfg.prune == "random":
            row["kept"] = int(uniform(ws, cfg.seed, i, name).lt(step.density).sum()) if step.density < 1 else n
        elif step.prune:
            k = keep_count(step.density, n)
            row["kept"] = k
            row["threshold"] = acc.value_at_rank(name, j, k)
            if cfg.amplify == "dpa":
                edges = band_edges(m.partitions, step.offset)[:-1]
                row["band_fractions"] = edges
                row["band_edges"] = [acc.value_at_rank(name, j, keep_count(f, n)) for f in edges]
        out.append(row)
    return out


def uniform(ws, seed: int, i: int, name: str) -> torch.Tensor:
    """The uniform draws behind DARE's mask of config model i in `name` (the CPU generator a CPU
    merge uses): an entry is kept where its draw < density. Cached, so a density change is one compare."""
    return ws.access.memo(("u", int(seed), i, name), lambda: torch.rand(
        ws.access.shape(name), generator=tensor_generator(seed, i, name, "cpu")).reshape(-1))


# ------------------------------------------------------------------------------------ histograms

def _log_sample(ws, name: str, j: int) -> torch.Tensor:
    """log10 |δ| of a fixed strided sample of fine-tune j's `name` (zeros as -inf), cached."""
    return ws.access.memo(("log", name, j), lambda: sample_flat(ws.access.delta(name, j).abs(), HIST_SAMPLE).log10())


def histogram(ws, cfg: MergeConfig, name: str, rows: list[dict] | None = None) -> dict:
    """|δ| histograms of `name` on a shared log10 grid: {"centers", "series": [{"model", "index",
    "part" ("all" | "kept" | "dropped"), "counts"}], "rows" (thresholds), "sampled" (entries
    counted), "numel"}. Random pruning splits each fine-tune into its kept and dropped entries."""
    acc = ws.access
    idx, stp, _ = steps(ws, cfg, name)
    rows = thresholds(ws, cfg, name) if rows is None else rows
    samples = [_log_sample(ws, name, j) for j in idx]
    finite = [s[torch.isfinite(s)] for s in samples]
    lo = min((float(s.min()) for s in finite if s.numel()), default=-8.0)
    hi = max((float(s.max()) for s in finite if s.numel()), default=0.0)
    hi = max(hi, lo + 1e-6)
    width = (hi - lo) / HIST_BINS
    centers = [10 ** (lo + (b + 0.5) * width) for b in range(HIST_BINS)]

    def counts(logs):
        logs = logs[torch.isfinite(logs)]
        return torch.histc(logs, bins=HIST_BINS, min=lo, max=hi).round().int().tolist()

    series = []
    for i, (j, step, m, logs) in enumerate(zip(idx, stp, cfg.models, samples)):
        if cfg.prune == "random" and step.prune:
            keep = sample_flat(uniform(ws, cfg.seed, i, name), HIST_SAMPLE) < step.density   # the same entries
            series.append({"model": m.model, "index": j, "part": "kept", "counts": counts(logs[keep])})
            series.append({"model": m.model, "index": j, "part": "dropped", "counts": counts(logs[~keep])})
        else:
            series.append({"model": m.model, "index": j, "part": "all", "counts": counts(logs)})
    return {"name": name, "centers": centers, "series": series, "rows": rows,
            "sampled": min(acc.numel[name], HIST_SAMPLE), "numel": acc.numel[name]}


# ------------------------------------------------------------------------------------ heatmap

def heatmap_values(ws, cfg: MergeConfig, metric: str, model_index: int = 0
                   ) -> tuple[list[int], list[str], list[list[float | None]] | None]:
    """(blocks, module types, values[block][type]) of `metric` for config model `model_index`;
    values None while the whole-model statistics are being computed."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    acc = ws.access
    idx = ws.align(cfg)
    if not 0 <= model_index < len(idx):
        raise ValueError(f"pick a fine-tune of the config (0..{len(idx) - 1}), got {model_index}")
    blocks, types = acc.blocks(), acc.module_types(matrices_only=True)
    full = ws.stats.full(cfg.dp_outlier_m)
    if full is None:
        return blocks, types, None
    j, m = idx[model_index], cfg.models[model_index]
    st = full[j]
    dp = ws._dp_map(full, j, m.density, cfg.dp_lambda, cfg.dp_outlier_m)[0] if metric == "dp_density" else None
    z = []
    for b in blocks:
        row = []
        for t in types:
            name = acc.module_name(b, t)
            if name is None:
                row.append(None)
            elif metric == "mean_abs":
                row.append(st.tensors[name].mean_abs)
            elif metric == "outlier_pct":
                row.append(st.tensors[name].pct_outlier)
            else:
                row.append(dp[name].density if name in dp else None)
        z.append(row)
    return blocks, types, z


# ------------------------------------------------------------------------------------ masks

def pool(x: torch.Tensor, side: int = MASK_SIDE) -> torch.Tensor:
    """Mean over cells so the 2-D map is at most side x side (1-D tensors become one row)."""
    x = x.float().reshape(x.shape[0], -1) if x.dim() >= 2 else x.float().reshape(1, -1)
    out = (min(x.shape[0], side), min(x.shape[1], side))
    if out == tuple(x.shape):
        return x
    return F.adaptive_avg_pool2d(x[None, None], out)[0, 0]


def keep_mask(cfg: MergeConfig, i: int, name: str, delta: torch.Tensor, step: Step) -> torch.Tensor:
    """Boolean mask of the entries config model i keeps in `name` (as prune_amplify prunes)."""
    if not step.prune or step.density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if cfg.prune == "random":
        return random_mask(delta.shape, step.density, tensor_generator(cfg.seed, i, name, delta.device), delta.device)
    return magnitude_mask(delta, step.density)


def combine_maps(ws, cfg: MergeConfig, name: str) -> dict:
    """Full-resolution maps of `name`: each model's keep mask and pruned (amplified) delta, then
    after the combine each entry's winner (largest |contribution|, -1 where all are 0), the sign
    conflicts (a kept entry against the elected sign) and, for PCB, the balancing weights."""
    idx, stp, pending = steps(ws, cfg, name)
    masks, pruned = [], []
    for i, (j, step) in enumerate(zip(idx, stp)):
        d = ws.access.delta(name, j)
        masks.append(keep_mask(cfg, i, name, d, step))
        pruned.append(prune_amplify(cfg, i, name, d, step))
    stacked = torch.stack(pruned)
    n = stacked.shape[0]
    w = torch.tensor([m.weight for m in cfg.models], dtype=torch.float32).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    agree = agreement_mask(weighted)
    conflict = ((weighted != 0) & ~agree).any(dim=0)
    scale = None
    if cfg.combine == "ties":
        contrib = weighted * agree
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
    return {"idx": idx, "masks": masks, "pruned": stacked, "winner": winner, "conflict": conflict,
            "pcb_scale": scale, "pending": pending}


def mask_data(ws, cfg: MergeConfig, name: str) -> dict:
    """What the mask viewer draws, pooled to <= 256 x 256 cells, and its numbers:
    {"name", "shape", "cell", "models", "index", "kept" (pooled kept share per model), "kept_pct",
    "winner" (pooled: the model winning most of each cell's entries, NaN where none), "winner_pct",
    "no_winner_pct", "conflict" (pooled share), "conflict_pct", "pcb" (pooled weights per model or
    None), "pcb_mean_weight", "pending"}."""
    maps = combine_maps(ws, cfg, name)
    shape = list(ws.access.shape(name))
    numel = ws.access.numel[name]
    refs = [m.model for m in cfg.models]
    n = len(refs)
    winner = maps["winner"]
    kept = [pool(k) for k in maps["masks"]]
    onehot = torch.stack([(winner == i) for i in range(-1, n)]).float()
    share = torch.stack([pool(o) for o in onehot])
    cell_winner = share.argmax(dim=0).float() - 1
    cell_winner[cell_winner < 0] = float("nan")
    rows2d = shape[0] if len(shape) >= 2 else 1
    down = list(kept[0].shape)
    return {"name": name, "shape": shape, "models": refs, "index": maps["idx"],
            "cell": [math.ceil(rows2d / down[0]), math.ceil(numel / rows2d / down[1])],
            "kept": kept, "kept_pct": {r: 100.0 * float(k.sum()) / numel for r, k in zip(refs, maps["masks"])},
            "winner": cell_winner, "winner_pct": {r: 100.0 * float((winner == i).sum()) / numel for i, r in enumerate(refs)},
            "no_winner_pct": 100.0 * float((winner < 0).sum()) / numel,
            "conflict": pool(maps["conflict"]), "conflict_pct": 100.0 * float(maps["conflict"].sum()) / numel,
            "pcb": [pool(s) for s in maps["pcb_scale"]] if maps["pcb_scale"] is not None else None,
            "pcb_mean_weight": ({r: float(s.mean()) for r, s in zip(refs, maps["pcb_scale"])}
                                if maps["pcb_scale"] is not None else None),
            "pending": maps["pending"]}
