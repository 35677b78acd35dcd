"""7 · Lessons: one click sets up the models and the method, runs the merges, scores them, and ends
on what to look at, next to the button: the lesson's runs (named by their real run numbers) and a
sentence computed from what they measured."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr

from .. import analysis, io
from ..controls import MethodControls
from ..workspace import short
from . import inspect as inspect_section
from . import merge as merge_section
from . import models as models_section
from . import score as score_section
from .choices import all_choices, demo_choices
from .common import AppState, fmt, sig, values_of, warn
from .controls_ui import SHOW_OUT, show_controls
from .suites import DEMO_SUITE


@dataclass(frozen=True)
class Lesson:
    title: str
    fts: tuple[str, ...]                       # demo names of the fine-tunes
    runs: tuple[MethodControls, ...]           # one merge (and score) each
    look: Callable                             # (ws, runs) -> the closing sentence
    module: str = "mlp.down_proj"
    block: int = 1
    metric: str = "mean |δ|"


def _em(run, domain: str) -> str:
    s = (run.scores or {}).get(domain, {}).get("em")
    return "n/a" if s is None else fmt(s)


def _obj(run) -> str:
    return "n/a" if run.objective is None else fmt(run.objective)


def _look_dare_vs_dp(ws, runs) -> str:
    dp, dare = runs
    return (f"At density 0.1 on the complex fine-tune, {dp.name} (DP) keeps exact match {_em(dp, 'reverse')} on "
            f"reverse and {dare.name} (DARE, rescaled ×10) keeps {_em(dare, 'reverse')}. The histogram shows why: "
            f"DARE keeps small and large |δ| alike (its kept and dropped lines overlap), DP keeps the right tail, "
            f"where this fine-tune's large deltas live.")


def _masks_of(ws, run, module: str) -> tuple[str, dict]:
    """(tensor name, mask data) of `module` in block 1 under `run`'s config."""
    name = ws.access.tensor_name(1, module)
    return name, analysis.mask_data(ws, ws.config(run.config), name)


def _look_ties(ws, runs) -> str:
    ta, ties = runs
    name, d = _masks_of(ws, ties, "self_attn.q_proj")
    return (f"In {short(name)} {fmt(d['conflict_pct'])}% of the entries have a kept delta against the elected sign "
            f"(the 'sign conflicts' panel): TIES drops those contributions instead of letting them cancel. Objective: "
            f"{ta.name} (task arithmetic) {_obj(ta)}, {ties.name} (TIES) {_obj(ties)}.")


def _look_pcb(ws, runs) -> str:
    ta, pcb = runs
    name, d = _masks_of(ws, pcb, "mlp.up_proj")
    kept = ", ".join(f"{short(k)} {fmt(p)}%" for k, p in d["kept_pct"].items())
    weights = ", ".join(f"{short(k)} {fmt(w)}" for k, w in d["pcb_mean_weight"].items())
    return (f"PCB scores each entry by how much it stands out in its own task and agrees with the others, and keeps "
            f"each fine-tune's top 10% of scores: in {short(name)} it keeps {kept} (the histogram's solid lines, the "
            f"method view's cuts); the kept entries weigh {weights} on average. Objective: {ta.name} (task "
            f"arithmetic) {_obj(ta)}, {pcb.name} (PCB) {_obj(pcb)}.")


def _look_dpa(ws, runs) -> str:
    dp, dppa = runs
    cfg = ws.config(dppa.config)
    name = ws.access.tensor_name(1, "mlp.down_proj")
    rows = analysis.thresholds(ws, cfg, name)
    split = [r for r in rows if r["band_edges"] and r["band_edges"][0] and r["band_edges"][0] > 0]
    edge = (f"the dotted band-edge line splits the kept entries of {len(split)} of {len(rows)} fine-tunes in "
            f"{short(name)}" + (f" (DP's module density leaves the top band of {', '.join(short(r['model']) for r in rows if r not in split)} empty)"
                                if len(split) < len(rows) else ""))
    mass = ", ".join(f"{short(r['model'])} ×{fmt(r['mass_ratio'])}" for r in rows if r.get("mass_ratio"))
    return (f"DPA multiplies the top half of the kept entries by α₁ = 2: {edge}; the light lines are the kept "
            f"entries after α, their Σ|δ| grown {mass}. Objective: {dp.name} (DP alone) {_obj(dp)}, {dppa.name} "
            f"(DP + DPA) {_obj(dppa)}.")


