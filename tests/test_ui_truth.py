"""What the page says is true (issue 16), through the handlers: no view shows another method's or
model set's figure, a problem is said once where it happened (no toast per event, nothing clamped
silently), numbers are rounded for people, messages name no server path, and the small things
(Cancel after the merge finished, the leaderboard's numbers, auto λ only for PCB, the live
prune-rate hint, the saved size) say what happened."""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import pytest
from conftest import DEMO_FTS

from dppa_ui import figures
from dppa_ui.ui import inspect, merge, method, models, score
from dppa_ui.ui.common import AppState, controls_from, model_roots, ui_values
from dppa_ui.ui.controls_ui import preset_view

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
FTS = DEMO_FTS
BOUNDS = {"density": (0.01, 1.0), "lambda_": (0.0, 3.0), "pcb_ratio": (0.01, 1.0)}


class Progress:
    def __call__(self, *a, **k):
        pass


@pytest.fixture()
def state():
    s = AppState()
    assert models.load_models({"state": s, "base": "demo:base", "fts": FTS})["models_status"].startswith("✓")
    yield s
    s.close()


def view(state, **over) -> dict:
    return {"state": state, "block": 1, "module": "mlp.down_proj", "matrix": "model.layers.1.mlp.down_proj.weight",
            "heat_metric": "mean |δ|", "heat_model": 0, **ui_values(**over)}


def state_line(fig) -> str:
    """The one-line state a view draws instead of a figure ('' when it drew one)."""
    return "" if fig.data else " ".join(a.text for a in fig.layout.annotations)


def test_a_refused_method_replaces_every_view_with_why(state):
    """Slerp refused with four fine-tunes: no view keeps the previous method's figure ("— pcb")."""
    assert "— pcb" in inspect.inspect(view(state, preset="pcb"))["histogram"].layout.title.text
    out = inspect.inspect(view(state, preset="slerp"))
    assert "slerp takes exactly 1 model" in state_line(out["histogram"]) and out["thresholds"] == []
    masks = inspect.masks(view(state, preset="slerp"))
    assert "slerp takes exactly 1 model" in state_line(masks["mask_plot"]["value"])
    assert masks["method_plot"]["visible"] is False and masks["merged_plot"]["visible"] is False
    heat = inspect.heatmap(view(state, preset="slerp"))
    assert "slerp" in state_line(heat["heatmap"])


def test_loading_other_models_resets_the_per_model_settings_and_says_so(state):
    out = models.load_models({"state": state, "base": "demo:base", "fts": FTS[:1]})
    assert out["weights"] == "" and out["alpha_per_model"] == ""
    assert "weights and per-model α were reset" in out["models_status"]
    again = models.load_models({"state": state, "base": "demo:base", "fts": FTS[:1]})
    assert "weights" not in again and "reset" not in again["models_status"]        # the same models: kept
    # what the old weights would have said, now named beside the controls
    bad = method.check({**view(state, weights="1, 1, 1, 1, 1")}, BOUNDS)
    assert bad["method_status"] == "⚠ weights: 5 given for 1 fine-tune: give one per fine-tune, or a single number for all"


