"""One-click lessons: each sets the models and method, runs the merges, scores them, and ends on
a sentence saying what to look at. Plain data plus one generator, so a test can run a lesson
without a browser.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from . import callbacks as cb


@dataclass(frozen=True)
class Lesson:
    title: str
    fts: tuple[str, ...]                 # demo names of the fine-tunes
    runs: tuple[dict, ...]               # control overrides, one merge (and score) each; the last stays on screen
    module: str = "mlp.down_proj"        # what the inspect section shows at the end
    block: int = 1
    metric: str = "mean |δ|"
    look: str = ""                       # the closing sentence
    extra: dict = field(default_factory=dict)


LESSONS: dict[str, Lesson] = {
    "dare_vs_dp": Lesson(
        title="DARE vs DP on a complex fine-tune",
        fts=("reverse_complex",),
        runs=(dict(preset="dp", prune_rate=0.9), dict(preset="dare_linear", prune_rate=0.9, seed=0)),
        metric="outlier %",
        look=("Compare runs in the leaderboard: at density 0.1 DARE's random drop (rescaled ×10) loses much more of "
              "the complex fine-tune's skill than DP. The histogram shows why: DARE keeps small and large |δ| alike "
              "(kept and dropped overlap), while DP/magnitude keeps only the right tail — switch the preset to dp to "
              "see its threshold line."),
    ),
    "ties_conflicts": Lesson(
        title="Sign conflicts in TIES",
        fts=("reverse", "cipher", "sort", "brackets"),
        runs=(dict(preset="task_arithmetic"), dict(preset="ties", prune_rate=0.8)),
        module="self_attn.q_proj",
        look=("Look at the mask viewer: the 'sign conflicts' panel marks entries where a fine-tune disagrees with the "
              "elected sign — TIES drops those contributions instead of letting them cancel. Compare the TIES run's "
              "objective with plain task arithmetic (run 1) in the leaderboard."),
    ),
    "pcb_balance": Lesson(
        title="PCB balancing",
        fts=("reverse", "cipher", "sort", "brackets"),
        runs=(dict(preset="task_arithmetic"), dict(preset="pcb", pcb_ratio=0.1)),
        module="mlp.up_proj",
        look=("Look at the PCB weights panel: each fine-tune's entries are weighted by how much they matter within "
              "their own task and against the others, and only the top 10% (ratio) survive. The 'winner' panel shows "
              "which fine-tune dominates each entry; compare the per-domain bars with task arithmetic."),
    ),
    "dpa_top_band": Lesson(
        title="DPA: amplify the top band",
        fts=("reverse", "cipher", "sort", "brackets"),
        runs=(dict(preset="dp", prune_rate=0.9),
              dict(preset="dppa", prune_rate=0.9, n_bands=2, bound1=0.5, alpha1=2.0, alpha2=1.0)),
        look=("DPA multiplies the largest half of the kept entries by α₁ = 2: the histogram's band-edge line splits "
              "them. At 90% pruning the kept deltas are too weak; amplifying the top band wins back part of the "
              "skills — compare run 2 with DP alone (run 1)."),
    ),
}


def lesson_controls(lesson: Lesson, overrides: dict) -> dict:
    """Control values for one run of a lesson (defaults + the run's overrides)."""
    v = dict(cb.DEFAULTS)
    v.update(overrides)
    v["base"] = "demo:base"
    v["fts"] = [f"demo:{n}" for n in lesson.fts]
    return v


# Outputs of run_lesson, in order (the app wires the components with the same names).
LESSON_OUTPUTS = ("base", "fts", *cb.METHOD_KEYS, "summary", "block", "module", "matrix", "heat_model", "metric",
                  "compare", "merge_summary", "leaderboard", "score_plot", "objective", "histogram", "thresholds",
                  "tensor_name", "heatmap", "mask_plot", "mask_numbers", "lesson_note")


def run_lesson(state: cb.AppState, key: str, progress=gr.Progress()):
    """Set up and run one lesson. Yields tuples matching LESSON_OUTPUTS."""
    n = len(LESSON_OUTPUTS)
    idx = {k: i for i, k in enumerate(LESSON_OUTPUTS)}
    out = [gr.update() for _ in range(n)]

    def emit(**kw):
        for k, v in kw.items():
            out[idx[k]] = v
        return tuple(out)

    lesson = LESSONS.get(key)
    if lesson is None:
        yield emit(lesson_note=cb.warn(f"unknown lesson {key!r}"))
        return
    refs = cb.demo_choices()[0]
    missing = [f"demo:{m}" for m in ("base", *lesson.fts) if f"demo:{m}" not in refs]
    if missing:
        yield emit(lesson_note=cb.warn(f"this lesson needs the demo family; missing {', '.join(missing)} "
                                       f"(run `python -m dppa_ui zoo build`)"))
        return
    first = lesson_controls(lesson, lesson.runs[0])
    yield emit(base=first["base"], fts=gr.update(choices=cb.all_choices(state), value=first["fts"]),
               lesson_note=f"**{lesson.title}**: loading models …")
    loaded = cb.load_models(state, first["base"], first["fts"])
    if loaded[-1].startswith("⚠"):
        yield emit(lesson_note=loaded[-1])
        return
    summary, block_u, module_u, matrix_u, heat_u, compare_u, _ = loaded
    yield emit(summary=summary, block=block_u, module=module_u, matrix=matrix_u, heat_model=heat_u,
               compare=compare_u)
    ws = state.ws
    block = min(lesson.block, max(ws.blocks()))
    module = lesson.module if lesson.module in ws.module_types() else ws.module_types()[0]
    matrix = ws.tensor_name(block, module)
    for k, overrides in enumerate(lesson.runs, 1):
        v = lesson_controls(lesson, overrides)
        mv = [v[key_] for key_ in cb.METHOD_KEYS]
        yield emit(**{key_: v[key_] for key_ in cb.METHOD_KEYS},
                   lesson_note=f"**{lesson.title}**: merge {k}/{len(lesson.runs)} ({v['preset']}) …")
        merged = cb.merge(state, *mv, progress=progress)
        if merged[-1].startswith("⚠"):
            yield emit(lesson_note=merged[-1])
            return
        yield emit(merge_summary=merged[0], leaderboard=merged[1],
                   lesson_note=f"**{lesson.title}**: scoring merge {k}/{len(lesson.runs)} …")
        scored = cb.score(state, cb.DEMO_SUITE, None, progress=progress)
        if scored[-1].startswith("⚠"):
            yield emit(lesson_note=scored[-1])
            return
        yield emit(score_plot=scored[0], objective=scored[1], leaderboard=scored[2])
    hist, thr, name, _ = cb.inspect(state, block, module, *mv)
    heat, _ = cb.heatmap(state, lesson.metric, 0, *mv)
    mask, numbers, _ = cb.masks(state, matrix, *mv)
    yield emit(block=gr.update(value=block), module=gr.update(value=module), matrix=gr.update(value=matrix),
               metric=lesson.metric, histogram=hist, thresholds=thr, tensor_name=name, heatmap=heat, mask_plot=mask,
               mask_numbers=numbers, lesson_note=f"**{lesson.title}** — done. 👉 {lesson.look}")