def _look_slerp(ws, runs) -> str:
    lin, slerp = runs
    name = ws.access.tensor_name(1, "mlp.down_proj")
    d = analysis.method_view(ws, ws.config(slerp.config), name)
    angles = [a for a in d["angles"][0][2] if a is not None]
    diff = _weight_gap(lin, slerp)
    return (f"The fine-tune's weights sit {min(angles):.1f}°–{max(angles):.1f}° from the base's (the method view's "
            f"angles per layer). Slerp walks the arc between them, linear the chord: at t = 0.5 the two merges differ "
            f"by {diff:.2%} of the weights' norm (linear's midpoint lies inside the arc, shorter by cos(θ/2) for "
            f"equal norms). Scores: "
            f"{lin.name} (linear) objective {_obj(lin)}, EM reverse {_em(lin, 'reverse')}; {slerp.name} (slerp) "
            f"objective {_obj(slerp)}, EM reverse {_em(slerp, 'reverse')}.")


def _weight_gap(a, b) -> float:
    """‖θ_a − θ_b‖ / ‖θ_a‖ over two runs' merged weights (read from their folders)."""
    num = den = 0.0
    with io.CheckpointReader(a.folder) as ra, io.CheckpointReader(b.folder) as rb:
        for n in ra.names:
            x, y = ra.get(n).float(), rb.get(n).float()
            num += float((x - y).pow(2).sum())
            den += float(x.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


FOUR = ("reverse", "cipher", "sort", "brackets")
LESSONS: dict[str, Lesson] = {
    "dare_vs_dp": Lesson("DARE vs DP on a complex fine-tune", ("reverse_complex",),
                         (MethodControls(preset="dp", density=0.1),
                          # DARE as its paper rescales (x 1/density); mergekit's default rescales to the L1 norm
                          MethodControls(preset="dare_linear", density=0.1, params={"rescale": "paper"})),
                         _look_dare_vs_dp, metric="outlier %"),
    "ties_conflicts": Lesson("Sign conflicts in TIES", FOUR,
                             (MethodControls(preset="task_arithmetic"), MethodControls(preset="ties", density=0.2)),
                             _look_ties, module="self_attn.q_proj"),
    "pcb_balance": Lesson("PCB balancing", FOUR,
                          (MethodControls(preset="task_arithmetic"), MethodControls(preset="pcb", pcb_ratio=0.1)),
                          _look_pcb, module="mlp.up_proj"),
    "dpa_top_band": Lesson("DPA: amplify the top band", FOUR,
                           (MethodControls(preset="dp", density=0.2),
                            MethodControls(preset="dppa", density=0.2, band_shares=(0.5,), alphas=(2.0, 1.0))),
                           _look_dpa),
    "slerp_vs_linear": Lesson("Slerp vs linear interpolation", ("reverse",),
                              (MethodControls(preset="linear"),             # the base and the fine-tune 1:1
                               MethodControls(preset="slerp", params={"t": 0.5})),
                              _look_slerp, module="mlp.down_proj"),
}
RESULT_HEADERS = ["run", "method", "objective", "EM per domain"]


def build(page) -> None:
    gr.Markdown("Each lesson loads its models, runs its merges and scores them; its result appears beside its "
                "button, and the controls, inspect views and scores show the last run.", elem_id="lessons-intro")
    for key, lesson in LESSONS.items():
        slug = key.replace("_", "-")
        with gr.Row(equal_height=False, elem_classes=["lesson-row"]):
            page.add(f"lesson_btn_{key}", gr.Button(lesson.title, elem_id=f"lesson-{slug}", scale=1, min_width=180))
            with gr.Column(scale=4):
                page.add(f"lesson_note_{key}", gr.Markdown("", elem_id=f"lesson-note-{slug}", elem_classes=["lesson-note"]))
                page.add(f"lesson_runs_{key}", gr.Dataframe(headers=RESULT_HEADERS, interactive=False, visible=False,
                                                            elem_id=f"lesson-runs-{slug}", wrap=True,
                                                            elem_classes=["lesson-runs"],
                                                            column_widths=["8%", "22%", "18%", "52%"]))


def lesson_outputs(key: str) -> list[str]:
    return list(dict.fromkeys([
        *SHOW_OUT, *models_section.LOAD_OUTPUTS, *merge_section.MERGE_OUT, *inspect_section.INSPECT_OUT,
        *inspect_section.HEATMAP_OUT, *inspect_section.MASKS_OUT, "heat_metric", "score_plot", "objective",
        f"lesson_note_{key}", f"lesson_runs_{key}"]))


def run_lesson(key: str, v: dict):
    """Set up and run one lesson; yields output dicts as it goes."""
    lesson = LESSONS[key]
    note, runs_out = f"lesson_note_{key}", f"lesson_runs_{key}"
    state: AppState = v["state"]
    refs = demo_choices()[0]
    missing = [f"demo:{m}" for m in ("base", *lesson.fts) if f"demo:{m}" not in refs]
    if missing:
        yield {note: warn(f"this lesson needs the demo family; missing {', '.join(missing)} "
                          f"(run `python -m dppa_ui zoo build`)")}
        return
    base, fts = "demo:base", [f"demo:{n}" for n in lesson.fts]
    yield {**show_controls(lesson.runs[0], base, fts, all_choices(state)),
           note: f"**{lesson.title}**: loading models …"}
    loaded = models_section.load_models({"state": state, "base": base, "fts": fts})
    if loaded["models_status"].startswith("⚠"):
        yield {note: loaded["models_status"]}
        return
    yield loaded
    ws = state.ws
    progress = v["progress"]
    done = []
    for k, c in enumerate(lesson.runs, 1):
        yield {**show_controls(c), note: f"**{lesson.title}**: merge {k}/{len(lesson.runs)} ({c.preset}) …"}
        vals = {"state": state, "progress": progress, **values_of(c)}
        merged = merge_section.merge(vals)
        if merged["merge_status"].startswith("⚠"):
            yield {note: merged["merge_status"]}
            return
        yield {**merged, note: f"**{lesson.title}**: scoring merge {k}/{len(lesson.runs)} …"}
        scored = score_section.score({"state": state, "progress": progress, "suite": DEMO_SUITE,
                                      "upload": None})
        if scored["score_status"].startswith("⚠"):
            yield {note: scored["score_status"]}
            return
        yield {k2: scored[k2] for k2 in ("score_plot", "objective", "leaderboard")}
        done.append(ws.runs.last)
    block = min(lesson.block, max(ws.access.blocks()))
    module = lesson.module if lesson.module in ws.access.module_types() else ws.access.module_types()[0]
    view = {"state": state, "block": block, "module": module, "matrix": ws.access.tensor_name(block, module),
            "heat_metric": lesson.metric, "heat_model": 0, **values_of(lesson.runs[-1])}
    out = {"block": gr.update(value=block), "module": gr.update(value=module), "heat_metric": lesson.metric}
    for view_fn in (inspect_section.inspect, inspect_section.heatmap, inspect_section.masks):
        out.update(view_fn(view))
    out["matrix"] = gr.update(value=view["matrix"])
    rows = [[r.number, r.config.method_name, sig(r.objective),
             " · ".join(f"{d} {s['em']:.2f}" for d, s in (r.scores or {}).items() if s.get("em") is not None)]
            for r in done]
    out[runs_out] = gr.update(value=rows, visible=True)
    out[note] = f"**{lesson.title}** — done. → {lesson.look(ws, done)}"
    yield out


def _lesson_fn(key: str):
    def fn(v):
        yield from run_lesson(key, v)
    fn.__name__ = f"lesson_{key}"
    return fn


def wire(page) -> None:
    for key in LESSONS:
        page.on(page[f"lesson_btn_{key}"].click, _lesson_fn(key), ["state"], lesson_outputs(key), progress=True,
                api_name=f"lesson_{key}", concurrency_limit=1, concurrency_id="merge")

