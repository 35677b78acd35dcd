"""Long work: a session's mark of what runs (so Cancel and Stop can say what they stopped), and
work (auto α, auto λ, a search) in a thread of this process, so a generator handler can stream its
log and rows to the page while it runs."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable


@contextlib.contextmanager
def running(state, what: str):
    """Marks the session's long job (what Cancel or Stop would stop) while it runs."""
    state.running = what
    try:
        yield
    finally:
        state.running = None


def search_threads(ws) -> int | None:
    """Torch threads for a search: DPPA_UI_SEARCH_THREADS (0 = torch's default), else 1 for small
    models. Their candidates are tiny: OpenMP threads spin-wait on each other, so on a busy
    machine one thread is many times faster, on a quiet one a little slower (README, The app)."""
    env = os.environ.get("DPPA_UI_SEARCH_THREADS")
    if env is not None and env.strip().isdigit():
        return int(env) or None
    return 1 if ws.access is not None and ws.access.n_params < 50_000_000 else None


class Job:
    """Runs `work(log, on_eval)` in a thread (with `threads` torch threads for its duration),
    collecting its log lines and evaluation rows, so a generator handler can stream them."""

    def __init__(self, work: Callable[[Callable, Callable], Any], threads: int | None = None):
        self.lines: list[str] = []
        self.rows: list[dict] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(work, threads), daemon=True, name="dppa-ui-search").start()

    def _run(self, work, threads) -> None:
        import torch
        before = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)       # in this thread: OpenMP's setting is per thread
            self.result = work(self.lines.append, self.rows.append)
        except BaseException as e:  # noqa: BLE001 - handed to the handler, which shows it
            self.error = e
        finally:
            torch.set_num_threads(before)
            self.done.set()

    def updates(self, every: float = 0.5):
        """Yields while the work runs, at most once per `every` seconds and only when a line or a
        row arrived; returns when it is done."""
        seen = (0, 0)
        while not self.done.wait(every):
            now = (len(self.lines), len(self.rows))
            if now != seen:
                seen = now
                yield