def test_a_problem_is_one_line_beside_the_controls_never_a_toast(state):
    """gr.Warning toasts were raised once per view (six for one bad weight); now nothing warns, the
    check says it once and each view draws its state."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # gr.Warning also warns: it would raise here
        checked = method.check(view(state, weights="1, x"), BOUNDS)
        outs = [fn(view(state, weights="1, x")) for fn in (inspect.inspect, inspect.heatmap, inspect.masks)]
    assert checked["method_status"].count("⚠") == 1 and "weights '1, x'" in checked["method_status"]
    assert all(not str(o.get(k, "")).startswith("⚠") for o in outs for k in ("inspect_status", "heatmap_note",
                                                                             "mask_numbers"))


def test_a_slider_value_typed_outside_its_range_is_named_and_shown_as_used(state):
    """A negative density was clamped to 0.01 after a bare "Error" while the views kept 0.2: the
    check now says so and sets the slider to what the views then draw."""
    out = method.check(view(state, density=-0.5), BOUNDS)
    assert out["method_status"] == "⚠ density -0.5 is outside the slider's range 0.01 to 1: set to 0.01"
    assert out["density"]["value"] == 0.01 and "keeps 1%, prunes 99%" in out["density"]["info"]
    # over the API (no slider): refused by name, nothing merged
    refused = merge.merge({"state": state, "progress": Progress(), **ui_values(density=-0.5)})
    assert "density -0.5 is out of range" in refused["merge_status"] and state.ws.runs.last is None
    # the slider passes the value on (gradio's own check would answer with a bare "Error")
    from dppa_ui.ui import build_app
    demo = build_app()
    assert demo.page["density"].preprocess(-0.5) == -0.5


def test_every_other_slider_typed_outside_its_range_is_named_not_an_error_badge(state):
    """Chat's sampling sliders, Inspect's block and SMILE's ranks answered a typed out-of-range value
    with gradio's bare "Error": each now passes it on and its section's line names it and the range."""
    from dppa_ui.ui import build_app, chat
    demo = build_app()
    for key in ("temperature", "top_p", "max_new", "block", "smile_rank", "smile_router", "smile_k"):
        assert demo.page[key].preprocess(999) == 999, key
    talk = {"state": state, "msg": "abc", "chat_merged": [], "chat_compare": [], "compare": "none", "system": "",
            "temperature": 0.0, "top_p": 0.9, "max_new": 16}
    for key, bad, said in (("temperature", 5, "Temperature 5 is outside its range 0 to 2"),
                           ("top_p", 0.0, "Top-p 0 is outside its range 0.05 to 1"),
                           ("max_new", 0, "Max new tokens 0 is outside its range 1 to")):
        outs = list(chat.chat({**talk, key: bad}))
        assert len(outs) == 1 and said in outs[0]["chat_status"], (key, outs)
    out = inspect.inspect(view(state, block=7))
    assert "Block 7 is outside its range 0 to 3" in state_line(out["histogram"]) and out["thresholds"] == []
    smile = {"state": state, "smile_rank": 16, "smile_full": False, "smile_router": 8, "smile_k": 1,
             "smile_scope": "blocks (paper)"}
    assert "would build" in merge.smile_estimate(smile)["smile_size"]
    assert "num_experts_per_tok 9 is outside its range 1 to 8" in merge.smile_estimate({**smile, "smile_k": 9})["smile_size"]
    assert "rank_of_expert must be a whole number" in merge.smile_estimate({**smile, "smile_rank": 2.5})["smile_size"]


def test_the_prune_rate_hint_follows_the_density(state):
    assert "keeps 29.2%, prunes 70.8%" in method.check(view(state, density=0.292), BOUNDS)["density"]["info"]
    assert method.check(view(state), BOUNDS)["method_status"] == ""


def test_auto_lambda_is_offered_only_where_pcb_combines(state):
    assert preset_view({"preset": "pcb"})["auto_lambda_group"]["visible"] is True
    for other in ("slerp", "ties", "dppa"):
        assert preset_view({"preset": other})["auto_lambda_group"]["visible"] is False
    outs = list(method.auto_lambda({"state": state, **ui_values(preset="slerp")}))
    assert len(outs) == 1 and "auto λ is PCB's search" in outs[0]["lambda_status"]


def test_cancel_says_how_the_merge_ended_and_the_leaderboard_has_no_gap(state):
    assert merge.cancel({"state": state})["merge_status"] == "nothing to cancel: no merge is running"
    done = merge.merge({"state": state, "progress": Progress(), **ui_values(preset="ties")})
    assert done["merge_status"].startswith("✓ run 1")
    assert "the last one, run 1, had finished" in merge.cancel({"state": state})["merge_status"]
    state.cancel.set()                             # a merge cancelled at its first tensor ...

    def cancelled_merge(v):
        with merge.running(state, "merge"):
            return state.ws.merge(state.ws.config(method.controls_of(v)), cancel=lambda: True)
    with pytest.raises(InterruptedError):
        cancelled_merge(ui_values(preset="ties"))
    again = merge.merge({"state": state, "progress": Progress(), **ui_values(preset="dare_ties")})
    assert again["merge_status"].startswith("✓ run 2")          # ... takes no number
    assert [r[0] for r in score.leaderboard(state)] == [1, 2]


def test_saved_size_is_the_zip_s(state):
    merge.merge({"state": state, "progress": Progress(), **ui_values(preset="task_arithmetic")})
    out = merge.save({"state": state})
    path = Path(out["download"]["value"])
    assert zipfile.is_zipfile(path)
    assert f"{path.name}, {figures.fmt(path.stat().st_size / 1e6)} MB" in out["merge_status"]


def test_messages_name_no_server_path(state, tmp_path):
    roots = [str(r) for r in model_roots()]
    refused = models.add_model({"state": state, "add_box": "/etc/ssl", "base": "demo:base", "fts": FTS})
    assert "outside the allowed model folders" in refused["models_status"]
    assert not any(r in refused["models_status"] for r in roots) and "assets/zoo" in refused["models_status"]
    hub = models.add_model({"state": state, "add_box": "nobody/no-such-model", "base": "demo:base", "fts": FTS})
    assert "cannot reach the hub" in hub["models_status"] and "LocalEntryNotFoundError" not in hub["models_status"]
    from dppa_ui.ui import app
    demo = app.build_app()
    info = demo.page["add_box"].info
    assert not any(r in info for r in roots) and "DPPA_UI_MODEL_ROOTS" in info


def test_a_txt_suite_upload_is_named_and_explained(state, tmp_path):
    notes = tmp_path / "my suite.txt"
    notes.write_text('{"prompt": "reverse: ab", "answer": "ba", "domain": "reverse"}\n')
    out = score.upload_suite({"state": state, "upload": str(notes)})
    assert out["score_status"].startswith("⚠ my suite.txt is not a suite file: upload a .jsonl file")
    assert str(tmp_path) not in out["score_status"]


def test_a_searched_value_reaches_the_controls_rounded_and_said(state):
    """An optimizer's density (7/24) was printed as 0.2916666666666667 in the density slider."""
    from dppa_ui import search as core_search
    from dppa_ui.ui import search
    cfg = state.ws.config(controls_from(ui_values(preset="ties", density=7 / 24)))
    spec = core_search.parse_search(cfg, {"parameters": {"density": [0.1, 0.5]}})
    res = core_search.SearchResult(config=cfg, values={"density": 7 / 24}, objective=0.5, spec=spec)
    out = search.load_best({"state": state, "search_best": res})
    assert out["density"]["value"] == 0.292
    assert "density 0.291667 → 0.292" in out["search_status"] and "YAML below keeps the exact" in out["search_status"]


