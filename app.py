"""Hugging Face Space entry point (and `python app.py` locally): the dppa-ui app on the demo family.

Host and port come from gradio's defaults or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; never shared.
A browser tab opens where there is a display to open it on; on a Space or a headless server it
does not (Python's webbrowser would start a console browser in the terminal there, or nothing).
SIGTERM (docker stop, a Space restart) and Ctrl-C end the server the same way: running merges
stop, every server file is removed.
"""
import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# torch's OpenMP workers sleep between parallel regions instead of spinning (read when torch loads).
# In a server, a merge's thread waits for the GIL whenever the event loop runs; a spinning worker
# burned a core meanwhile: at 0.5 B the app's merge took 1.2-1.5x the CLI's CPU, 1.0x with this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import spaces  # noqa: E402,F401  on a ZeroGPU Space it must be imported before torch touches CUDA

from dppa_ui.ui import build_app, launch_options  # noqa: E402
from dppa_ui.ui.common import CONCURRENCY, on_space, stop_on_signals  # noqa: E402

demo = build_app()
demo.queue(default_concurrency_limit=CONCURRENCY)


def has_display() -> bool:
    """A desktop to open a browser tab on: Windows and macOS, elsewhere an X or Wayland display."""
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    demo.launch(inbrowser=not on_space() and has_display(), prevent_thread_lock=True, **launch_options())
    # After launch: gradio may install its own handlers there; ours clean up, then call them.
    stop_on_signals((signal.SIGTERM, signal.SIGINT))
    demo.block_thread()
