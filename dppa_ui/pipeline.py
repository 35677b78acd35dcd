"""One tensor through the pipeline: theta_b + lambda * combine(amplify(prune(delta_i))), or
through an interpolation (dppa_ui/interpolations) for methods that work on the weights.

Everything here is pure tensor work on one tensor name; the engine streams names through it
from disk, and inmemory.merge_state_dicts runs it over state dicts held in memory (the app's
instant path, every search candidate). All math is float32 on the chosen device. Per-tensor functions read plain parameter
values: `merge_tensor` resolves the config for its tensor first (MergeConfig.for_tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .config import MergeConfig
from .interpolations import interpolate
from .io import DTYPES
from .methods import band_edges, band_factors, breadcrumbs_counts, is_dp_target, keep_count
from .methods.apl import APLDensity
from .methods.sum import weight_column
from .methods.ties import conflicts
from .methods.dp import DPDensity
from .methods.pcb import PCBStats, pcb_global_stats
from .registry import STAGES
from .stats import DeltaStats

@dataclass(frozen=True)
class Step:
    """What happens to one fine-tune's delta of one tensor."""
    prune: bool           # False: the whole delta is kept (no prune, or DP's `dp_others: keep`)
    density: float        # the density it is pruned at (DP: the module's d_m; APL: the partition's)
    offset: float = 0.0   # DPA band shift (DP: d_m - target density)
    rows: torch.Tensor | None = None    # APL at the row level: every row's own density


DensityMap = dict[str, DPDensity | APLDensity]


def plan_steps(cfg: MergeConfig, name: str, shape, dp_maps: list[DensityMap] | None) -> list[Step]:
    """The per-model Step for tensor `name`. `dp_maps`: per fine-tune, the per-tensor densities of
    a DP or APL prune (from `dp_maps_from_stats` or `apl.merge_inputs`)."""
    cfg = cfg.for_tensor(name)
    steps = []
    for i, m in enumerate(cfg.models):
        if cfg.prune == "none":
            steps.append(Step(prune=False, density=1.0))
        elif cfg.prune not in ("dp", "apl"):
            steps.append(Step(prune=True, density=m.get("density")))
        elif is_dp_target(name, shape):
            if dp_maps is None:
                raise ValueError(f"prune {cfg.prune} needs its per-tensor density maps: "
                                 + ("dp_maps_from_stats(cfg, stats)" if cfg.prune == "dp" else "apl.merge_inputs(cfg).maps"))
            d = dp_maps[i][name]
            steps.append(Step(prune=True, density=d.density, offset=d.offset, rows=getattr(d, "rows", None)))
        elif (cfg.get("dp_others") if cfg.prune == "dp" else cfg.get("apl_others")) == "keep":
            steps.append(Step(prune=False, density=1.0))
        else:
            steps.append(Step(prune=True, density=m.get("density")))
    return steps


def whole_factor(cfg: MergeConfig, i: int) -> float:
    """The factor DPA gives fine-tune i's delta of a tensor the prune keeps whole (DP's embeddings,
    norms, lm_head and biases under `dp_others: keep`). The official enhance_offset.py max-merges the
    K pruned copies of every tensor, each times its alpha; a whole-kept tensor is whole in every
    copy, so each entry ends at max_k alpha_k. `dpa_whole: keep` (or no DPA stage): 1."""
    if cfg.amplify != "dpa" or cfg.get("dpa_whole") == "keep":
        return 1.0
    amp = cfg.models[i].get("amplification")
    if isinstance(amp, str):
        raise ValueError(f"amplification {amp!r} of {cfg.models[i].model} must be resolved first "
                         f"(search.search_amplification)")
    return float(max(amp))


def prune_amplify(cfg: MergeConfig, i: int, name: str, delta: torch.Tensor, step: Step,
                  inplace: bool = False) -> torch.Tensor:
    """Stages 1 and 2 for fine-tune i's delta of tensor `name`, through the stages' records
    (`inplace`: may overwrite delta)."""
    if not step.prune:
        f = whole_factor(cfg, i)
        if f == 1.0:
            return delta
        return delta.mul_(f) if inplace else delta * f
    cfg = cfg.for_tensor(name)
    delta = STAGES["prune"][cfg.prune].run(delta, step, cfg, i, name, inplace=inplace)
    amplify = STAGES["amplify"][cfg.amplify].run
    if amplify is not None:
        delta = amplify(delta, step, cfg, i)
    return delta