def test_numbers_are_rounded_for_people(state):
    out = inspect.inspect(view(state, preset="dppa", density=0.2))
    assert all(len(r[1].rstrip(" *").replace(".", "").lstrip("0")) <= 3 for r in out["thresholds"])   # not 0.2916666
    legend = " ".join(t.name for t in out["histogram"].data if t.name)
    assert "0.2916666" not in legend and "density 0." in legend
    done = merge.merge({"state": state, "progress": Progress(), **ui_values(preset="ties", density=0.2916666)})
    assert "29.2%" in done["merge_summary"]


def test_the_conflict_and_pcb_weight_panels_use_no_other_fine_tune_s_colour(state):
    """Sign conflicts were drawn in brackets' red and PCB's weights in sort's green: the conflicts
    are near-black now, and each fine-tune's weights are in its own colour."""
    fig = inspect.masks(view(state, preset="pcb"))["mask_plot"]["value"]
    top = [t.colorscale[-1][1] for t in fig.data]            # kept x4, winner, conflicts, PCB weights x4
    assert top[5] == figures.MERGED_COLOR
    assert top[:4] == top[6:] == [figures.color(i) for i in range(4)]


def test_the_plan_reads_as_settings_not_python(state):
    """The plan printed Python's None and 5.0 and "0.00 GB" for the demo family."""
    exp = score.export_yaml({"state": state, "base": "demo:base", "fts": FTS, **ui_values(preset="dppa")})
    plan = score.plan_yaml({"state": state, "yaml_code": exp["yaml_code"]})["yaml_plan"]
    assert "settings: dp_lambda 0.08, dp_outlier_m 5," in plan and "normalize false" in plan
    assert "None" not in plan and "0.00 GB" not in plan and "time: under 1 s" in plan
    assert re.search(r"estimated peak memory: [1-9][0-9.]* [kM]B; disk: [1-9][0-9.]* MB", plan), plan
    assert not any(r in plan for r in map(str, model_roots()))


def test_pcb_whole_model_statistics_run_in_the_background_and_the_views_follow(state, monkeypatch):
    """PCB at scope model needs passes over the whole model (minutes at 7 B): a view no longer
    blocks its request on them; it says they are being computed, the timer runs, and its tick
    redraws the views once they are there."""
    import threading
    import time
    from dppa_ui import analysis
    from dppa_ui.workspace import pcbstats
    gate, real = threading.Event(), pcbstats.pcb_model_stats

    def held(*a, **k):
        assert gate.wait(60)
        return real(*a, **k)
    monkeypatch.setattr(pcbstats, "pcb_model_stats", held)
    monkeypatch.setattr(analysis, "PCB_WAIT", 0.05)
    v = view(state, preset="pcb")
    inspect.inspect(v)                  # the chain's first view (the histogram needs no PCB statistics)
    state.ws.stats.start(5.0)             # DP's statistics first: the status line names those while they run
    deadline = time.monotonic() + 120
    while state.ws.stats_progress(5.0).state != "done" and time.monotonic() < deadline:
        time.sleep(0.1)
    pending = inspect.masks(v)
    assert "PCB's whole-model statistics (scope: model, as the merge computes them): computing" \
        in state_line(pending["mask_plot"]["value"])
    assert inspect.apl_view(v)["stats_timer"].active is True
    assert inspect.stats_tick(v)["stats_status"].startswith("⟳ PCB's whole-model statistics computing")
    gate.set()
    state.ws.pcb.get(state.ws.config(controls_from(v)), state.ws.align(state.ws.config(controls_from(v))), None)
    done = inspect.stats_tick(v)
    assert done["stats_timer"].active is False and state_line(done["mask_plot"]["value"]) == ""
    assert "— pcb" in done["histogram"].layout.title.text


def test_auto_lambda_stopped_before_its_first_candidate_says_so_not_failed(state, monkeypatch):
    """Stop pressed before PCB's λ search scored a candidate gave "⚠ λ search failed"."""
    def stopped(*a, **k):
        raise InterruptedError("search cancelled before any candidate was scored")
    monkeypatch.setattr(state.ws, "search", stopped)
    outs = list(method.auto_lambda(view(state, preset="pcb")))
    assert outs[-1]["lambda_status"] == ("■ auto λ stopped early, before any candidate was scored: the weights are "
                                         "unchanged")
