"""The page: seven sections top to bottom (models, method, inspect, merge, chat, score, lessons),
every component with an elem_id, every event wired to a plain function in callbacks.py / lessons.py
with an api_name (so gradio_client can drive the same flow as a browser).
"""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from ..chat import MAX_NEW_TOKENS
from ..config import PRESETS
from . import callbacks as cb
from .lessons import LESSON_OUTPUTS, LESSONS, run_lesson

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CSS_PATH = ASSETS / "app.css"
MAX_MERGES = max(1, int(os.environ.get("DPPA_UI_MAX_MERGES", "1") or 1))
CONCURRENCY = max(1, int(os.environ.get("DPPA_UI_CONCURRENCY", "2") or 2))
SESSION_TTL = float(os.environ.get("DPPA_UI_SESSION_TTL", 4 * 3600))   # seconds since the last load/merge

INTRO = """# dppa-ui · merge fine-tuned LLMs
Pick a base and its fine-tunes, choose a method (**DPPA**, TIES, DARE, PCB, …), **see** what each
setting keeps before merging, then merge, chat with and score the result. Everything runs on this
server; the YAML it exports runs unchanged with `python -m dppa_ui merge`."""


def launch_options() -> dict:
    """Keyword arguments for `demo.launch` (gradio 6 takes theme and CSS there)."""
    return {"css_paths": [str(CSS_PATH)] if CSS_PATH.is_file() else None,
            "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")}


def _section(num: int, title: str, help_text: str, elem_id: str):
    gr.Markdown(f"## {num}. {title}\n{help_text}", elem_id=elem_id, elem_classes=["section-head"])


