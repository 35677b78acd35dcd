"""Every event of the page works: each handler the page wires (its registry, `page.events`) is
called as gradio calls it from the page — gradio's own preprocessing of the page's default values,
the handler, gradio's postprocessing of what comes back — once in a fresh session and once with the
demo family loaded and merged. A handler that returns a key that is not among its outputs, returns
nothing gradio can take, or raises, fails here, so a new event cannot ship broken."""
from __future__ import annotations

import asyncio
import threading
import time
import traceback

import pytest
from conftest import DEMO_FTS

from gradio.state_holder import SessionState

from dppa_ui.ui import models
from dppa_ui.ui.common import AppState, ui_values

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
FTS = DEMO_FTS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dppa_ui import apl
    from dppa_ui.ui import build_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(apl.CACHE_ENV, str(tmp_path_factory.mktemp("apl-cache")))
        yield build_app()


def bound(demo) -> list[tuple]:
    """(page event, gradio's BlockFunction) for every handler the page bound."""
    by_fn = {id(f.fn): f for f in demo.fns.values()}
    out = [(e, by_fn[id(e.bound)]) for e in demo.page.events]
    assert len(out) > 60 and all(f is not None for _, f in out)
    return out


async def call(demo, block_fn, session: SessionState) -> list:
    """What the page gets back from one event: every yield of a generator, as gradio sends it."""
    inputs = [None if b.stateful else session.config_values[b._id]["props"].get("value") for b in block_fn.inputs]
    out = await demo.process_api(block_fn, inputs, state=session)
    sent = [out["data"]]
    while out.get("is_generating"):
        out = await demo.process_api(block_fn, inputs, state=session, iterator=out["iterator"])
        sent.append(out["data"])
    return sent


def stop_when_scored(state: AppState) -> threading.Thread:
    """Presses the Search tab's Stop (its handler) once the search has run for a second: the
    default budget (40 candidates) then ends with the best so far, as a user's Stop ends it."""
    from dppa_ui.ui import search

    def watch():
        t0 = time.monotonic()
        while state.running != "search" and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        time.sleep(1.0)
        search.stop({"state": state})
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def run_all(demo, session_for, stop_search: AppState | None = None) -> list[str]:
    """Calls every bound event; the failures, one line each with the handler and its error."""
    failures, took = [], []
    for event, block_fn in bound(demo):
        session = session_for(event)
        if stop_search is not None and event.fn.__name__ == "start":
            stop_when_scored(stop_search)
        t0 = time.perf_counter()
        try:
            sent = asyncio.run(call(demo, block_fn, session))
            assert sent and all(len(d) == len(block_fn.outputs) for d in sent), sent
        except Exception as e:  # noqa: BLE001 - collected, so one run names every broken event
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"{event.fn.__name__}({', '.join(event.inputs[:3])}…): {type(e).__name__}: {e} "
                            f"[{where.filename.rsplit('/', 1)[-1]}:{where.lineno}]")
        took.append((time.perf_counter() - t0, event.fn.__name__))
    print("slowest:", ", ".join(f"{n} {t:.1f} s" for t, n in sorted(took, reverse=True)[:12]))
    return failures


def state_id(demo) -> int:
    return demo.page["state"]._id


@pytest.fixture(scope="module")
def loaded():
    s = AppState()
    assert models.load_models({"state": s, "base": "demo:base", "fts": FTS})["models_status"].startswith("✓")
    s.ws.stats.wait(timeout=60)
    from dppa_ui.ui import merge
    assert merge.merge({"state": s, "progress": lambda *a, **k: None, **ui_values()})["merge_status"].startswith("✓")
    yield s
    s.close()


def test_every_event_works_with_the_demo_family_loaded_and_merged(demo, loaded):
    """The page's defaults with the demo family loaded and one merge done: every handler runs its
    main path (a lesson reloads other models: the next event finds the family as the page loads it)."""
    def with_family(event):
        if loaded.ws.access.ft_refs != FTS or loaded.ws.runs.last is None:
            models.load_models({"state": loaded, "base": "demo:base", "fts": FTS})
        loaded.cancel.clear()
        session = SessionState(demo)
        session[state_id(demo)] = loaded
        return session
    assert run_all(demo, with_family, stop_search=loaded) == []


def test_every_event_works_in_a_fresh_session(demo):
    """Nothing loaded: each handler says what to do first (or works without models); a lesson
    loads its own models. (After the loaded pass: the scores of the base and the fine-tunes,
    shared by every session, are computed by then.)"""
    def fresh(event):
        return SessionState(demo)
    assert run_all(demo, fresh) == []


