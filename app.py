"""Hugging Face Space entry point (and `python app.py` locally): the dppa-ui app on the demo family.

Host and port come from gradio's defaults or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; never shared.
Locally a browser tab opens; on a Space it does not. SIGTERM (docker stop, a Space restart) and
Ctrl-C end the server the same way: running merges stop, every server file is removed.
"""
import os
import signal

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import spaces  # noqa: E402,F401  on a ZeroGPU Space it must be imported before torch touches CUDA

from dppa_ui.ui import build_app, launch_options  # noqa: E402
from dppa_ui.ui.common import CONCURRENCY, on_space, stop_on_signals  # noqa: E402

demo = build_app()
demo.queue(default_concurrency_limit=CONCURRENCY)

if __name__ == "__main__":
    demo.launch(inbrowser=not on_space(), prevent_thread_lock=True, **launch_options())
    # After launch: gradio may install its own handlers there; ours clean up, then call them.
    stop_on_signals((signal.SIGTERM, signal.SIGINT))
    demo.block_thread()