def combine(cfg: MergeConfig, deltas: torch.Tensor, inplace: bool = False,
            pcb_stats: PCBStats | None = None) -> torch.Tensor:
    """Stage 3 on the stacked (n, ...) deltas, through the stage's record: the merged delta, before
    lambda. `pcb_stats`: PCB's whole-model statistics (scope model, from `pcb_model_stats`)."""
    return STAGES["combine"][cfg.combine].run(deltas, cfg, inplace=inplace, stats=pcb_stats)


def contributions(cfg: MergeConfig, pruned: torch.Tensor, pcb_stats: PCBStats | None = None):
    """What the combine does to each entry, for the inspect views, through the stage's record:
    (each model's contribution to the merged entry, the sign conflicts, the deltas it keeps, its
    weights or None); a stage without its own view: the weighted deltas. `cfg` resolved for the
    tensor."""
    stage = STAGES["combine"][cfg.combine]
    if stage.contributions is not None:
        return stage.contributions(pruned, cfg, pcb_stats)
    weighted = pruned * weight_column(pruned, [m.get("weight") for m in cfg.models])
    return weighted, conflicts(weighted), pruned, None


class Scratch:
    """Reusable float32 buffers, one per role, grown to the largest tensor seen.

    Fresh multi-megabyte allocations are returned to the OS and page-fault again on every
    tensor; reusing them keeps the merge at memory speed and the footprint at
    (n_models + 1) x the largest tensor."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape, device: torch.device) -> torch.Tensor:
        n = torch.Size(shape).numel()
        key = (role, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(shape)


def to_float32(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy `t` into the float32 tensor `out`. bfloat16 is the top half of a float32, so on the
    CPU the exact conversion is a 16-bit shift of the raw bits, far faster than torch's cast."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        bits = out.view(torch.int32)
        bits.copy_(t.view(torch.int16))          # sign-extends; the shift drops those bits again
        bits.bitwise_left_shift_(16)
        return out
    return out.copy_(t)


def merge_tensor(cfg: MergeConfig, name: str, base: torch.Tensor | None, fts: list[torch.Tensor],
                 dp_maps: list[DensityMap] | None = None, out_dtype: torch.dtype | None = None,
                 scratch: Scratch | None = None, t: float | None = None,
                 source_names: list[str] | None = None, pcb_stats: PCBStats | None = None) -> torch.Tensor:
    """The merged tensor for `name`, a new tensor on base's device in `out_dtype` (default float32).
    Non-float tensors: the base's (or the first input's), unchanged. `scratch` lends reusable work
    buffers. `fts` are aligned with cfg.models; `base` is None for interpolations without one.
    `t` / `source_names`: the gradient position and each model's own tensor name (slices), for
    resolving per-tensor parameters (default: from `name` and cfg.n_layers). `pcb_stats`: PCB's
    whole-model statistics (scope model)."""
    cfg = cfg.for_tensor(name, t, source_names)
    ref = base if base is not None else fts[0]
    if not ref.is_floating_point():
        return ref
    dev = ref.device
    scratch = scratch or Scratch()
    if cfg.merge_method == "passthrough" and cfg.models[0].get("scale") is None and ref.dtype == (out_dtype or torch.float32):
        return fts[0]            # a plain copy: no float32 round trip
    if cfg.family != "pipeline":
        b32 = None if base is None else (base if base.dtype == torch.float32 else
                                         to_float32(base, scratch.get("base", base.shape, dev)))
        xs = [to_float32(ft.to(dev), scratch.get(f"in{i}", ft.shape, dev)) for i, ft in enumerate(fts)]
        merged = interpolate(cfg, name, b32, xs)
        return merged.to(out_dtype or torch.float32, copy=True)
    base32, deltas = task_deltas(cfg, name, base, fts, dp_maps, scratch)
    merged = combine(cfg, deltas, inplace=True, pcb_stats=pcb_stats)
    out = torch.empty(base.shape, dtype=out_dtype or torch.float32, device=dev)
    return torch.add(base32, merged, alpha=cfg.get("lambda"), out=out) if cfg.get("lambda") != 1.0 else \
        torch.add(base32, merged, out=out)


def task_deltas(cfg: MergeConfig, name: str, base: torch.Tensor, fts: list[torch.Tensor],
                dp_maps: list[DensityMap] | None, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the base in float32, the (n, ...) stacked deltas after prune and amplify) of tensor `name`,
    on base's device, in `scratch`'s buffers; `cfg` resolved for the tensor."""
    dev = base.device
    steps = plan_steps(cfg, name, base.shape, dp_maps)
    deltas = scratch.get("deltas", (len(fts), *base.shape), dev)
    base32 = base if base.dtype == torch.float32 else to_float32(base, scratch.get("base", base.shape, dev))
    for i, ft in enumerate(fts):
        to_float32(ft.to(dev), deltas[i]).sub_(base32)
        slot = prune_amplify(cfg, i, name, deltas[i], steps[i], inplace=True)
        if slot.data_ptr() != deltas[i].data_ptr():
            deltas[i].copy_(slot)
    return base32, deltas


