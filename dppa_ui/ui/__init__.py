"""The Gradio app: `build_app()` returns the page; `launch_options()` its theme and CSS."""
from .app import build_app, launch_options

__all__ = ["build_app", "launch_options"]
