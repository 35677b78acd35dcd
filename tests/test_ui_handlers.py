"""The app's handlers as plain functions ({key: value} in, {key: value} out) on the demo family:
what each section shows, and that bad input becomes a message and leaves the session usable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dppa_ui import zoo

try:
    zoo.demo_path("base")
except ValueError:
    pytest.skip("the demo family (assets/zoo) is not built", allow_module_level=True)

from dppa_ui.controls import MethodControls  # noqa: E402
from dppa_ui.ui import chat, inspect, lessons, merge, method, models, score  # noqa: E402
from dppa_ui.ui.common import DEFAULT_UI, AppState, controls_from, values_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]


class Progress:
    def __call__(self, *a, **k):
        pass


def ctl(**over) -> dict:
    return {**DEFAULT_UI, **over}


@pytest.fixture(scope="module")
def state():
    s = AppState()
    out = models.load_models({"state": s, "base": "demo:base", "fts": FTS})
    assert out["models_status"].startswith("✓"), out["models_status"]
    s.ws.stats.wait(timeout=60)
    yield s
    s.close()


def view(state, **over) -> dict:
    return {"state": state, "block": 1, "module": "mlp.down_proj", "matrix": "model.layers.1.mlp.down_proj.weight",
            "heat_metric": "mean |δ|", "heat_model": 0, **ctl(**over)}


def test_load_summarises_and_sets_the_pickers(state):
    out = models.load_models({"state": state, "base": "demo:base", "fts": FTS})
    assert "879,232 parameters" in out["summary"] and "4 fine-tune(s)" in out["models_status"]
    assert out["module"]["value"] == "mlp.down_proj" and out["heat_model"]["value"] == 0
    assert out["models_acc"]["open"] is False and "+ 4 fine-tune(s)" in out["models_acc"]["label"]
    state.ws.stats.wait(timeout=60)


def test_bad_model_choices_are_messages_and_keep_the_session(state):
    for base, fts, text in [("demo:base", [], "at least one fine-tune"),
                            ("demo:base", ["demo:base"], "both the base and a fine-tune"),
                            ("/etc", FTS, "outside the allowed model folders")]:
        out = models.load_models({"state": state, "base": base, "fts": fts})
        assert out["models_status"].startswith("⚠") and text in out["models_status"]
    assert state.ws.access.ft_refs == FTS
    out = models.add_model({"state": state, "add_box": "/etc", "base": "demo:base", "fts": FTS})
    assert "outside the allowed model folders" in out["models_status"]
    out = models.add_model({"state": state, "add_box": "nobody/no-such-model", "base": "demo:base", "fts": FTS})
    assert "could not be fetched" in out["models_status"]


def test_threshold_moves_with_the_density_and_the_masks_follow(state):
    state.shown_tensor = None
    lo = inspect.inspect(view(state, preset="ties", density=0.5))
    hi = inspect.inspect(view(state, preset="ties", density=0.1))
    t_lo = [float(r[2]) for r in lo["thresholds"]]
    t_hi = [float(r[2]) for r in hi["thresholds"]]
    assert all(h > l > 0 for l, h in zip(t_lo, t_hi))
    assert lo["matrix"]["value"] == "model.layers.1.mlp.down_proj.weight"    # the mask viewer follows the tensor
    assert "matrix" not in hi                                                # ... only when the tensor changes
    legend = " ".join(t.name for t in hi["histogram"].data if t.showlegend is not False)
    assert "reverse threshold" in legend and "density 0.100" in legend


def test_dp_shows_module_densities_and_its_warnings(state):
    out = inspect.inspect(view(state, preset="dppa", density=0.05))
    dens = {r[1] for r in out["thresholds"]}
    assert len(dens) > 1 and not any("*" in d for d in dens)                # DP's own per-module densities
    assert "DP pruned" in out["inspect_status"] and "density 0" in out["inspect_status"]
    assert any("empty" in r[3] for r in out["thresholds"])                   # a DPA band DP left empty


def test_non_finite_numbers_are_refused(state):
    for bad in (dict(weights="1, inf, 1, 1"), dict(weights="1e400"), dict(lambda_=float("inf")),
                dict(alpha_per_model="demo:reverse=nan,1")):
        out = inspect.inspect(view(state, **bad))
        assert out["inspect_status"].startswith("⚠") and "finite" in out["inspect_status"], (bad, out)
        out = merge.merge({"state": state, "progress": Progress(), **ctl(**bad)})
        assert "finite" in out["merge_status"]


def test_heatmap_and_masks(state):
    out = inspect.heatmap({**view(state), "heat_metric": "DP density", "heat_model": 7})   # picker out of date
    assert out["heatmap_note"] == "" and out["heatmap"].data[0].z is not None
    out = inspect.masks(view(state, preset="ties", density=0.2))
    assert "sign conflicts" in out["mask_numbers"] and len(out["mask_plot"].data) == 6
    out = inspect.masks(view(state, preset="pcb"))
    assert "mean PCB weight" in out["mask_numbers"]


def test_merge_save_and_a_new_merge_clears_the_old_download(state):
    out = merge.merge({"state": state, "progress": Progress(), **ctl(preset="ties", density=0.2)})
    assert out["merge_status"].startswith("✓") and "ties of reverse, cipher, sort, brackets" in out["merge_summary"]
    saved = merge.save({"state": state})
    assert saved["download"]["visible"] and Path(saved["download"]["value"]).is_file()
    again = merge.merge({"state": state, "progress": Progress(), **ctl(preset="dp", density=0.05)})
    assert again["download"] == {"__type__": "update", "value": None, "visible": False}
    assert "DP pruned" in again["merge_summary"]                            # DP's warnings reach the user
    rows = score.leaderboard(state)
    assert rows[-1][1] == "dp" and rows[-1][2] == "reverse, cipher, sort, brackets"


def test_chat_examples_and_the_expected_answer(state):
    merge.merge({"state": state, "progress": Progress(), **ctl(preset="task_arithmetic")})
    rows = chat.example_rows()
    assert {r[0] for r in rows} == set(zoo.domain_names()) and all(len(r) == 3 for r in rows)
    skill, prompt, answer = next(r for r in rows if r[0] == "reverse")
    picked = chat.pick_example({"state": state, "chat_examples": [skill, prompt, answer]})
    assert picked["msg"] == prompt and answer in picked["chat_status"]
    outs = list(chat.chat({"state": state, "msg": prompt, "chat_merged": [], "chat_compare": [],
                           "compare": "demo:reverse", "system": "", "temperature": 0.0, "top_p": 0.9, "max_new": 16}))
    last = outs[-1]
    assert last["chat_compare"][-1]["content"] == answer                    # the fine-tune knows its skill
    assert f"expected `{answer}`" in last["chat_status"] and "reverse ✓" in last["chat_status"]


def test_score_reads_only_files_this_session_uploaded(state, tmp_path):
    merge.merge({"state": state, "progress": Progress(), **ctl(preset="task_arithmetic")})
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "q", "answer": "a", "domain": "private"}\n')
    out = score.score({"state": state, "progress": Progress(), "suite": score.UPLOAD_SUITE, "upload": str(secret)})
    assert "uploaded in this session" in out["score_status"] and "score_plot" not in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    up = score.upload_suite({"state": state, "upload": str(bad)})
    assert "bad.jsonl, line 1: missing key 'answer'" in up["score_status"] and str(tmp_path) not in up["score_status"]
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "reverse: abc", "answer": "cba", "domain": "mine"}\n')
    assert "1 items in 1 domain(s): mine" in score.upload_suite({"state": state, "upload": str(good)})["score_status"]
    out = score.score({"state": state, "progress": Progress(), "suite": score.UPLOAD_SUITE, "upload": str(good)})
    assert out["score_status"].startswith("✓") and set(out["score_json"]["merged"]) == {"mine"}


def test_score_demo_suite_objective_and_leaderboard(state):
    merge.merge({"state": state, "progress": Progress(), **ctl(preset="task_arithmetic")})
    out = score.score({"state": state, "progress": Progress(), "suite": score.DEMO_SUITE, "upload": None})
    assert out["score_status"].startswith("✓")
    assert set(out["score_json"]) == {"merged", "base", *FTS}
    obj = float(re.search(r"\*\*([0-9.]+)\*\*", out["objective"]).group(1))
    assert 0 < obj <= 2 and out["leaderboard"][-1][4] == pytest.approx(obj, abs=1e-3)
    labels = [b.name for b in out["score_plot"].data]
    assert labels[0].startswith("merged (run") and labels[1] == "base"


def test_reload_export_and_yaml(state, tmp_path):
    c = MethodControls(preset="dppa", density=0.3, band_shares=(0.4,), alphas=(2.0, 0.9), dp_lambda=0.1)
    merge.merge({"state": state, "progress": Progress(), **values_of(c)})
    n = state.ws.runs.last.number
    out = score.reload_run({"state": state, "run_no": n})
    assert controls_from({k: (v["value"] if isinstance(v, dict) else v) for k, v in out.items()
                          if k in DEFAULT_UI}) == c
    exp = score.export_yaml({"state": state, "base": "demo:base", "fts": FTS, **values_of(c)})
    assert "merge_method: dppa" in exp["yaml_code"] and Path(exp["yaml_file"]["value"]).is_file()
    back = score.load_yaml_into_controls({"state": state, "yaml_code": exp["yaml_code"]})
    assert back["score_status"].startswith("✓") and back["density"]["value"] == 0.3
    bad = score.load_yaml_into_controls({"state": state, "yaml_code": "merge_method: ties\nmodels: [a, b\n"})
    assert "line 3, column 1" in bad["score_status"] and "density" not in bad
    out = method.load_example({"state": state, "example": "ties"})
    assert out["preset"] == "ties" and out["method_status"].startswith("✓")


def test_preset_view_shows_only_the_controls_it_uses():
    v = method.preset_view({"preset": "ties"})
    assert v["dp_group"]["visible"] is False and v["density"]["visible"] is True and v["seed"]["visible"] is False
    v = method.preset_view({"preset": "dare_linear"})
    assert v["seed"]["visible"] is True
    assert "elects a sign" in method.preset_view({"preset": "ties"})["preset_info"]


def test_handlers_before_loading_say_what_to_do():
    s = AppState()
    assert "load the models first" in inspect.inspect(view(s))["inspect_status"]
    assert "load the models first" in merge.merge({"state": s, "progress": Progress(), **ctl()})["merge_status"]
    assert "load the models first" in score.score({"state": s, "progress": Progress(), "suite": score.DEMO_SUITE,
                                                   "upload": None})["score_status"]


def test_lesson_names_its_real_runs(state):
    merge.merge({"state": state, "progress": Progress(), **ctl(preset="task_arithmetic")})   # runs exist already
    outs = list(lessons.run_lesson("dare_vs_dp", {"state": state, "progress": Progress()}))
    note = outs[-1]["lesson_note_dare_vs_dp"]
    first, second = [r.number for r in state.ws.runs.items[-2:]]
    assert f"run {first} (DP)" in note and f"run {second} (DARE" in note
    rows = outs[-1]["lesson_runs_dare_vs_dp"]["value"]
    assert [r[0] for r in rows] == [first, second] and [r[1] for r in rows] == ["dp", "dare_linear"]
    em = {r[1]: float(re.search(r"reverse ([0-9.]+)", r[3]).group(1)) for r in rows}
    assert em["dp"] > em["dare_linear"]                                      # the lesson's point, measured
    outs = list(lessons.run_lesson("dpa_top_band", {"state": state, "progress": Progress()}))
    assert "splits the kept entries of 4 of 4 fine-tunes" in outs[-1]["lesson_note_dpa_top_band"]


def test_session_close_removes_its_files():
    s = AppState()
    models.load_models({"state": s, "base": "demo:base", "fts": FTS[:1]})
    merge.merge({"state": s, "progress": Progress(), **ctl(preset="task_arithmetic")})
    folder = s.ws.temp_dir
    assert any(folder.iterdir())
    s.close()
    assert not folder.exists()
