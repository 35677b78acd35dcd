"""The merge plan: for every output tensor, which input tensors feed it and with which resolved
parameters. Built from tensor names and shapes only (checkpoint headers), so every check here runs
before any tensor is read. The engine streams the plan to disk; `merge_state_dicts` runs it in
memory.

`models:` configs: one output tensor per tensor of the base (or, without a base, of the first
model), read under the same name from every input; gradient position t = i / (L - 1) for layer i
of the L layers, 0 outside the layers.

`slices:` configs (mergekit's semantics): tensors outside the layers come first from the first
slice's sources (embeddings) or last from the last slice's (final norm, lm_head); then every output
layer j, in slice order, is layer `start + i` of each source of its slice (i = the layer's place in
the slice, t = i / (n - 1) over the slice's n layers), renamed to layer j. The output has the
slices' total layer count.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import params as P
from .config import ConfigError, MergeConfig, slice_view

_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|tok_embeddings|embed_in|rotary)")


@dataclass
class TensorJob:
    """One output tensor."""
    name: str
    cfg: MergeConfig                           # resolved for this tensor (plain values)
    base: tuple[int, str] | None               # (input index, tensor name) of the base, if any
    sources: list[tuple[int, str]]             # aligned with cfg.models: (input index, tensor name)
    shape: tuple[int, ...]                     # output shape
    t: float = 0.0                             # gradient position
    slice: int | None = None                   # slices configs: the output slice it belongs to
    rows: int | None = None                    # read only the first rows (--allow-vocab-trim)

    @property
    def inputs(self) -> list[tuple[int, str]]:
        return ([self.base] if self.base is not None else []) + self.sources


@dataclass
class MergePlan:
    refs: list[str]                            # input models; reader i reads refs[i]
    jobs: list[TensorJob]
    n_layers: int                              # layers of the output model
    layer_origin: list[tuple[int, int]] = field(default_factory=list)   # per output layer: (input, its layer)
    notices: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.jobs]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {j.name: j.shape for j in self.jobs}

    def parameter_table(self, cfg: MergeConfig) -> list[dict]:
        """Per job, the resolved value of every parameter that varies over tensors ({key: value},
        per-model keys as `key[i]`), plus `t` (the gradient position) when anything varies: the
        data behind a per-layer curve of an interpolation's t or a density gradient."""
        varying = cfg.varying() if cfg.slices is None else sorted({v for k in range(len(cfg.slices))
                                                                   for v in slice_view(cfg, k).varying()})
        if not varying:
            return [{} for _ in self.jobs]
        rows = []
        for j in self.jobs:
            row = {"pos": j.t}
            for p in j.cfg.params:
                if p.name not in varying:
                    continue
                if p.scope == "global":
                    row[p.key] = j.cfg.get(p.name)
                else:
                    for i, m in enumerate(j.cfg.models):
                        row[f"{p.key}[{i}]"] = m.get(p.name)
            rows.append(row)
        return rows


def input_refs(cfg: MergeConfig) -> list[str]:
    """The distinct models a config reads: the base first (when it has one), then in order."""
    refs = [cfg.base_model] if cfg.base_model else []
    for m in cfg.models:
        refs.append(m.model)
    for s in cfg.slices or []:
        refs += [x.model for x in s.sources]
        if s.base_model:
            refs.append(s.base_model)
    return list(dict.fromkeys(refs))


def n_layers_of(names) -> int:
    """Layers of a checkpoint: 1 + the largest layer index among its tensor names (0 if none)."""
    idx = [P.layer_of(n) for n in names]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _view(cfg: MergeConfig, name: str, t: float, source_names=None) -> MergeConfig:
    return cfg.for_tensor(name, t, source_names)


def build_plan(cfg: MergeConfig, readers: list, shapes: dict[str, tuple] | None = None) -> MergePlan:
    """The plan for `cfg` over opened `readers` (aligned with `input_refs(cfg)`; each has `names`,
    `shape(name)`, `dtype(name)`). `shapes`: the shapes to merge for a `models:` config (from
    io.check_compatible, which may trim vocabulary rows); default the donor's own shapes."""
    refs = input_refs(cfg)
    if len(readers) != len(refs):
        raise ValueError(f"{len(readers)} readers for {len(refs)} input models")
    index = {r: i for i, r in enumerate(refs)}
    if cfg.slices is None:
        return _plan_models(cfg, readers, refs, index, shapes)
    return _plan_slices(cfg, readers, refs, index)


