"""The page: the models and method controls in a column that stays in view, beside tabs for what
they drive (inspect, merge, chat, score, search, lessons). Each section is one file with `build`
(layout) and `wire` (events); handlers are plain functions of {key: value} (see page.py), every
component has an elem_id, and every event a user triggers has an api_name, so gradio_client drives
the same flow as a browser.
"""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from .. import figures, lifecycle
from ..modelbuild import warm_up
from ..refs import resolve_model
from ..workspace.access import lowest_priority
from . import chat, inspect, lessons, merge, method, models, score, search
from .choices import demo_choices
from .common import CONCURRENCY, FIRST_VIEW, SESSION_TTL, AppState, close_state, stop_on_signals, sweep_temp
from .page import Page

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CSS_PATH = ASSETS / "app.css"
INTRO = ("# dppa-ui · merge fine-tuned LLMs\nPick a base and its fine-tunes and a method (**DPPA**, TIES, DARE, "
         "PCB, …), **see** what each setting keeps, then merge, chat with and score the result. The YAML it exports "
         "runs unchanged with `python -m dppa_ui merge`.")
# Arrow keys move a slider without a pointer release; this turns the key release into one, so the
# keyboard commits a value exactly as the mouse does (one update per key press, none per pixel).
HEAD = """<script>
document.addEventListener('keyup', (e) => {
  const t = e.target;
  if (t && t.matches && t.matches('input[type=range]')) {
    t.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));
  }
}, true);
</script>"""


def launch_options() -> dict:
    """Keyword arguments for `demo.launch`: theme and CSS (gradio 6 takes them there), the script
    above, and no run history (it would keep every input, a typed hub token too, in the browser)."""
    return {"css_paths": [str(CSS_PATH)] if CSS_PATH.is_file() else None, "head": HEAD, "run_history": False,
            "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate", font=FONT, font_mono=FONT_MONO)}


# The system's own faces: the theme's web font is not reachable offline, and the face that stands
# in draws w / z / E as ω / ƶ / Ɛ, which a class reading a cipher letter by letter cannot use.
FONT = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Liberation Sans", "DejaVu Sans",
        "Arial", "sans-serif"]
FONT_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "DejaVu Sans Mono",
             "monospace"]


def build_app() -> gr.Blocks:
    """The page. Also, for the server process: sweep the temp folders of app processes killed
    outright, and end on SIGTERM as on Ctrl-C, with the server's files (see common.stop_on_signals)."""
    sweep_temp()
    stop_on_signals()
    page = Page()
    with gr.Blocks(title="dppa-ui: merge fine-tuned LLMs", analytics_enabled=False) as demo:
        # A state is tracked (its delete_callback runs when the tab closes or it expires) once an
        # event outputs it: loading and merging do.
        page.add("state", gr.State(AppState(), delete_callback=close_state, time_to_live=SESSION_TTL))
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Row(elem_id="main-row"):
            with gr.Column(scale=4, min_width=340, elem_id="controls-col"):
                with gr.Accordion("1 · Models", open=True, elem_id="sec-models") as models_acc:
                    page.add("models_acc", models_acc)
                    models.build(page)
                with gr.Accordion("2 · Method", open=True, elem_id="sec-method"):
                    method.build(page)
            with gr.Column(scale=8, elem_id="views-col"):
                with gr.Tabs(elem_id="tabs"):
                    with gr.Tab("3 · Inspect", id="inspect", elem_id="tab-inspect"):
                        inspect.build(page)
                    with gr.Tab("4 · Merge", id="merge", elem_id="tab-merge"):
                        merge.build(page)
                    with gr.Tab("5 · Chat", id="chat", elem_id="tab-chat"):
                        chat.build(page)
                    with gr.Tab("6 · Score", id="score", elem_id="tab-score"):
                        score.build(page)
                    with gr.Tab("7 · Search", id="search", elem_id="tab-search") as search_tab:
                        search.build(page, search_tab)
                    with gr.Tab("8 · Lessons", id="lessons", elem_id="tab-lessons"):
                        lessons.build(page)
        models.wire(page)
        control_setters = method.wire(page)
        autoload = page.on(demo.load, models.load_models, ["state", "base", "fts"], models.LOAD_OUTPUTS,
                           progress=True, api_visibility="private")
        merge.wire(page)
        chat.wire(page, CONCURRENCY)
        control_setters += score.wire(page)
        control_setters += search.wire(page)
        lessons.wire(page)
        # The views follow every committed control, every load, and every event that sets the controls.
        inspect.wire(page, method.commit_triggers(page), [*page.loaded_events, autoload, *control_setters],
                     method.checker(page))
    demo.run_history = False
    demo.page = page
    # transformers resolves its classes lazily, and two threads resolving them at once can fail
    # ("cannot import name 'AutoModelForCausalLM'"): resolve them here, before any handler runs; the
    # rest of the warm-up (the first chat would otherwise wait seconds for it) runs beside the page.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    figures.warm_up()           # plotly's lazy imports here, not in the first view
    base = demo_choices()[1]
    threading.Thread(target=_warm_up_later, args=(resolve_model(base) if base else None,), daemon=True,
                     name="dppa-ui-warm-up").start()
    return demo


def _warm_up_later(model_dir) -> None:
    """The chat warm-up, after the first view is drawn (or 3 s: a page opens sooner, an API client
    may never draw one), at the lowest CPU priority; not once the server is stopping (an import in
    a thread while the interpreter exits aborts the process)."""
    FIRST_VIEW.wait(3)
    if lifecycle.STOP.is_set():
        return
    lowest_priority()
    warm_up(model_dir)


