"""What the benchmarks that call the app's handlers in-process share: the demo family's fine-tunes,
a progress callback that ignores its calls, and a timer."""
from __future__ import annotations

import time

FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]


def nop(*a, **k):
    """gradio's progress argument, outside gradio."""


def timed(fn, *a):
    """(fn(*a), seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0