def _plan_models(cfg, readers, refs, index, shapes) -> MergePlan:
    donor = readers[0]
    shapes = shapes or {n: tuple(donor.shape(n)) for n in donor.names}
    n_layers = n_layers_of(shapes)
    cfg.with_layers(max(n_layers, 1))
    jobs = []
    base = 0 if cfg.base_model and (cfg.family == "pipeline" or cfg.method.base in ("required", "optional")) else None
    for name, shape in shapes.items():
        t = P.layer_t(P.layer_of(name), max(n_layers, 1))
        # read only the common rows when any input has more (a trimmed vocabulary); the base may
        # be the one with the fewest, so every input is checked, not only the donor
        rows = shape[0] if any(name in r and tuple(r.shape(name)) != tuple(shape) for r in readers) else None
        jobs.append(TensorJob(name, _view(cfg, name, t), (0, name) if base is not None else None,
                              [(index[m.model], name) for m in cfg.models], tuple(shape), t, rows=rows))
    return MergePlan(refs, jobs, n_layers, [(0, i) for i in range(n_layers)])


def _plan_slices(cfg, readers, refs, index) -> MergePlan:
    layers_of = [n_layers_of(r.names) for r in readers]
    # layer ranges inside every source model
    for k, s in enumerate(cfg.slices):
        for j, src in enumerate(s.sources):
            a, b = src.layer_range
            have = layers_of[index[src.model]]
            if b > have:
                raise ConfigError(f"`slices[{k}].sources[{j}].layer_range` = [{a}, {b}] is outside {src.model}, "
                                  f"which has {have} layers (0 .. {have - 1}); end is excluded, so use at most {have}")
    views = [slice_view(cfg, k) for k in range(len(cfg.slices))]
    jobs: list[TensorJob] = []
    first, last = views[0], views[-1]

    def base_of(v: MergeConfig) -> int | None:
        keep = v.family == "pipeline" or v.method.base in ("required", "optional")
        return index[v.base_model] if (keep and v.base_model and v.base_model in
                                       [x.model for x in cfg.slices[views.index(v)].sources]) else None

    def outside(v: MergeConfig, names: list[str], k: int):
        b = base_of(v)
        for name in names:
            src_reader = readers[index[v.models[0].model]] if v.models else readers[b]
            jobs.append(TensorJob(name, v.for_tensor(name, 0.0), (b, name) if b is not None else None,
                                  [(index[m.model], name) for m in v.models], tuple(src_reader.shape(name)), 0.0, k))

    donor = readers[index[cfg.slices[0].sources[0].model]]
    non_layer = [n for n in donor.names if P.layer_of(n) is None]
    pre = [n for n in non_layer if _PRE.search(n)]
    post = [n for n in non_layer if not _PRE.search(n)]
    outside(first, pre, 0)
    out_layer = 0
    origin = []
    for k, (s, v) in enumerate(zip(cfg.slices, views)):
        b = base_of(v)
        n = s.n_layers
        src_of = {x.model: x for x in s.sources}
        lead = s.sources[0]
        lead_reader = readers[index[lead.model]]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            layer = lead.layer_range[0] + i
            origin.append((index[lead.model], layer))
            names = [nm for nm in lead_reader.names if P.layer_of(nm) == layer]
            for nm in names:
                out_name = P.rename_layer(nm, out_layer)
                srcs = []
                for m in v.models:
                    x = src_of[m.model]
                    srcs.append((index[m.model], P.rename_layer(nm, x.layer_range[0] + i)))
                base_src = None
                if b is not None:
                    bx = src_of[v.base_model]
                    base_src = (b, P.rename_layer(nm, bx.layer_range[0] + i))
                for (ri, sn) in srcs + ([base_src] if base_src else []):
                    if sn not in readers[ri]:
                        raise ConfigError(f"`slices[{k}]`: {refs[ri]} has no tensor {sn} (needed for output "
                                          f"{out_name}); its layers differ from {lead.model}'s")
                view = v.for_tensor(out_name, t, [sn for _, sn in srcs])
                jobs.append(TensorJob(out_name, view, base_src, srcs, tuple(lead_reader.shape(nm)), t, k))
            out_layer += 1
    outside(last, post, len(cfg.slices) - 1)
    cfg.with_layers(out_layer)
    plan = MergePlan(refs, jobs, out_layer, origin)
    check_shapes(plan, readers)
    return plan


def check_shapes(plan: MergePlan, readers) -> None:
    """Every input of every job has the job's shape (vocabulary rows aside when a tokenizer
    rebuilds them); raises ConfigError listing the first mismatches."""
    bad = []
    for j in plan.jobs:
        for ri, name in j.inputs:
            sh = tuple(readers[ri].shape(name))
            if sh != j.shape and not (j.rows is not None and sh[1:] == j.shape[1:]):
                bad.append(f"{name} of {plan.refs[ri]}: {list(sh)} vs {list(j.shape)} (output {j.name})")
    if bad:
        raise ConfigError("these tensors cannot be merged (shapes differ):\n  " + "\n  ".join(bad[:5])
                          + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""))


class DictReader:
    """A state dict with a checkpoint reader's interface (names, shape, dtype, view, get)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd
        self.names = list(sd)

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def dtype(self, name):
        return self.sd[name].dtype

    def view(self, name):
        return self.sd[name]

    def get(self, name, rows=None):
        t = self.sd[name]
        return t if rows is None else t[:rows]

    def __contains__(self, name):
        return name in self.sd

    def close(self):
        pass
