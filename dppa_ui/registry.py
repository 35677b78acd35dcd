"""Every merge method and pipeline stage as a record: names, families, parameters (key, internal
name, default, bounds, one-line description), paper links, and for a stage the function that runs
it (in its method's file, methods/). config/ validates against the records, the merge (pipeline)
and the inspect views (analysis) run a stage through its record, and the app builds its method
picker and controls from them. A new method is its file plus its record here.

Four families:
  pipeline       theta_base + lambda * combine(amplify(prune(delta_i))), delta_i = theta_i - theta_base.
                 A preset names a (prune, amplify, combine) triple; stages compose freely.
  interpolation  works on the weights themselves (some use the base as origin): linear, slerp, ...
  stacking       passthrough: copies (scaled) tensors, with `slices` to stack layers.
  upscale        smile: every fine-tune a low-rank expert behind a router (a bigger model, not a merge).

Defaults and parameter names are mergekit 0.1.5's wherever mergekit has the method. Where mergekit
requires a key we give a default instead (weight: 1.0), except slerp's and nearswap's `t`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .methods import apl, breadcrumbs, dare, della, dp, dpa, iso, magnitude, pcb, ram, sce, ties, tsv_m
from .methods import sum as task_sum

REQUIRED = "required"     # a Param.default that means "no default: the config must set it"


@dataclass(frozen=True)
class Param:
    key: str                       # the YAML key
    kind: str                      # "float" | "int" | "bool" | "choice" | "rescale" | "floats" | "amplification" | "any"
    default: Any
    doc: str                       # one line
    scope: str = "model"           # "model": per model (a value under `parameters:` is every model's default);
    #                                "global": one value for the merge (may still vary per tensor)
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False          # True: lo itself is refused
    hi_open: bool = False
    choices: tuple = ()
    per_tensor: bool = True        # may be a gradient list or `filter` entries
    name: str = ""                 # the one internal name (cfg.get(name), m.get(name)); default: the key

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.key)

    @property
    def required(self) -> bool:
        return isinstance(self.default, str) and self.default == REQUIRED

    def bounds_text(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


def _p(key, kind, default, doc, **kw) -> Param:
    return Param(key, kind, default, doc, **kw)


# ----------------------------------------------------------------------------- parameters, by stage

WEIGHT = _p("weight", "float", 1.0, "this model's weight (negative subtracts its delta)")
DENSITY = _p("density", "float", 1.0, "share of delta entries kept", lo=0, hi=1, lo_open=True)
LAMBDA = _p("lambda", "float", 1.0, "scale of the merged delta added to the base", scope="global")
# `lambda: auto` (PCB's search of one lambda_i per model): what it maximises and which point it returns
LAMBDA_OBJECTIVE = _p("lambda_objective", "choice", "mean", "lambda: auto maximises the mean dev score over the "
                      "models' domains (the official pcb_ES.py) or the geometric mean of score / the best "
                      "fine-tune's score", scope="global", choices=("mean", "geometric"), per_tensor=False)
LAMBDA_CHOICE = _p("lambda_choice", "choice", "recommendation", "lambda: auto returns nevergrad's recommendation "
                   "(the official pcb_ES.py) or the best point it scored", scope="global",
                   choices=("recommendation", "best"), per_tensor=False)
NORMALIZE = _p("normalize", "bool", False, "divide by the sum of the (agreeing) weights", scope="global")
INT8_MASK = _p("int8_mask", "bool", False, "mergekit's memory option for masks; results are identical, so ignored",
               scope="global", per_tensor=False)
RESCALE_DOC = ("after dropping: l1 (true) restores the delta's L1 norm, none (false) keeps values, "
               "paper = DARE's 1/density or DELLA's 1/p per entry")


def _rescale(default: str) -> Param:
    return _p("rescale", "rescale", default, RESCALE_DOC, choices=("l1", "none", "paper"), per_tensor=False)


RESCALE = _rescale("none")


GAMMA = _p("gamma", "float", 0.01, "share of the largest |delta| entries also dropped (the outlier band)",
           lo=0, hi=1, hi_open=True)
EPSILON_DELLA = _p("epsilon", "float", 0.15, "keep probability spread: density -/+ epsilon from smallest to "
                   "largest |delta| in each row", lo=0, hi=1, lo_open=True, hi_open=True, name="della_epsilon")
PARTITIONS = _p("partitions", "floats", None, "DPA band upper edges (shares of all entries, ascending, last = density)",
                per_tensor=False)
AMPLIFICATION = _p("amplification", "amplification", None, "DPA factor per band, or `auto` (greedy search)",
                   per_tensor=False)
DOMAIN = _p("domain", "any", None, "dev-split domain(s) the auto alpha search scores on", per_tensor=False)
DP_LAMBDA = _p("dp_lambda", "float", 0.08, "largest density shift DP gives a block or module", scope="global",
               lo=0, hi=1, per_tensor=False)
DP_OUTLIER_M = _p("dp_outlier_m", "float", 5.0, "a module's outliers are entries above M x its mean |delta|",
                  scope="global", lo=0, lo_open=True, per_tensor=False)
DP_OTHERS = _p("dp_others", "choice", "keep", "tensors outside numbered blocks: keep the whole delta, or magnitude",
               scope="global", choices=("keep", "magnitude"), per_tensor=False)
PCB_RATIO = _p("pcb_ratio", "float", 0.1, "share of entries PCB keeps per task", scope="global", lo=0, hi=1,
               lo_open=True)
SCOPE = _p("scope", "choice", "model", "PCB's statistics over the whole model flattened (official code), or "
           "per tensor",
           scope="global", choices=("tensor", "model"), per_tensor=False, name="pcb_scope")
SELECT_TOPK = _p("select_topk", "float", 1.0, "share of entries (by variance across models) SCE keeps",
                 scope="global", lo=0, hi=1)
EPSILON_RAM = _p("epsilon", "float", 1e-5, "|delta| at or below this does not count as a contribution",
                 scope="global", lo=0, name="ram_epsilon")
RAM_R = _p("r", "float", 0.1, "RAM+ gain on a model's unique entries per unit of overlap ratio", scope="global", lo=0)
RAM_ALPHA = _p("alpha", "float", 0.2, "cap on the overlap ratio RAM+ uses", scope="global", lo=0, name="overlap_cap")
# --- TSV-M, Iso-C, Iso-CTS (methods/tsv_m.py, methods/iso.py): FusionBench 0.2.33's defaults
TSV_WEIGHT = replace(WEIGHT, doc="this task's alpha: scales its delta before the SVD (FusionBench's per-task "
                     "alpha list)")
COMMON_SPACE_FRACTION = _p("common_space_fraction", "float", 0.8, "share of each matrix's rank kept for the "
                           "directions common to all tasks; the rest is split equally among the tasks",
                           scope="global", lo=0, hi=1)

# Interpolations
T_SLERP = _p("t", "float", REQUIRED, "0 = base, 1 = the other model (outside [0, 1] extrapolates)", scope="global")
T_NEARSWAP = _p("t", "float", REQUIRED, "entries closer than t to the base take the other model's value",
                scope="global", lo=0, lo_open=True)
LINEAR_NORMALIZE = replace(NORMALIZE, default=True, doc="divide by the sum of the weights")
NUSLERP_FLATTEN = _p("nuslerp_flatten", "bool", True, "one vector per tensor (false: one per row or column)",
                     scope="global")
NUSLERP_ROW_WISE = _p("nuslerp_row_wise", "bool", False, "when not flattened: interpolate columns (dim 0) "
                      "instead of rows", scope="global")
NORMALIZE_WEIGHTS = _p("normalize_weights", "bool", True, "divide the weights by their sum", scope="global")
EPS_MULTISLERP = _p("eps", "float", 1e-8, "numerical floor for norms", scope="global", lo=0)
MAX_ITER = _p("max_iter", "int", 10, "Karcher iterations at most", scope="global", lo=1)
TOL = _p("tol", "float", 1e-5, "Karcher stops when the tangent step is below this", scope="global", lo=0,
         lo_open=True)
FILTER_WISE = _p("filter_wise", "bool", False, "one interpolation ratio per row instead of per tensor",
                 scope="global")
SCALE = _p("scale", "float", None, "multiply this source's tensors (unset = copy as is)")

# --- DPPA and PCB as their official code does them (issue 8)
DPA_WHOLE = _p("dpa_whole", "choice", "amplify", "tensors the prune keeps whole: amplified by the largest alpha "
               "(the official enhance_offset.py) or kept x1", scope="global", choices=("amplify", "keep"),
               per_tensor=False)
DPA_BANDS = _p("dpa_bands", "choice", "max", "each band's factor: the largest alpha of it and the bands below "
              "(the official enhance_offset.py keeps the larger-magnitude of the pruned copies) or its own alpha",
              scope="global", choices=("max", "own"), per_tensor=False)
ALPHA_SEARCH = _p("alpha_search", "choice", "official", "amplification: auto ends where the greedy walk ends "
                  "(official python_contral.py) or at the best point it saw", scope="global",
                  choices=("official", "best"), per_tensor=False)
ALPHA_START = _p("alpha_start", "floats", None, "where the greedy alpha walk starts (official: 1.8, then 0 for "
                 "every other band)", scope="global", per_tensor=False)
ALPHA_STEP = _p("alpha_step", "float", 0.1, "the greedy alpha walk's step", scope="global", lo=0, lo_open=True,
                per_tensor=False)
CLIP_RATIO = _p("clip_ratio", "float", 0.0001, "PCB clips each row's |delta| at this share of either tail "
                "(pcb-merging.py; its experiment scripts use 0.01)", scope="global", lo=0, hi=0.5, hi_open=True,
                per_tensor=False)

# --- APL: importance by causal intervention (issue 9, dppa_ui/methods/apl.py)
APL_EXAMPLES_DEFAULT = 16
APL_DATA = _p("apl_data", "any", None, "JSONL of {prompt, answer} on this fine-tune's own task (demo models: "
              "their dev split)", per_tensor=False)
APL_PARAMS = (
    _p("apl_examples", "int", APL_EXAMPLES_DEFAULT, "examples each importance is measured on", scope="global",
       lo=1, per_tensor=False),
    _p("apl_level", "choice", "module", "partition: a whole block, one module, or each row of a matrix",
       scope="global", choices=("block", "module", "row"), per_tensor=False),
    _p("apl_importance", "choice", "auto", "exact intervention, the gradient approximation, or auto (exact for "
       "blocks and modules, gradient for rows)", scope="global", choices=("auto", "exact", "gradient"),
       per_tensor=False),
    _p("apl_gradient_at", "choice", "midpoint", "where the gradient approximation takes its gradient",
       scope="global", choices=("midpoint", "finetune", "base"), per_tensor=False),
    _p("apl_lambda", "float", 0.5, "how far importance moves a partition's density from the target (relative)",
       scope="global", lo=0, hi=1, per_tensor=False),
    _p("apl_drop", "choice", "random", "drop within a partition at random (DARE) or by magnitude",
       scope="global", choices=("random", "magnitude"), per_tensor=False),
    _p("apl_weights", "bool", False, "also weight each fine-tune by its importance", scope="global",
       per_tensor=False),
    _p("apl_others", "choice", "keep", "tensors outside the partitions: keep the whole delta, or prune at the "
       "density", scope="global", choices=("keep", "prune"), per_tensor=False),
)

# --- SMILE: upscaling into low-rank experts (issue 9, dppa_ui/methods/smile.py)
SMILE_PARAMS = (
    _p("rank_of_expert", "rank", 64, "rank of each expert (its delta's SVD truncation), or full", scope="global",
       lo=1, per_tensor=False),
    _p("rank_of_router", "int", 8, "right singular vectors per expert the router projects on", scope="global",
       lo=1, per_tensor=False),
    _p("num_experts_per_tok", "int", 1, "experts each token uses (top-k of the router)", scope="global", lo=1,
       per_tensor=False),
    _p("smile_others", "choice", "base", "tensors outside the experts: the base's (as FusionBench keeps them), or "
       "task arithmetic of the fine-tunes", scope="global", choices=("base", "task_arithmetic"), per_tensor=False),
    _p("smile_scope", "choice", "blocks", "which linear layers become experts: the blocks' (paper), + input "
       "embeddings, + lm_head too", scope="global", choices=("blocks", "embeddings", "all"), per_tensor=False),
)


@dataclass(frozen=True)
class Stage:
    kind: str                      # "prune" | "amplify" | "combine"
    name: str
    doc: str
    paper: str
    params: tuple[Param, ...] = ()
    randomized: bool = False       # uses the seed
    # The stage's function, on a config resolved for one tensor (None: the stage does nothing):
    #   prune(delta, step, cfg, i, name, inplace) | amplify(delta, step, cfg, i)
    #   | combine(deltas, cfg, inplace, stats) -> the merged delta before lambda
    run: Callable | None = None
    # combine only: what the inspect views draw (contributions(pruned, cfg, stats) -> (per-model
    # contribution, sign conflicts, kept deltas, weights or None)); None: the weighted deltas
    contributions: Callable | None = None
    # check(m, where): refuse one model's resolved settings the stage cannot run (ValueError)
    check: Callable | None = None


STAGES: dict[str, dict[str, Stage]] = {
    "prune": {s.name: s for s in (
        Stage("prune", "none", "keep every delta entry", ""),
        Stage("prune", "magnitude", "keep the int(density*n) largest |delta| (TIES trim)",
              "https://arxiv.org/abs/2306.01708", (DENSITY, _rescale("none")), run=magnitude.prune),
        Stage("prune", "random", "keep each entry with probability density (DARE), then rescale",
              "https://arxiv.org/abs/2311.03099", (DENSITY, _rescale("l1")), randomized=True, run=dare.prune),
        Stage("prune", "dp", "per-block and per-module densities from outlier ratios (DPPA)",
              "https://arxiv.org/abs/2403.02799", (DENSITY, DP_LAMBDA, DP_OUTLIER_M, DP_OTHERS), run=dp.prune),
        Stage("prune", "breadcrumbs", "drop the gamma share of largest |delta| and the smallest, keep density",
              "https://arxiv.org/abs/2312.06795", (DENSITY, GAMMA, _rescale("none")), run=breadcrumbs.prune, check=breadcrumbs.check),
        Stage("prune", "della", "keep with probability rising with |delta| rank in its row (MagPrune), rescale",
              "https://arxiv.org/abs/2406.11617", (DENSITY, EPSILON_DELLA, _rescale("l1")), randomized=True,
                    run=della.prune, check=della.check),
        Stage("prune", "apl", "each block / module / row keeps more of its delta the more the fine-tune's loss on "
              "its own task rises without it (causal intervention, APL)", "https://arxiv.org/abs/2408.09485",
              (DENSITY, APL_DATA, *APL_PARAMS, _rescale("paper")), randomized=True, run=apl.prune),
    )},
    "amplify": {s.name: s for s in (
        Stage("amplify", "none", "no amplification", ""),
        Stage("amplify", "dpa", "magnitude bands of the kept entries, each scaled by its factor (DPPA)",
              "https://arxiv.org/abs/2403.02799",
              (PARTITIONS, AMPLIFICATION, DOMAIN, DPA_WHOLE, DPA_BANDS, ALPHA_SEARCH, ALPHA_START, ALPHA_STEP),
                    run=dpa.amplify),
    )},
    "combine": {s.name: s for s in (
        Stage("combine", "sum", "sum of the weighted deltas (task arithmetic)", "https://arxiv.org/abs/2212.04089",
              (WEIGHT, NORMALIZE), run=task_sum.combine),
        Stage("combine", "ties", "elect a sign per entry, mean of the agreeing weighted deltas",
              "https://arxiv.org/abs/2306.01708", (WEIGHT, replace(NORMALIZE, default=True), INT8_MASK),
                    run=ties.combine, contributions=ties.contributions),
        Stage("combine", "pcb", "intra- and inter-task balancing scores, drop, rescale (PCB-Merging)",
              "https://arxiv.org/abs/2410.02396", (WEIGHT, PCB_RATIO, CLIP_RATIO, SCOPE),
                    run=pcb.combine, contributions=pcb.contributions),
        Stage("combine", "sce", "select entries by variance across models, weight models by mean square, "
              "erase minority signs", "https://arxiv.org/abs/2408.07990", (SELECT_TOPK, INT8_MASK),
                    run=sce.combine, contributions=sce.contributions),
        Stage("combine", "ram", "entries only one model changed are kept, shared ones averaged over their "
              "contributors", "https://arxiv.org/abs/2601.13572", (EPSILON_RAM,), run=ram.combine),
        Stage("combine", "ramplus_tl", "RAM with each model's unique entries boosted by its overlap ratio "
              "(tensor-local RAM+)", "https://arxiv.org/abs/2601.13572", (RAM_R, RAM_ALPHA, EPSILON_RAM),
                    run=ram.combine_plus),
        Stage("combine", "tsv_m", "each task's delta cut to its top 1/T singular directions, the tasks' singular "
              "vectors decorrelated (orthogonal Procrustes); non-matrices averaged", "https://arxiv.org/abs/2412.00081",
              (TSV_WEIGHT,), run=tsv_m.combine),
        Stage("combine", "iso_c", "the summed deltas with every singular value set to their mean (a flat "
              "spectrum); non-matrices averaged", "https://arxiv.org/abs/2502.04959", run=iso.combine_c),
        Stage("combine", "iso_cts", "the summed deltas' top directions plus each task's own, orthogonalized, with a "
              "flat spectrum; non-matrices averaged", "https://arxiv.org/abs/2502.04959", (COMMON_SPACE_FRACTION,),
                    run=iso.combine_cts),
    )},
}
PRUNES = tuple(STAGES["prune"])
AMPLIFIES = tuple(STAGES["amplify"])
COMBINES = tuple(STAGES["combine"])


@dataclass(frozen=True)
class Method:
    name: str
    family: str                    # "pipeline" | "interpolation" | "stacking" | "upscale"
    title: str
    doc: str                       # one line on what it does
    paper: str
    stages: tuple[str, str, str] | None = None       # pipeline methods only
    own_params: tuple[Param, ...] = ()                # interpolation / stacking methods
    defaults: dict[str, Any] = field(default_factory=dict)    # per-method defaults over the stages'
    base: str = "required"         # "required" | "optional" | "input" (one more input, as mergekit) | "none"
    min_models: int = 1            # models besides the base
    max_models: int | None = None
    mergekit: bool = True          # mergekit 0.1.5 has this method under this name

    @property
    def params(self) -> tuple[Param, ...]:
        """Every parameter with this method's defaults applied (pipeline: its stages', lambda last)."""
        return stage_params(*self.stages, self.defaults) if self.stages else tuple(
            replace(p, default=self.defaults[p.key]) if p.key in self.defaults else p for p in self.own_params)


def stage_params(prune: str, amplify: str, combine: str, defaults: dict | None = None) -> tuple[Param, ...]:
    """The parameters of a pipeline (prune, amplify, combine), deduplicated by (key, scope)."""
    seen, out = set(), []
    for kind, name in (("prune", prune), ("amplify", amplify), ("combine", combine)):
        for p in STAGES[kind][name].params:
            if (p.key, p.scope) not in seen:
                seen.add((p.key, p.scope))
                out.append(replace(p, default=defaults[p.key]) if defaults and p.key in defaults else p)
    if combine not in ("sce", "ram", "ramplus_tl"):      # mergekit's GTA methods scale by lambda
        out += [LAMBDA, LAMBDA_OBJECTIVE, LAMBDA_CHOICE]
    return tuple(out)


def _pipe(name, title, doc, paper, stages, mergekit=True, **defaults) -> Method:
    return Method(name, "pipeline", title, doc, paper, stages=stages, defaults=defaults, mergekit=mergekit)


METHODS: dict[str, Method] = {m.name: m for m in (
    # ---- pipelines on deltas
    _pipe("task_arithmetic", "Task Arithmetic", "Adds the weighted task vectors (fine-tuned minus base) to the base.",
          "https://arxiv.org/abs/2212.04089", ("none", "none", "sum")),
    _pipe("ties", "TIES", "Trims each delta to its largest entries, elects a sign per entry, and averages the "
          "agreeing ones.", "https://arxiv.org/abs/2306.01708", ("magnitude", "none", "ties"), normalize=True),
    _pipe("dare_linear", "DARE (linear)", "Drops delta entries at random, rescales the survivors (L1 norm by "
          "default), then adds them.", "https://arxiv.org/abs/2311.03099", ("random", "none", "sum")),
    _pipe("dare_ties", "DARE TIES", "DARE's random drop and rescale, then TIES sign election and agreeing sum.",
          "https://arxiv.org/abs/2311.03099", ("random", "none", "ties"), normalize=False),
    _pipe("breadcrumbs", "Model Breadcrumbs", "Drops the largest (outlier) and the smallest delta entries, keeps "
          "a band in between, then adds them.", "https://arxiv.org/abs/2312.06795", ("breadcrumbs", "none", "sum")),
    _pipe("breadcrumbs_ties", "Model Breadcrumbs + TIES", "Breadcrumbs' band, then TIES sign election.",
          "https://arxiv.org/abs/2312.06795", ("breadcrumbs", "none", "ties"), normalize=False),
    _pipe("della", "DELLA", "Drops entries with a probability that falls with |delta| rank (MagPrune), rescales, "
          "then TIES sign election.", "https://arxiv.org/abs/2406.11617", ("della", "none", "ties"), normalize=True),
    _pipe("della_linear", "DELLA (linear)", "DELLA's magnitude-ranked drop and rescale, then a weighted sum.",
          "https://arxiv.org/abs/2406.11617", ("della", "none", "sum")),
    _pipe("sce", "SCE", "Selects entries that vary most across models, weights models by their mean square, "
          "erases minority signs.", "https://arxiv.org/abs/2408.07990", ("none", "none", "sce")),
    _pipe("ram", "RAM", "Keeps entries only one model changed, averages shared ones over the models that "
          "changed them.", "https://arxiv.org/abs/2601.13572", ("none", "none", "ram")),
    _pipe("ramplus_tl", "RAM+ (tensor-local)", "RAM with each model's unique entries boosted by how much it "
          "overlaps the others.", "https://arxiv.org/abs/2601.13572", ("none", "none", "ramplus_tl")),
    _pipe("dp", "DP", "Dynamic Pruning: per-layer and per-module densities from outlier ratios (OWL-style), "
          "then magnitude pruning.", "https://arxiv.org/abs/2403.02799", ("dp", "none", "sum"), mergekit=False),
    _pipe("dppa", "DPPA", "DP pruning, then Dynamic Partition Amplification: magnitude bands of the kept entries "
          "scaled by their own factor.", "https://arxiv.org/abs/2403.02799", ("dp", "dpa", "sum"), mergekit=False),
    _pipe("pcb", "PCB", "Parameter Competition Balancing: intra- and inter-task scores decide which entries "
          "survive and how much each weighs.", "https://arxiv.org/abs/2410.02396", ("none", "none", "pcb"),
          mergekit=False),
    _pipe("apl", "APL", "Activated Parameter Locating: each module keeps more of its delta the more the "
          "fine-tune's loss on its own task rises without it (causal intervention), then a weighted sum.",
          "https://arxiv.org/abs/2408.09485", ("apl", "none", "sum"), mergekit=False),
    _pipe("tsv_m", "TSV-M", "Task Singular Vectors: each delta cut to its top singular directions (an equal share "
          "of the rank per task), the tasks' singular vectors decorrelated, then summed.",
          "https://arxiv.org/abs/2412.00081", ("none", "none", "tsv_m"), mergekit=False),
    _pipe("iso_c", "Iso-C", "Isotropic merging: the task-arithmetic sum with a flat singular value spectrum "
          "(every direction at the mean singular value).", "https://arxiv.org/abs/2502.04959",
          ("none", "none", "iso_c"), mergekit=False),
    _pipe("iso_cts", "Iso-CTS", "Isotropic merging in common and task-specific subspaces: the sum's top "
          "directions plus each task's own, orthogonalized, with a flat spectrum.",
          "https://arxiv.org/abs/2502.04959", ("none", "none", "iso_cts"), mergekit=False),
    # ---- interpolations on weights
    Method("linear", "interpolation", "Linear (model soup)", "Weighted average of the models' weights.",
           "https://arxiv.org/abs/2203.05482", own_params=(WEIGHT, LINEAR_NORMALIZE), base="input"),
    Method("slerp", "interpolation", "SLERP", "Spherical interpolation between the base and one model, per tensor.",
           "https://en.wikipedia.org/wiki/Slerp", own_params=(T_SLERP,), min_models=1, max_models=1),
    Method("nuslerp", "interpolation", "NuSLERP", "Spherical interpolation of two models (or their deltas from the "
           "base) with t from their weights, per tensor, row or column.", "https://en.wikipedia.org/wiki/Slerp",
           own_params=(WEIGHT, NUSLERP_ROW_WISE, NUSLERP_FLATTEN), base="optional", min_models=2, max_models=2),
    Method("multislerp", "interpolation", "Multi-SLERP", "Barycentric interpolation of several models (or deltas) "
           "on the hypersphere.", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
           own_params=(WEIGHT, NORMALIZE_WEIGHTS, EPS_MULTISLERP), base="optional"),
    Method("karcher", "interpolation", "Karcher mean", "Riemannian (Karcher) mean of the models' directions, "
           "scaled by their mean norm.", "https://arxiv.org/abs/2603.04972", own_params=(MAX_ITER, TOL),
           base="input"),
    Method("model_stock", "interpolation", "Model Stock", "Moves from the base toward the models' average by a "
           "ratio set by the angle between their deltas.", "https://arxiv.org/abs/2403.19522",
           own_params=(FILTER_WISE,), min_models=2),
    Method("nearswap", "interpolation", "NearSwap", "Takes the other model's value where it is within t of the "
           "base, interpolates beyond.", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
           own_params=(T_NEARSWAP,), min_models=1, max_models=1),
    Method("arcee_fusion", "interpolation", "Arcee Fusion", "Keeps the other model's change only where its "
           "importance (|delta| x the row's softmax KL) is an upper outlier.", "https://arcee.ai",
           min_models=1, max_models=1),
    # ---- layer stacking
    Method("passthrough", "stacking", "Passthrough", "Copies each tensor from its one source (optionally scaled); "
           "with `slices`, stacks layer ranges into a new model.", "https://github.com/arcee-ai/mergekit",
           own_params=(SCALE,), base="none", min_models=1, max_models=1),
    # ---- upscaling: a mixture of experts instead of one merged matrix
    Method("smile", "upscale", "SMILE (upscale)", "Keeps every fine-tune as a low-rank expert (SVD of its delta) "
           "behind a zero-shot router: an upscaled model, not a merge.", "https://arxiv.org/abs/2408.10174",
           own_params=(WEIGHT, *SMILE_PARAMS), min_models=1, mergekit=False),
)}

# The app's current presets (the method picker shows these): name -> (prune, amplify, combine).
PRESETS: dict[str, tuple[str, str, str]] = {n: METHODS[n].stages for n in
                                            ("task_arithmetic", "ties", "dare_linear", "dare_ties", "dp", "dppa",
                                             "pcb")}
PIPELINE_PRESETS: dict[str, tuple[str, str, str]] = {n: m.stages for n, m in METHODS.items() if m.stages}

# Every key a merge YAML may carry under `parameters:`, with the methods / stages that use it.
ALL_PARAM_KEYS: frozenset[str] = frozenset(
    {p.key for m in METHODS.values() for p in m.params}
    | {p.key for kind in STAGES.values() for s in kind.values() for p in s.params})


# Every parameter by its one internal name, as first declared (the stages', then the methods'):
# what `MergeConfig.get` / `ModelSpec.get` fall back to for a parameter the config's method lacks.
PARAMS: dict[str, Param] = {}
for _p_ in [*(p for kind in STAGES.values() for s in kind.values() for p in s.params), LAMBDA, LAMBDA_OBJECTIVE,
            LAMBDA_CHOICE, *(p for m in METHODS.values() for p in m.own_params)]:
    PARAMS.setdefault(_p_.name, _p_)
del _p_


def default(name: str):
    """The default of the parameter with internal name `name` (None where the config must set it)."""
    p = PARAMS[name]
    return None if p.required else p.default