def _on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def build_app() -> gr.Blocks:
    refs, base0, fts0, zoo_note = cb.demo_choices()
    with gr.Blocks(title="dppa-ui: merge fine-tuned LLMs", analytics_enabled=False) as demo:
        # A state is tracked (and its delete_callback run when the tab closes or it expires) once an
        # event outputs it: loading and merging do.
        state = gr.State(cb.AppState(), delete_callback=cb.close_state, time_to_live=SESSION_TTL)
        gr.Markdown(INTRO, elem_id="intro")

        # ------------------------------------------------------------------ 1. models
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(1, "Models", "The base and the fine-tunes trained from it. Loading checks they fit together "
                     "and computes each fine-tune's delta δ = fine-tune − base once.", "sec-models")
            with gr.Row():
                base = gr.Dropdown(refs, value=base0, label="Base model", allow_custom_value=True, scale=1,
                                   elem_id="base-model")
                fts = gr.Dropdown(refs, value=fts0, multiselect=True, label="Fine-tunes", allow_custom_value=True,
                                  scale=2, elem_id="finetunes")
            with gr.Row(equal_height=True):
                add_box = gr.Textbox(label="Add a model", placeholder="a folder under the model roots, or org/name on the hub",
                                     scale=4, elem_id="add-model-box", info=cb.roots_note())
                add_btn = gr.Button("Add", scale=1, elem_id="add-model-btn")
                load_btn = gr.Button("Load models", variant="primary", scale=1, elem_id="load-models-btn")
            summary = gr.Markdown(zoo_note or "Press **Load models** (the demo family loads on its own when the page opens).",
                                  elem_id="models-summary")
            models_status = gr.Markdown("", elem_id="models-status", elem_classes=["status"])

        # ------------------------------------------------------------------ 2. method
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(2, "Method", "A merge is prune → amplify → combine on each δ. A preset picks the stages; only "
                     "its controls are shown. The inspect plots below follow every change.", "sec-method")
            with gr.Row(equal_height=True):
                preset = gr.Radio(list(PRESETS), value=cb.DEFAULTS["preset"], label="Preset", scale=4,
                                  elem_id="preset")
                example = gr.Dropdown(list(cb.example_files()), value=None, label="Example config", scale=1,
                                      elem_id="example-config")
            preset_info = gr.Markdown(cb.preset_view(cb.DEFAULTS["preset"])[0], elem_id="preset-info")
            with gr.Row():
                prune_rate = gr.Slider(0.0, 0.99, value=cb.DEFAULTS["prune_rate"], step=0.01, label="Prune rate",
                                       info="share of each δ dropped (= 1 − density)", elem_id="prune-rate")
                lam = gr.Slider(0.0, 3.0, value=cb.DEFAULTS["lam"], step=0.05, label="λ (scale of the merged δ)",
                                elem_id="lambda")
                weights = gr.Textbox(value="", label="Weights", placeholder="1 each; or e.g. 1, 0.5, 1, 1",
                                     info="one per fine-tune, comma-separated", elem_id="weights")
            with gr.Row(visible=True) as dp_group:
                dp_lambda = gr.Slider(0.0, 0.5, value=cb.DEFAULTS["dp_lambda"], step=0.01, label="DP λ",
                                      info="how far layer/module densities may move from the target", elem_id="dp-lambda")
                dp_m = gr.Slider(1.0, 20.0, value=cb.DEFAULTS["dp_m"], step=0.5, label="DP M",
                                 info="outlier = |δ| above M × the module mean", elem_id="dp-m")
            with gr.Column(visible=True) as dpa_group:
                with gr.Row():
                    n_bands = gr.Radio([1, 2, 3], value=cb.DEFAULTS["n_bands"], label="DPA bands", elem_id="n-bands")
                    bound1 = gr.Slider(0.05, 0.95, value=cb.DEFAULTS["bound1"], step=0.05, label="Band edge 1",
                                       info="share of the kept entries in the top band", elem_id="bound1")
                    bound2 = gr.Slider(0.05, 0.95, value=cb.DEFAULTS["bound2"], step=0.05, label="Band edge 2",
                                       visible=False, elem_id="bound2")
                with gr.Row():
                    alpha1 = gr.Slider(0.0, 4.0, value=cb.DEFAULTS["alpha1"], step=0.05, label="α₁ (top band)",
                                       elem_id="alpha1")
                    alpha2 = gr.Slider(0.0, 4.0, value=cb.DEFAULTS["alpha2"], step=0.05, label="α₂", elem_id="alpha2")
                    alpha3 = gr.Slider(0.0, 4.0, value=cb.DEFAULTS["alpha3"], step=0.05, label="α₃", visible=False,
                                       elem_id="alpha3")
                with gr.Row(equal_height=True):
                    auto_btn = gr.Button("auto α", scale=1, elem_id="auto-alpha-btn", size="md")
                    alpha_per_model = gr.Textbox(value="", label="Per-model α (from auto α; clear to use the sliders)",
                                                 scale=3, elem_id="alpha-per-model")
                alpha_log = gr.Textbox(label="α search log (greedy search per fine-tune on its dev split)", lines=2,
                                       max_lines=8, interactive=False, elem_id="alpha-log")
            with gr.Row(visible=False) as pcb_group:
                pcb_ratio = gr.Slider(0.01, 1.0, value=cb.DEFAULTS["pcb_ratio"], step=0.01, label="PCB ratio",
                                      info="share of entries kept after balancing", elem_id="pcb-ratio")
            seed = gr.Number(value=cb.DEFAULTS["seed"], precision=0, label="Seed (DARE's random masks)",
                             visible=False, elem_id="seed")
            method_status = gr.Markdown("", elem_id="method-status", elem_classes=["status"])

        method = [preset, prune_rate, lam, weights, dp_lambda, dp_m, n_bands, bound1, bound2, alpha1, alpha2, alpha3,
                  alpha_per_model, pcb_ratio, seed]
        assert len(method) == len(cb.METHOD_KEYS)

        # ------------------------------------------------------------------ 3. inspect
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(3, "Inspect", "What the current settings keep, before any merge: |δ| histograms with each "
                     "fine-tune's keep threshold, a per-layer map, and the masks of any weight matrix.", "sec-inspect")
            with gr.Row():
                block = gr.Slider(0, 1, value=0, step=1, label="Block (layer)", elem_id="block")
                module = gr.Dropdown([], label="Module", elem_id="module")
                tensor_name = gr.Markdown("", elem_id="tensor-name")
            with gr.Row():
                histogram = gr.Plot(label="|δ| histogram", elem_id="histogram", scale=3)
                thresholds = gr.Dataframe(headers=cb.THRESHOLD_HEADERS, label="Keep thresholds", interactive=False,
                                          elem_id="thresholds", scale=2, wrap=True)
            with gr.Row():
                with gr.Column(scale=2):
                    with gr.Row():
                        metric = gr.Radio(list(cb.HEATMAP_METRICS), value="mean |δ|", label="Map", elem_id="heatmap-metric")
                        heat_model = gr.Dropdown([], label="Fine-tune", elem_id="heatmap-model")
                    heatmap = gr.Plot(label="Blocks × modules", elem_id="heatmap")
                with gr.Column(scale=3):
                    matrix = gr.Dropdown([], label="Weight matrix", elem_id="mask-matrix")
                    mask_plot = gr.Plot(label="Masks", elem_id="mask-plot")
                    mask_numbers = gr.Markdown("", elem_id="mask-numbers")
            inspect_status = gr.Markdown("", elem_id="inspect-status", elem_classes=["status"])

        # ------------------------------------------------------------------ 4. merge
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(4, "Merge", "Merges in memory (on the GPU when there is one); the result stays loaded for chat "
                     "and scoring. Save writes a model folder with its card and YAML.", "sec-merge")
            with gr.Row():
                merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                save_btn = gr.Button("Save model", elem_id="save-btn")
            merge_summary = gr.Markdown("No merge yet.", elem_id="merge-summary")
            download = gr.File(label="Download (zip)", interactive=False, elem_id="download", visible=False)
            with gr.Accordion("Push to the Hugging Face Hub", open=False, elem_id="push-accordion"):
                offline = cb.hub_offline()
                if offline:
                    gr.Markdown("Pushing is off: this server runs offline (`HF_HUB_OFFLINE=1`).", elem_id="push-note")
                with gr.Row(equal_height=True):
                    if _on_space():
                        gr.LoginButton(elem_id="login-btn")
                    hub_token = gr.Textbox(label="Write token" + (" (or sign in)" if _on_space() else ""),
                                           type="password", interactive=not offline, elem_id="hub-token", scale=2)
                    repo_id = gr.Textbox(label="Repo", placeholder="user/merged-model", interactive=not offline,
                                         elem_id="hub-repo", scale=2)
                    private = gr.Checkbox(value=True, label="private", interactive=not offline, elem_id="hub-private")
                    push_btn = gr.Button("Push", interactive=not offline, elem_id="push-btn")
            merge_status = gr.Markdown("", elem_id="merge-status", elem_classes=["status"])

        # ------------------------------------------------------------------ 5. chat
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(5, "Chat", "Talk to the merged model; 'compare with' streams another model's answer to the same "
                     "message beside it. Models without a chat template get a plain `<|user|> … <|assistant|>` one.",
                     "sec-chat")
            with gr.Row():
                compare = gr.Dropdown(["none", "base"], value="base", label="Compare with", elem_id="compare", scale=1)
                system = gr.Textbox(label="System prompt (optional)", elem_id="system-prompt", scale=3)
            with gr.Row():
                chat_merged = gr.Chatbot(label="merged", elem_id="chat-merged", height=300)
                chat_other = gr.Chatbot(label="compared", elem_id="chat-compare", height=300)
            with gr.Row(equal_height=True):
                msg = gr.Textbox(placeholder="e.g. reverse: hello world", show_label=False, scale=5,
                                 elem_id="chat-input")
                send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                clear_btn = gr.Button("Clear", scale=1, elem_id="chat-clear")
            with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="top-p")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
            chat_status = gr.Markdown("", elem_id="chat-status", elem_classes=["status"])

        # ------------------------------------------------------------------ 6. score
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(6, "Score", "Scores the merged model, the base and each fine-tune (cached) per domain; the "
                     "objective is the geometric mean of merged ÷ best fine-tune. Every merge lands in the "
                     "leaderboard; reload any run's settings or export them as YAML.", "sec-score")
            with gr.Row(equal_height=True):
                suite = gr.Radio([cb.DEMO_SUITE, cb.UPLOAD_SUITE], value=cb.DEMO_SUITE, label="Suite", scale=2,
                                 info=f"demo: the first {cb.SCORE_PER_DOMAIN} held-out test items of each domain",
                                 elem_id="suite")
                upload = gr.File(label="JSONL: {\"prompt\", \"answer\", \"domain\"} per line", file_types=[".jsonl"],
                                 scale=2, elem_id="suite-upload", height=90)
                score_btn = gr.Button("Score", variant="primary", scale=1, elem_id="score-btn")
            with gr.Row():
                score_plot = gr.Plot(label="Scores", elem_id="score-plot", scale=3)
                with gr.Column(scale=2):
                    objective = gr.Markdown("", elem_id="objective")
                    with gr.Accordion("All scores (JSON)", open=False):
                        score_json = gr.JSON(label="Scores (all models)", elem_id="score-json")
            leader = gr.Dataframe(headers=cb.LEADERBOARD_HEADERS, label="Session leaderboard", interactive=False,
                                  elem_id="leaderboard", wrap=True)
            with gr.Row(equal_height=True):
                run_no = gr.Number(value=1, precision=0, label="Run #", elem_id="run-number", scale=1)
                reload_btn = gr.Button("Load that run's settings", elem_id="reload-run-btn", scale=2)
                export_btn = gr.Button("Export current config as YAML", elem_id="export-yaml-btn", scale=2)
            with gr.Row():
                yaml_code = gr.Code(language="yaml", label="Config (runs with: python -m dppa_ui merge FILE --out DIR)",
                                    elem_id="yaml-code", scale=3, interactive=True)
                yaml_file = gr.File(label="YAML file", interactive=False, elem_id="yaml-file", scale=1, visible=False)
            load_yaml_btn = gr.Button("Load the YAML above into the controls", elem_id="load-yaml-btn", size="sm")
            score_status = gr.Markdown("", elem_id="score-status", elem_classes=["status"])

        # ------------------------------------------------------------------ 7. lessons
        with gr.Column(variant="panel", elem_classes=["section"]):
            _section(7, "Lessons", "One click sets everything up, runs the merges and scores them, then says what to "
                     "look at.", "sec-lessons")
            with gr.Row():
                lesson_btns = {k: gr.Button(lesson.title, elem_id=f"lesson-{k.replace('_', '-')}")
                               for k, lesson in LESSONS.items()}
            lesson_note = gr.Markdown("", elem_id="lesson-note", elem_classes=["lesson-note"])

        # ------------------------------------------------------------------ wiring
        pick = [base, fts]
        load_out = [summary, block, module, matrix, heat_model, compare, models_status]
        inspect_in = [state, block, module, *method]
        inspect_out = [histogram, thresholds, tensor_name, inspect_status]
        heat_in = [state, metric, heat_model, *method]
        mask_in = [state, matrix, *method]
        mask_out = [mask_plot, mask_numbers, inspect_status]
        quiet = dict(show_progress="hidden", trigger_mode="always_last")

        def refresh(ev):
            """After an event that changes models or controls: redraw all three inspect views."""
            return (ev.then(cb.inspect, inspect_in, inspect_out, api_visibility="private", **quiet)
                    .then(cb.heatmap, heat_in, [heatmap, inspect_status], api_visibility="private", **quiet)
                    .then(cb.masks, mask_in, mask_out, api_visibility="private", **quiet))

        # The named views first, so they own the api names /inspect, /heatmap, /masks.
        method_inputs = [c.input for c in method]
        gr.on([block.input, module.input, *method_inputs], cb.inspect, inspect_in, inspect_out,
              api_name="inspect", **quiet)
        gr.on([metric.input, heat_model.input, *method_inputs], cb.heatmap, heat_in, [heatmap, inspect_status],
              api_name="heatmap", **quiet)
        gr.on([matrix.input, *method_inputs], cb.masks, mask_in, mask_out, api_name="masks", **quiet)
        ev = load_btn.click(_load, [state, base, fts], [*load_out, state], api_name="load_models")
        refresh(ev)
        refresh(demo.load(_load, [state, base, fts], [*load_out, state], api_visibility="private"))
        add_btn.click(cb.add_model, [state, add_box, base, fts], [base, fts, models_status], api_name="add_model")
        add_box.submit(cb.add_model, [state, add_box, base, fts], [base, fts, models_status], api_visibility="private")

        preset.change(cb.preset_view, preset, [preset_info, prune_rate, dp_group, dpa_group, pcb_group, seed],
                      api_name="preset_view", show_progress="hidden")
        n_bands.change(cb.bands_view, n_bands, [bound1, bound2, alpha1, alpha2, alpha3], api_visibility="private",
                       show_progress="hidden")

        module.input(cb.matrix_for, [state, block, module], matrix,
                     api_visibility="private", show_progress="hidden").then(
            cb.masks, mask_in, mask_out, api_visibility="private", **quiet)
        block.input(cb.matrix_for, [state, block, module], matrix,
                    api_visibility="private", show_progress="hidden", trigger_mode="always_last").then(
            cb.masks, mask_in, mask_out, api_visibility="private", **quiet)

        auto_btn.click(cb.auto_alpha, [state, *method], [alpha_log, alpha1, alpha2, alpha3, alpha_per_model,
                                                          method_status], api_name="auto_alpha",
                       concurrency_limit=MAX_MERGES, concurrency_id="merge")
        controls_out = [*pick, *method]
        refresh(example.input(cb.load_example, [state, example], [*controls_out, method_status], api_name="load_example"))

        merge_ev = merge_btn.click(_merge, [state, *method], [merge_summary, leader, merge_status, state],
                                   api_name="merge", concurrency_limit=MAX_MERGES, concurrency_id="merge")
        cancel_btn.click(cb.cancel_merge, state, merge_status, cancels=[merge_ev], api_name="cancel", queue=False)
        save_btn.click(cb.save_model, state, [download, merge_status], api_name="save")
        push_btn.click(cb.push_to_hub, [state, repo_id, hub_token, private], merge_status, api_name="push")

        chat_in = [state, msg, chat_merged, chat_other, compare, system, temperature, top_p, max_new]
        chat_out = [chat_merged, chat_other, msg, chat_status]
        send_btn.click(cb.chat, chat_in, chat_out, api_name="chat", concurrency_limit=CONCURRENCY)
        msg.submit(cb.chat, chat_in, chat_out, api_visibility="private", concurrency_limit=CONCURRENCY)
        clear_btn.click(cb.clear_chat, None, [chat_merged, chat_other, msg], api_name="clear_chat")

        score_btn.click(cb.score, [state, suite, upload], [score_plot, objective, leader, score_json, score_status],
                        api_name="score", concurrency_limit=MAX_MERGES, concurrency_id="merge")
        refresh(reload_btn.click(cb.reload_run, [state, run_no], [*controls_out, score_status], api_name="reload_run"))
        export_btn.click(cb.export_yaml, [state, *pick, *method], [yaml_code, yaml_file, score_status],
                         api_name="export_yaml")
        refresh(load_yaml_btn.click(cb.load_yaml_into_controls, [state, yaml_code], [*controls_out, score_status],
                                    api_name="load_yaml"))

        comps = dict(zip(("base", "fts", *cb.METHOD_KEYS), controls_out))
        comps.update(summary=summary, block=block, module=module, matrix=matrix, heat_model=heat_model, metric=metric,
                     compare=compare, merge_summary=merge_summary, leaderboard=leader, score_plot=score_plot,
                     objective=objective, histogram=histogram, thresholds=thresholds, tensor_name=tensor_name,
                     heatmap=heatmap, mask_plot=mask_plot, mask_numbers=mask_numbers, lesson_note=lesson_note)
        lesson_out = [comps[k] for k in LESSON_OUTPUTS]
        for key, btn in lesson_btns.items():
            btn.click(_lesson_fn(key), state, lesson_out, api_name=f"lesson_{key}",
                      concurrency_limit=MAX_MERGES, concurrency_id="merge")
    return demo


def _load(state, base, fts):
    """load_models, also outputting the state so gradio tracks it (TTL, delete_callback)."""
    return (*cb.load_models(state, base, fts), state)


def _merge(state, *method_values, progress=gr.Progress()):
    return (*cb.merge(state, *method_values, progress=progress), state)


def _lesson_fn(key: str):
    def fn(state, progress=gr.Progress()):
        yield from run_lesson(state, key, progress=progress)
    fn.__name__ = f"lesson_{key}"
    return fn
