"""Hugging Face Space entry point (and `python app.py` locally): the dppa-ui app on the demo family.

Host and port come from gradio's defaults or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; never shared.
A browser tab opens where there is a display to open it on; on a Space or a headless server it
does not (Python's webbrowser would start a console browser in the terminal there, or nothing).
"""
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import spaces  # noqa: E402,F401  on a ZeroGPU Space it must be imported before torch touches CUDA

from dppa_ui.ui import build_app, launch_options  # noqa: E402
from dppa_ui.ui.common import CONCURRENCY, on_space  # noqa: E402

demo = build_app()
demo.queue(default_concurrency_limit=CONCURRENCY)


def has_display() -> bool:
    """A desktop to open a browser tab on: Windows and macOS, elsewhere an X or Wayland display."""
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    demo.launch(inbrowser=not on_space() and has_display(), **launch_options())
