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

from . import params as P
from .config import MergeConfig
from .methods import band_edges, breadcrumbs_counts, della_curve, keep_count, tensor_generator
from .methods.dpa import band_factors
from .methods.iso import iso_cts_factors, iso_cts_split, task_sum
from .methods.pcb import balancing
from .methods.sce import sce_select_mask
from .methods.tsv_m import orthogonalize, tsv_factors, tsv_rank
from .pipeline import Step, combine, contributions, plan_steps, prune_amplify
from .stats import HIST_SAMPLE, sample_flat
from .interpolations.slerp import slerp_dot
from .workspace.access import module_type

HIST_BINS = 80
MASK_SIDE = 256
METRICS = {"mean_abs": "mean |δ|", "outlier_pct": "outlier %", "dp_density": "DP density"}


def fine_tunes(cfg: MergeConfig) -> MergeConfig:
    """The config with only its fine-tunes as models: an interpolation may list the base as one
    more input, which has no delta to show (Workspace.align leaves it out the same way)."""
    if cfg.family == "pipeline" or all(m.model != cfg.base_model for m in cfg.models):
        return cfg
    return dataclasses.replace(cfg, models=[m for m in cfg.models if m.model != cfg.base_model])


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
    (DP: the module's), "threshold" (smallest kept |δ|; None for random or no pruning), "upper"
    (breadcrumbs: the largest kept |δ|, above which the gamma outliers are dropped), "band_edges"
    (|δ| at the inner DPA band edges, largest band first; None for a band left empty),
    "band_fractions", "kept", "numel", "pending"}; with SCE's select also "kept_mask" (flat bool: kept
    after prune and select) and "sce_select" (select_topk)."""
    cfg = fine_tunes(cfg)
    acc = ws.access
    idx, stp, pending = steps(ws, cfg, name)
    n = acc.numel[name]
    out = []
    for i, (j, step, m) in enumerate(zip(idx, stp, cfg.models)):
        row = {"model": m.model, "index": j, "prune": cfg.prune if step.prune else "none",
               "density": step.density if step.prune else 1.0, "threshold": None, "upper": None, "band_edges": [],
               "band_fractions": [], "kept": n, "numel": n, "pending": pending}
        if step.prune and random_drop(cfg):
            row["kept"] = int(random_keep(ws, cfg, i, name, step).sum())
        elif step.prune and cfg.prune == "breadcrumbs":    # a band: below the gamma outliers, above the rest
            gamma = cfg.for_tensor(name).models[i].get("gamma")
            top, kept, _ = breadcrumbs_counts(n, step.density, gamma)
            row["kept"] = kept
            if kept:
                row["upper"] = acc.value_at_rank(name, j, top + 1)
                row["threshold"] = acc.value_at_rank(name, j, top + kept)
        elif step.prune and step.rows is not None:        # APL's rows: each at its own density, no one threshold
            cols = n // acc.shape(name)[0]
            row["kept"] = sum(keep_count(float(d), cols) for d in step.rows)
        elif step.prune:
            k = keep_count(step.density, n)
            row["kept"] = k
            row["threshold"] = acc.value_at_rank(name, j, k)
            if cfg.amplify == "dpa":
                edges = band_edges(m.get("partitions"), step.offset)[:-1]
                row["band_fractions"] = edges
                row["band_edges"] = [acc.value_at_rank(name, j, keep_count(f, n)) for f in edges]
        out.append(row)
    topk = sce_topk(cfg, name)
    if topk is not None:      # SCE's select drops more, the same entries for every model
        pruned = pruned_deltas(ws, cfg, name)
        selected = sce_select_mask(pruned, topk).reshape(-1) != 0
        for row, d in zip(out, pruned):
            row["kept_mask"] = (d.reshape(-1) != 0) & selected      # what histogram splits by
            row["kept"] = int(row["kept_mask"].sum())
            row["sce_select"] = topk
    pcb = pcb_parts(ws, cfg, name)
    if pcb is not None:       # PCB drops in its combine: an entry whose balancing weight is 0 adds nothing
        for i, row in enumerate(out):
            row["kept_mask"] = pcb["scale"][i] > 0
            row["kept"] = int(row["kept_mask"].sum())
            row["pcb_ratio"], row["pcb_cut"] = pcb["ratio"], float(pcb["cut"][i])
    if cfg.amplify == "dpa":  # the kept |δ| mass before and after each band's α
        view = cfg.for_tensor(name)
        fast = ranked_bands(cfg, view, stp)
        if not fast:
            before, after = amplified_deltas(ws, cfg, name)
        for i, row in enumerate(out):
            m = view.models[i]
            row["alphas"] = list(m.get("amplification"))
            if fast:
                row["factors"] = band_factors(m.get("amplification"), view.get("dpa_bands"))
                k = row["kept"]
                row["band_ranks"] = ends = [min(keep_count(f, n), k) for f in row["band_fractions"]] + [k]
                top = [acc.top_mass(name, row["index"], e) for e in ends]
                mass = top[-1]
                amplified = sum(f * (hi - lo) for f, lo, hi in zip(row["factors"], [0.0, *top[:-1]], top))
            else:
                mass, amplified = float(before[i].abs().sum()), float(after[i].abs().sum())
            row["mass_ratio"] = amplified / mass if mass > 0 else None
    return out


def ranked_bands(cfg: MergeConfig, view: MergeConfig, stp: list[Step]) -> bool:
    """Whether DPA's bands on `view` are ranks of |δ| among what a plain magnitude prune keeps (the
    magnitude and DP prunes without a rescale, every fine-tune pruned at one density): then the
    views read its kept and amplified mass and distribution off the sorted |δ| (access.top_mass,
    the thresholds' band edges) instead of pruning and amplifying every fine-tune's tensor."""
    return (cfg.amplify == "dpa" and cfg.prune in ("magnitude", "dp")
            and all(s.prune and s.rows is None for s in stp)
            and all(m.get("rescale") == "none" for m in view.models))


def amplified_deltas(ws, cfg: MergeConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(before, after): each config model's delta of `name` after the prune alone, and after the
    prune and DPA's bands (what the combine receives), both by the pipeline's own stages."""
    return (pruned_deltas(ws, dataclasses.replace(cfg, amplify="none"), name), pruned_deltas(ws, cfg, name))


def amplified_samples(ws, cfg: MergeConfig, name: str, rows: list[dict],
                      samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """log10 |δ| of the histogram's sample of each fine-tune after the prune and DPA's bands (α can
    carry the kept entries past the largest |δ|; dropped ones are -inf). Where the bands are ranks
    (`thresholds` gave each row its "band_ranks": ranked_bands), each sampled entry's band is read
    off the cuts of the whole tensor's ranks (access.top_cut, ties included), without pruning it;
    otherwise from the pipeline's tensors."""
    if not all("band_ranks" in row for row in rows):
        return [sample_flat(d.reshape(-1), HIST_SAMPLE).abs().log10() for d in amplified_deltas(ws, cfg, name)[1]]
    acc, out = ws.access, []
    n = acc.numel[name]
    at = sample_flat(torch.arange(n), HIST_SAMPLE)          # the flat index of each sampled entry
    for row, logs in zip(rows, samples):
        a = sample_flat(acc.delta(name, row["index"]), HIST_SAMPLE).abs()
        shift = torch.full_like(logs, -math.inf)
        for r, f in reversed(list(zip(row["band_ranks"], row["factors"]))):   # narrower bands overwrite
            cut = acc.top_cut(name, row["index"], r)
            if cut is not None:
                x, p = cut
                shift[(a > x) | ((a == x) & (at < p))] = math.log10(abs(f)) if f != 0 else -math.inf
        out.append(logs + shift)
    return out


def pcb_parts(ws, cfg: MergeConfig, name: str) -> dict | None:
    """PCB's combine on `name` as the merge computes it (pcb.score_and_cut on the pruned deltas,
    clipped as configured, with the whole model's statistics at scope model): {"score" (n, d)
    balancing scores, "cut" (n,) each row's score at the cut, "scale" (n, d) the weights (0 below
    the cut), "clipped", "ratio", "scope"}; None unless the combine is pcb."""
    if cfg.combine != "pcb":
        return None
    pruned = pruned_deltas(ws, cfg, name)
    parts = balancing(pruned.reshape(pruned.shape[0], -1), fine_tunes(cfg).for_tensor(name), pcb_stats(ws, cfg))
    return {**parts, "scope": cfg.get("pcb_scope")}


PCB_WAIT = 2.0         # seconds a view waits for PCB's whole-model statistics before it says "computing"


def pcb_stats(ws, cfg: MergeConfig):
    """The whole model's PCB statistics the merge uses for `cfg` (None: scope tensor, or not PCB);
    a ValueError the views show while they wait for DP's or APL's density maps, or while the
    statistics themselves are computed in the background (the demo family's take milliseconds)."""
    stats = ws.pcb_stats(cfg, wait=PCB_WAIT)
    if stats is None and cfg.combine == "pcb" and cfg.get("pcb_scope") == "model":
        p = ws.pcb_progress(cfg)
        if p is None:
            raise ValueError("PCB's whole-model statistics wait for the prune's density maps (being computed)")
        raise ValueError(f"PCB's whole-model statistics (scope: model, as the merge computes them): {p.text()}; "
                         f"the views follow when they are there")
    return stats


def pruned_deltas(ws, cfg: MergeConfig, name: str) -> torch.Tensor:
    """(n, ...) each config model's delta of `name` after the pipeline's own prune (and amplify).
    Kept in the view cache under everything it depends on (the masks and the merged-delta view of
    one redraw both need it: at 0.5 B a prune of every fine-tune is ~0.3 s); a copy is returned,
    as callers may work in place."""
    idx, stp, _ = steps(ws, cfg, name)
    view = cfg.for_tensor(name)
    key = ("pruned", name, tuple(idx), repr(stp), cfg.stages, cfg.seed, repr(sorted(view.settings.items())),
           tuple(repr(sorted(m.settings.items())) for m in view.models))
    return ws.access.memo(key, lambda: torch.stack([prune_amplify(cfg, i, name, ws.access.delta(name, j), step)
                                                    for i, (j, step) in enumerate(zip(idx, stp))])).clone()


def sce_topk(cfg: MergeConfig, name: str) -> float | None:
    """SCE's select_topk on `name` when its select drops entries (combine `sce`, select_topk < 1),
    else None. The select itself is sce.sce_select_mask on the pruned deltas, as the merge computes it."""
    if cfg.combine != "sce":
        return None
    topk = cfg.for_tensor(name).get("select_topk")
    return topk if topk < 1 else None


def random_drop(cfg: MergeConfig) -> bool:
    """True when the prune keeps entries at random (DARE, DELLA, or APL with `apl_drop: random`)."""
    return cfg.prune in ("random", "della") or (cfg.prune == "apl" and cfg.get("apl_drop") == "random")


def random_keep(ws, cfg: MergeConfig, i: int, name: str, step: Step) -> torch.Tensor:
    """The flat keep mask of a random drop: the draws under the density (APL rows: each row's;
    DELLA: its rank-dependent probabilities, read off the pipeline's own prune)."""
    if cfg.prune == "della":
        j = ws.align(cfg)[i]
        m = cfg.for_tensor(name).models[i]
        return ws.access.memo(("della", cfg.seed, i, name, step.density, m.get("della_epsilon")), lambda: prune_amplify(
            cfg, i, name, ws.access.delta(name, j), step).reshape(-1) != 0)
    u = uniform(ws, cfg.seed, i, name)
    if step.rows is None:
        return u < step.density if step.density < 1 else torch.ones_like(u, dtype=torch.bool)
    return (u.view(len(step.rows), -1) < step.rows.to(u.dtype).unsqueeze(1)).reshape(-1)


def uniform(ws, seed: int, i: int, name: str) -> torch.Tensor:
    """The uniform draws behind DARE's mask of config model i in `name` (the CPU generator a CPU
    merge uses): an entry is kept where its draw < density. Cached, so a density change is one compare."""
    return ws.access.memo(("u", int(seed), i, name), lambda: torch.rand(
        ws.access.shape(name), generator=tensor_generator(seed, i, name, "cpu")).reshape(-1))


# ------------------------------------------------------------------------------------ histograms

def _log_sample(ws, name: str, j: int) -> torch.Tensor:
    """log10 |δ| of a fixed strided sample of fine-tune j's `name` (zeros as -inf), cached."""
    return ws.access.memo(("log", name, j), lambda: sample_flat(ws.access.delta(name, j), HIST_SAMPLE).abs().log10())


def histogram(ws, cfg: MergeConfig, name: str, rows: list[dict] | None = None) -> dict:
    """|δ| histograms of `name` on a shared log10 grid: {"centers", "series": [{"model", "index",
    "part" ("all" | "kept" | "dropped"), "counts"}], "rows" (thresholds), "sampled" (entries
    counted), "numel"}. Random pruning splits each fine-tune into its kept and dropped entries."""
    cfg = fine_tunes(cfg)
    acc = ws.access
    idx, stp, _ = steps(ws, cfg, name)
    rows = thresholds(ws, cfg, name) if rows is None else rows
    samples = [_log_sample(ws, name, j) for j in idx]
    amplified = amplified_samples(ws, cfg, name, rows, samples) if cfg.amplify == "dpa" else []
    finite = [s[torch.isfinite(s)] for s in samples + amplified]
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
        if "kept_mask" in rows[i]:          # SCE: kept = survives the prune and the select
            keep = sample_flat(rows[i]["kept_mask"], HIST_SAMPLE)
            series.append({"model": m.model, "index": j, "part": "kept", "counts": counts(logs[keep])})
            series.append({"model": m.model, "index": j, "part": "dropped", "counts": counts(logs[~keep])})
        elif random_drop(cfg) and step.prune:
            keep = sample_flat(random_keep(ws, cfg, i, name, step), HIST_SAMPLE)     # the same entries as logs
            series.append({"model": m.model, "index": j, "part": "kept", "counts": counts(logs[keep])})
            series.append({"model": m.model, "index": j, "part": "dropped", "counts": counts(logs[~keep])})
        else:
            series.append({"model": m.model, "index": j, "part": "all", "counts": counts(logs)})
    for j, m, logs in zip(idx, cfg.models, amplified):      # the kept entries after their band's α
        series.append({"model": m.model, "index": j, "part": "amplified", "counts": counts(logs)})
    return {"name": name, "centers": centers, "series": series, "rows": rows,
            "sampled": min(acc.numel[name], HIST_SAMPLE), "numel": acc.numel[name],
            "sce_select": rows[0].get("sce_select") if rows else None,
            "pcb_ratio": rows[0].get("pcb_ratio") if rows else None}


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
    full = ws.stats.full(cfg.get("dp_outlier_m"))
    if full is None:
        return blocks, types, None
    j, m = idx[model_index], cfg.models[model_index]
    st = full[j]
    dp = (ws.dp_map(full, j, m.get("density"), cfg.get("dp_lambda"), cfg.get("dp_outlier_m"))[0]
          if metric == "dp_density" else None)
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


def winners(contrib: torch.Tensor) -> torch.Tensor:
    """Per entry, the index of the largest |contribution| (the first on ties), -1 where all are 0.
    A running maximum: n elementwise passes, far cheaper than an argmax over the model axis."""
    mag = contrib.abs()
    best, idx = mag[0].clone(), torch.zeros(mag.shape[1:], dtype=torch.long)
    for i in range(1, mag.shape[0]):
        better = mag[i] > best
        idx.masked_fill_(better, i)
        torch.maximum(best, mag[i], out=best)
    return idx.masked_fill_(best == 0, -1)


def combine_maps(ws, cfg: MergeConfig, name: str) -> dict:
    """Full-resolution maps of `name`: each model's pruned (amplified) delta, then after the
    combine each entry's winner (largest |contribution|, -1 where all are 0), the sign conflicts
    (a kept entry against the elected sign) and, for PCB, the balancing weights. A pruned entry
    is exactly 0, so a model keeps an entry where its pruned delta is non-zero."""
    cfg = fine_tunes(cfg)
    idx, _, pending = steps(ws, cfg, name)
    pruned = pruned_deltas(ws, cfg, name)
    contrib, conflict, pruned, scale = contributions(cfg.for_tensor(name), pruned,
                                                     pcb_stats(ws, cfg) if cfg.combine == "pcb" else None)
    return {"idx": idx, "pruned": pruned, "winner": winners(contrib), "conflict": conflict,
            "pcb_scale": scale, "pending": pending}


def mask_data(ws, cfg: MergeConfig, name: str) -> dict:
    """What the mask viewer draws, pooled to <= 256 x 256 cells, and its numbers:
    {"name", "shape", "cell", "models", "index", "kept" (pooled share kept per model), "kept_pct"
    (exact, as `thresholds` counts), "winner" (pooled: the model winning most of each cell's
    entries, NaN where none), "winner_pct", "no_winner_pct", "conflict" (pooled share),
    "conflict_pct", "pcb" (pooled weights per model or None), "pcb_mean_weight", "pending"}."""
    cfg = fine_tunes(cfg)
    maps = combine_maps(ws, cfg, name)
    rows = thresholds(ws, cfg, name)
    shape = list(ws.access.shape(name))
    numel = ws.access.numel[name]
    refs = [m.model for m in cfg.models]
    n = len(refs)
    winner = maps["winner"]
    # what each model keeps: its pruned entries; under PCB, those its balancing weight keeps
    keeps = [p != 0 for p in maps["pruned"]] if maps["pcb_scale"] is None else [s > 0 for s in maps["pcb_scale"]]
    kept = [pool(k) for k in keeps]
    share = torch.stack([pool(winner == i) for i in range(-1, n)])
    cell_winner = share.argmax(dim=0).float() - 1
    cell_winner[cell_winner < 0] = float("nan")
    counts = torch.bincount(winner.reshape(-1) + 1, minlength=n + 1).tolist()     # [none, model 0, ...]
    rows2d = shape[0] if len(shape) >= 2 else 1
    down = list(kept[0].shape)
    return {"name": name, "shape": shape, "models": refs, "index": maps["idx"],
            "cell": [math.ceil(rows2d / down[0]), math.ceil(numel / rows2d / down[1])],
            "kept": kept, "kept_pct": {r["model"]: 100.0 * r["kept"] / numel for r in rows},
            "winner": cell_winner, "winner_pct": {r: 100.0 * counts[i + 1] / numel for i, r in enumerate(refs)},
            "no_winner_pct": 100.0 * counts[0] / numel,
            "conflict": pool(maps["conflict"]), "conflict_pct": 100.0 * float(maps["conflict"].sum()) / numel,
            "pcb": [pool(s) for s in maps["pcb_scale"]] if maps["pcb_scale"] is not None else None,
            # the mean weight of the entries PCB keeps (the others weigh 0)
            "pcb_mean_weight": ({r: float(s[s > 0].mean()) if bool((s > 0).any()) else 0.0
                                 for r, s in zip(refs, maps["pcb_scale"])} if maps["pcb_scale"] is not None else None),
            "pcb_ratio": rows[0].get("pcb_ratio") if rows else None,
            "pending": maps["pending"]}


# ------------------------------------------------------------------------------------ method views

def _angles(ws, module: str, j: int) -> list[float | None]:
    """Per block, the angle (degrees) between the base's and fine-tune j's `module` weights: how far
    apart the two points are on the sphere slerp walks on. Cached (it depends on the weights only)."""

    def compute():
        out = []
        for b in ws.access.blocks():
            name = ws.access.module_name(b, module)
            if name is None:
                out.append(float("nan"))
                continue
            base, fts = ws.access.views(name)
            out.append(math.degrees(math.acos(float(slerp_dot(base, fts[j])))))
        return torch.tensor(out)
    return [None if math.isnan(a) else a for a in ws.access.memo(("angles", module, j), compute).tolist()]


def method_view(ws, cfg: MergeConfig, name: str) -> dict | None:
    """What the method does beyond masks, for the tensor on screen (None: nothing more to show):
      della          {"kind": "della", "cols", "rescale", "curves": [(model, index, [keep probability by rank])]}
      interpolations {"kind": "interpolation", "module", "blocks", "angles": [(model, index, [degrees per
                     block])], "t": [value per block] | None (slerp / nearswap's t over the layers)}
      tsv_m, iso_c, iso_cts  svd_view's dict"""
    cfg = fine_tunes(cfg)
    if cfg.combine in SVD_COMBINES:
        return svd_view(ws, cfg, name)
    if cfg.prune == "della":
        idx, stp, _ = steps(ws, cfg, name)
        shape = ws.access.shape(name)
        cols = shape[-1] if len(shape) > 1 else shape[0]
        view = cfg.for_tensor(name)
        return {"kind": "della", "cols": cols, "name": name, "rescale": view.models[0].get("rescale"),
                "curves": [(m.model, j, della_curve(min(cols, 512), s.density, m.get("della_epsilon"))
                            if s.prune else None)
                           for m, j, s in zip(view.models, idx, stp)]}
    if cfg.combine == "pcb":        # the scores on a log grid: a few far above the many near 0
        pcb = pcb_parts(ws, cfg, name)
        samples = [sample_flat(sc, HIST_SAMPLE) for sc in pcb["score"]]
        logs = [x[x > 0].log10() for x in samples]
        lo = min((float(x.min()) for x in logs if x.numel()), default=-8.0)
        hi = max(max((float(x.max()) for x in logs if x.numel()), default=0.0), lo + 1e-6)
        width = (hi - lo) / HIST_BINS
        idx = ws.align(cfg)
        return {"kind": "pcb", "name": name, "ratio": pcb["ratio"], "scope": pcb["scope"],
                "centers": [10 ** (lo + (b + 0.5) * width) for b in range(HIST_BINS)],
                "series": [{"model": m.model, "index": j, "cut": float(cut), "kept": int((sc > 0).sum()),
                            "numel": sc.numel(), "not_positive": 1.0 - x.numel() / max(smp.numel(), 1),
                            "counts": torch.histc(x, bins=HIST_BINS, min=lo, max=hi).round().int().tolist()}
                           for m, j, x, smp, cut, sc in zip(fine_tunes(cfg).models, idx, logs, samples, pcb["cut"],
                                                           pcb["scale"])]}
    if cfg.family != "interpolation":
        return None
    module = module_type(name)
    if module is None:
        return None
    idx = ws.align(cfg)
    blocks = ws.access.blocks()
    t = None
    if cfg.merge_method in ("slerp", "nearswap") and cfg.get("t") is not None:
        t = [float(v) if v is not None else None for v in P.gradient_curve(cfg.get("t"), name, len(blocks))]
    return {"kind": "interpolation", "module": module, "blocks": blocks, "name": name, "method": cfg.merge_method,
            "angles": [(m.model, j, _angles(ws, module, j)) for m, j in zip(cfg.models, idx)], "t": t}


def merged_delta(ws, cfg: MergeConfig, name: str) -> dict | None:
    """The merged delta of `name` as the pipeline computes it (prune, amplify, combine, λ) beside
    task arithmetic's of the same models (λ Σ wᵢδᵢ), on one log10 |δ| grid: {"name", "method",
    "centers", "before", "after" (counts of non-zero entries), "nonzero" (before, after shares),
    "norm_ratio" (‖after‖ / ‖before‖)}; None for an interpolation or layer stacking."""
    cfg = fine_tunes(cfg)
    if cfg.family != "pipeline":
        return None
    view = cfg.for_tensor(name)
    idx = ws.align(cfg)
    deltas = torch.stack([ws.access.delta(name, j) for j in idx])
    w = torch.tensor([float(m.get("weight")) for m in view.models]).view(-1, *([1] * (deltas.dim() - 1)))
    before = (deltas * w).sum(0) * float(view.get("lambda"))
    after = combine(view, pruned_deltas(ws, cfg, name).clone(), inplace=True,
                    pcb_stats=pcb_stats(ws, cfg)) * float(view.get("lambda"))
    logs = [sample_flat(t.reshape(-1), HIST_SAMPLE).abs().log10() for t in (before, after)]
    finite = [x[torch.isfinite(x)] for x in logs]
    lo = min((float(x.min()) for x in finite if x.numel()), default=-8.0)
    hi = max(max((float(x.max()) for x in finite if x.numel()), default=0.0), lo + 1e-6)
    counts = [torch.histc(x, bins=HIST_BINS, min=lo, max=hi).round().int().tolist() for x in finite]
    width = (hi - lo) / HIST_BINS
    norm = float(before.norm())
    return {"name": name, "method": cfg.method_name, "centers": [10 ** (lo + (b + 0.5) * width) for b in range(HIST_BINS)],
            "before": counts[0], "after": counts[1],
            "nonzero": (float((before != 0).float().mean()), float((after != 0).float().mean())),
            "norm_ratio": float(after.norm()) / norm if norm > 0 else None, "lambda": float(view.get("lambda"))}


# ------------------------------------------------------------------------------------ singular values

SVD_COMBINES = ("tsv_m", "iso_c", "iso_cts")
RANK_SHARE = 0.95       # the merged subspace: the fewest directions holding 95 % of ‖M‖_F


def energy_rank(s: torch.Tensor, share: float = RANK_SHARE) -> int:
    """The fewest leading singular values (of s, descending) whose rank-k approximation holds
    `share` of the matrix's Frobenius norm: the smallest k with Σ_{j≤k} s_j² ≥ share² Σ s_j² (the
    rank rule of Marczak et al., arXiv 2502.04959, Eq. 6); 0 for a zero matrix."""
    e = s.double().pow(2).cumsum(0)
    if len(e) == 0 or float(e[-1]) == 0.0:
        return 0
    return min(int((e < share ** 2 * e[-1]).sum()) + 1, len(e))


def energy_share(delta: torch.Tensor, u: torch.Tensor) -> float:
    """‖U Uᵀ δ‖²_F / ‖δ‖²_F for orthonormal columns U: the share of δ's energy in their span
    (= ‖Uᵀ δ‖²_F / ‖δ‖²_F); 0 for a zero δ."""
    total = float(delta.double().pow(2).sum())
    return float((u.T.double() @ delta.double()).pow(2).sum()) / total if total > 0 else 0.0


def _svdvals(ws, name: str, j: int) -> torch.Tensor:
    """Singular values of fine-tune j's delta of `name` (cached: they depend on the weights only)."""
    return ws.access.memo(("svdvals", name, j), lambda: torch.linalg.svdvals(ws.access.delta(name, j).float()))


def merged_svd(cfg: MergeConfig, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s) of the merged delta M (before λ) from the method's own factors, without forming M:
    its left singular vectors (rows x r) ranked as the method ranks them, and its singular values
    in that order. TSV-M's M = U⊥ diag(σ) V⊥ᵀ with orthonormal U⊥, V⊥: its singular values are
    the σ it keeps. Iso's M = σ̄ U⊥ V⊥ᵀ (Iso-C: U⊥ the task sum's U): every one is σ̄, the mean
    of the σ collected, and its directions rank by those σ (M's own SVD cannot rank them: among
    equal singular values LAPACK's order is arbitrary). `inputs`: the (T, rows, cols) deltas the
    combine decomposes (TSV-M's weighted)."""
    if cfg.combine == "iso_c":
        u, s, _ = torch.linalg.svd(task_sum(inputs), full_matrices=False)
        return u, torch.full_like(s, float(s.mean()))
    u, s, _ = tsv_factors(inputs) if cfg.combine == "tsv_m" else iso_cts_factors(inputs, cfg.get("common_space_fraction"))
    order = torch.argsort(s, descending=True, stable=True)
    u = orthogonalize(u)[:, order]
    return (u, s[order]) if cfg.combine == "tsv_m" else (u, torch.full_like(s, float(s.mean())))


def _memo_pair(ws, key: tuple, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors computed together, cached under one key (the access cache keeps tensors)."""
    got: dict = {}

    def part(i):
        if not got:
            got["pair"] = compute()
        return got["pair"][i]
    return ws.access.memo((*key, 0), lambda: part(0)), ws.access.memo((*key, 1), lambda: part(1))


def svd_view(ws, cfg: MergeConfig, name: str) -> dict | None:
    """What TSV-M, Iso-C and Iso-CTS do to the matrix `name` (None for other methods):
    {"kind": "svd", "method", "name", "shape", "rank" r = min(rows, cols), "models", "index",
     "spectra" (per fine-tune: the singular values of the delta the combine decomposes, TSV-M's
     weighted by wᵢ), "merged" (those of the merged delta M, before λ), "task_sum" (those of
     Σ wᵢδᵢ, task arithmetic before λ), "k_merged" / "k_sum" (energy_rank of each), "kept" (per
     fine-tune, energy_share of δᵢ in the span of M's top k_merged left singular vectors, merged_svd's),
     "kept_sum" (the same in the top k_sum left singular vectors of Σ wᵢδᵢ), and per method
       tsv_m   "k_task" ⌊r/T⌋, "own" (per fine-tune: the share of its weighted delta's energy in its top k_task)
       iso_c   "flat" (the mean singular value of Σ δᵢ, every singular value of M)
       iso_cts "common" c, "specific" s, "common_share" (energy_share of δᵢ in the top c left singular
               vectors of Σ δᵢ), "specific_share" (the energy of the top s singular values of
               (I - U_c U_cᵀ) δᵢ over ‖δᵢ‖²)}."""
    if cfg.combine not in SVD_COMBINES:
        return None
    cfg = fine_tunes(cfg)
    shape = list(ws.access.shape(name))
    if len(shape) != 2:
        raise ValueError(f"{name} is not a matrix: {cfg.method_name} averages it, it has no singular values")
    view = cfg.for_tensor(name)
    idx = ws.align(cfg)
    deltas = pruned_deltas(ws, cfg, name).float()
    weights = [float(m.get("weight")) for m in view.models]
    w = torch.tensor(weights).view(-1, 1, 1)
    inputs = deltas * w if cfg.combine == "tsv_m" else deltas
    spectra = [_svdvals(ws, name, j) * (abs(x) if cfg.combine == "tsv_m" else 1.0) for j, x in zip(idx, weights)]
    tsv = tuple(weights) if cfg.combine == "tsv_m" else ()
    fraction = float(view.get("common_space_fraction")) if cfg.combine == "iso_cts" else None
    u_m, s_m = _memo_pair(ws, ("merged-svd", name, cfg.combine, tuple(idx), tsv, fraction),
                          lambda: merged_svd(view, inputs))
    u_t, s_t = _memo_pair(ws, ("sum-svd", name, tuple(idx), tuple(weights)),
                          lambda: torch.linalg.svd((deltas * w).sum(0), full_matrices=False)[:2])
    k_m, k_t = energy_rank(s_m), energy_rank(s_t)
    u_m = u_m[:, :k_m]
    r, n = min(shape), len(idx)
    out = {"kind": "svd", "method": cfg.method_name, "combine": cfg.combine, "name": name, "shape": shape, "rank": r,
           "models": [m.model for m in cfg.models], "index": idx, "spectra": spectra, "merged": s_m, "task_sum": s_t,
           "k_merged": k_m, "k_sum": k_t, "lambda": float(view.get("lambda")),
           "kept": [energy_share(d, u_m) for d in deltas], "kept_sum": [energy_share(d, u_t[:, :k_t]) for d in deltas]}
    if cfg.combine == "tsv_m":
        k = tsv_rank(*shape, n)
        out["k_task"] = k
        out["own"] = [float(s[:k].double().pow(2).sum() / s.double().pow(2).sum()) if float(s.abs().sum()) > 0
                      else 0.0 for s in spectra]
    elif cfg.combine == "iso_c":
        out["flat"] = float(torch.linalg.svdvals(task_sum(deltas)).mean())
    else:
        c, s = iso_cts_split(*shape, n, float(view.get("common_space_fraction")))
        u_c = torch.linalg.svd(task_sum(deltas), full_matrices=False)[0][:, :c]
        out.update(common=c, specific=s, common_share=[energy_share(d, u_c) for d in deltas])
        own = [torch.linalg.svdvals(d - u_c @ (u_c.T @ d)) for d in deltas]
        out["specific_share"] = [float(o[:s].double().pow(2).sum() / d.double().pow(2).sum())
                                 if float(d.abs().sum()) > 0 else 0.0 for o, d in zip(own, deltas)]
    return out