def pcb_model_stats(tensors: list[tuple[str, MergeConfig]], load: Callable, dp_maps: list[DensityMap] | None = None,
                    device: str | torch.device = "cpu", tick: Callable[[int], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> tuple[PCBStats, dict[str, str]]:
    """PCB's whole-model statistics (scope model: the official flattening of every task vector)
    for a set of models: over the floating `tensors` [(name, the config resolved for it)], each
    read by `load(name) -> (base, fine-tunes aligned with the config's models)` once per pass
    (methods.pcb.stat_passes) and pruned and amplified as the merge does, so only one tensor is
    in memory at a time. Tied duplicates are left out of the flattening, as the official
    `remove_keys` does for T5's embed_tokens (counted twice they would shift every row
    statistic); the merge gives them their primary's values. Returns (the statistics,
    {duplicate: primary}). `tick(1)` after each tensor of each pass; `cancel()` polled before
    each (True: InterruptedError). The models' weights do not enter (they scale the merged
    numerator only)."""
    device = torch.device(device)
    tied = tied_duplicates([name for name, _ in tensors], load)
    flat = [(name, c) for name, c in tensors if name not in tied]
    if not flat:
        raise ValueError("PCB over a model without floating-point tensors: nothing to merge")
    scratch = Scratch()

    def blocks():
        for name, c in flat:
            if cancel and cancel():
                raise InterruptedError("merge cancelled")
            base, fts = load(name)
            _, deltas = task_deltas(c, name, base.to(device), fts, dp_maps, scratch)
            yield deltas.reshape(deltas.shape[0], -1)
            if tick:
                tick(1)
        if tick and tied:
            tick(len(tied))
    cfg = flat[0][1]
    return pcb_global_stats(blocks, cfg.get("pcb_ratio"), cfg.get("clip_ratio")), tied


@dataclass(frozen=True)
class TensorFate:
    """What the prune and amplify stages do to one fine-tune's delta of one tensor (the inspect
    views read this; `kept_fraction` sums it)."""
    pruned: bool          # False: the prune keeps the whole delta (no prune, or DP's `dp_others: keep`)
    density: float        # share of entries the prune keeps (DP: the module's d_m; random: expected)
    bands: tuple[tuple[float, float, float], ...]   # DPA: (from, to, alpha) as shares of all entries ranked
    #                       by |delta|, top band first; a whole-kept tensor: ((0, 1, factor),); no DPA: ()
    kept: float           # share of entries left non-zero: a band (or whole tensor) at alpha 0 is dropped

    @property
    def amplified(self) -> bool:
        return any(a != 1.0 for _, _, a in self.bands)


def _fate(cfg: MergeConfig, i: int, step: Step, name: str, shape) -> tuple[TensorFate, float]:
    """(the fate, its exact kept count) of fine-tune i's delta of tensor `name` under `step`."""
    n = torch.Size(shape).numel()
    if not step.prune:
        f = whole_factor(cfg, i)
        bands = ((0.0, 1.0, f),) if cfg.amplify == "dpa" else ()
        kept = float(n) if f != 0.0 else 0.0
        return TensorFate(False, 1.0, bands, kept / max(n, 1)), kept
    expected = cfg.prune in ("random", "della") or (cfg.prune == "apl" and cfg.get("apl_drop") == "random")
    if step.rows is not None:           # APL's row level: each row at its own density
        cols = n // int(shape[0])
        kept = (float(step.rows.sum()) * cols if expected
                else float(sum(keep_count(float(d), cols) for d in step.rows)))
        return TensorFate(True, step.density, (), kept / max(n, 1)), kept
    if step.density >= 1 and cfg.prune in ("random", "della", "breadcrumbs"):    # these drop nothing at 1
        return TensorFate(True, 1.0, (), 1.0), float(n)
    if expected:                        # the mean keep probability
        return TensorFate(True, step.density, (), step.density), step.density * n
    if cfg.prune == "breadcrumbs":
        k = breadcrumbs_counts(n, step.density, cfg.for_tensor(name).models[i].get("gamma"))[1]
        return TensorFate(True, step.density, (), k / max(n, 1)), float(k)
    k = keep_count(step.density, n)
    if cfg.amplify != "dpa":
        return TensorFate(True, step.density, (), k / max(n, 1)), float(k)
    m = cfg.models[i]
    bands, kept, lo, lo_count = [], 0, 0.0, 0
    for edge, alpha in zip(band_edges(m.get("partitions"), step.offset), band_factors(m.get("amplification"), cfg.get("dpa_bands"))):
        hi = min(edge, step.density)
        count = min(keep_count(edge, n), k)       # dpa_amplify's band = the next ranks up to this edge
        bands.append((lo, max(hi, lo), float(alpha)))
        if alpha != 0:
            kept += max(count - lo_count, 0)
        lo, lo_count = max(hi, lo), max(count, lo_count)
    return TensorFate(True, step.density, tuple(bands), kept / max(n, 1)), float(kept)


def tensor_fates(cfg: MergeConfig, name: str, shape, dp_maps: list[DensityMap] | None) -> list[TensorFate]:
    """Per fine-tune: is tensor `name` pruned, at which density, which DPA factor per band (or on
    the whole tensor), and what share of its delta survives."""
    return [_fate(cfg, i, step, name, shape)[0] for i, step in enumerate(plan_steps(cfg, name, shape, dp_maps))]


def kept_fraction(cfg: MergeConfig, shapes: dict[str, tuple], dp_maps: list[DensityMap] | None
                  ) -> list[float]:
    """Share of each fine-tune's delta entries (over the tensors in `shapes`) left non-zero by the
    prune and amplify stages: exact for magnitude, breadcrumbs, DP and APL by magnitude, the
    expected value for random drops (DARE, DELLA, APL at random). A DPA band whose alpha is 0 counts
    as dropped. Interpolations keep every entry; a `slices` config has no one answer ([]). DP and
    APL need their density maps."""
    if cfg.family != "pipeline":       # no prune: every entry of every input counts
        return [1.0] * len(cfg.models)
    if cfg.slices is not None:
        return []
    kept, total = [0.0] * len(cfg.models), 0
    for name, shape in shapes.items():
        total += torch.Size(shape).numel()
        for i, step in enumerate(plan_steps(cfg, name, shape, dp_maps)):
            kept[i] += _fate(cfg, i, step, name, shape)[1]
    return [k / max(total, 1) for k in kept]


def output_dtype(cfg: MergeConfig, base_dtype: torch.dtype) -> torch.dtype:
    return DTYPES[cfg.dtype] if cfg.dtype else base_dtype


def dominant_float_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype | None:
    """The most common floating dtype among `dtypes` (a checkpoint's dtype, as saved and shown);
    None when there is none."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else None


def dp_maps_from_stats(cfg: MergeConfig, stats: list[DeltaStats]) -> list[dict[str, DPDensity]]:
    return [s.dp_map(m.get("density"), cfg.get("dp_lambda")) for s, m in zip(stats, cfg.models)]


def tied_duplicates(names: list[str], load: Callable) -> dict[str, str]:
    """{duplicate: primary} for tensors tied to an earlier one (T5's encoder/decoder embed_tokens
    to `shared`, a tied lm_head): the same storage, or equal values, in the base and every
    fine-tune; `load(name) -> (base, fine-tunes)`. Only tensors whose first entries agree too are
    compared in full."""
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True
        return torch.equal(a.reshape(-1), b.reshape(-1))

    out: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    for name in names:
        base, fts = load(name)
        ts = (base, *fts)
        key = (tuple(base.shape), base.dtype, tuple(tuple(t.reshape(-1)[:16].tolist()) for t in ts))
        for prev in seen.get(key, []):
            pb, pfts = load(prev)
            if all(same(x, y) for x, y in zip(ts, (pb, *pfts))):
                out[name] = prev
                break
        else:
            seen.setdefault(key, []).append(name)
    return out
