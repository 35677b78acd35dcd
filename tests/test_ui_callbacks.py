"""The app's callbacks as plain functions (no server, no browser) on the committed demo family:
config <-> controls, inspect numbers, merge/cancel, chat, score, leaderboard, save, and every kind
of bad input leaving the session usable.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("gradio")

from dppa_ui import session, zoo  # noqa: E402
from dppa_ui.config import PRESETS, load_config  # noqa: E402
from dppa_ui.ui import callbacks as cb  # noqa: E402
from dppa_ui.ui.lessons import LESSON_OUTPUTS, LESSONS, run_lesson  # noqa: E402

try:
    zoo.demo_path("base")
    HAVE_ZOO = True
except ValueError:
    HAVE_ZOO = False
needs_zoo = pytest.mark.skipif(not HAVE_ZOO, reason="the demo family (assets/zoo) is not built")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # gr.Warning outside a request warns
NOP = lambda *a, **k: None  # noqa: E731  (stands in for gr.Progress outside a request)
FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]


def method(**over) -> list:
    v = dict(cb.DEFAULTS)
    v.update(over)
    return [v[k] for k in cb.METHOD_KEYS]


def failed(status: str) -> bool:
    return status.startswith("⚠")


@pytest.fixture(scope="module")
def loaded():
    """One session with the demo base and its four fine-tunes loaded (shared: read-only tests)."""
    st = cb.new_state()
    out = cb.load_models(st, "demo:base", FTS)
    assert not failed(out[-1]), out[-1]
    yield st
    st.close()


# ------------------------------------------------------------------------------ config <-> controls

@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "assets" / "examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_yaml_round_trips_through_the_controls(path):
    cfg = load_config(path)
    v = cb.controls_from_config(cfg)
    rebuilt = load_config(cb.build_config(v["base"], v["fts"], *[v[k] for k in cb.METHOD_KEYS]))
    assert rebuilt.to_dict() == cfg.to_dict()


def test_one_example_per_preset_on_the_demo_family():
    files = cb.example_files()
    assert set(files) == set(PRESETS)
    for name, path in files.items():
        cfg = load_config(path)
        assert cfg.merge_method == name and cfg.base_model == "demo:base"
        assert all(m.model.startswith("demo:") for m in cfg.models)


def test_build_config_maps_prune_rate_bands_and_alphas():
    d = cb.build_config("demo:base", FTS[:2], *method(preset="dppa", prune_rate=0.9, n_bands=3, bound1=0.25,
                                                      bound2=0.5, alpha1=2.0, alpha2=1.5, alpha3=1.0))
    cfg = load_config(d)
    m = cfg.models[0]
    assert m.density == pytest.approx(0.1)
    assert m.partitions == pytest.approx([0.025, 0.05, 0.1])
    assert m.amplification == [2.0, 1.5, 1.0]
    # per-model alpha (the auto-alpha result) overrides the sliders for that model only
    d = cb.build_config("demo:base", FTS[:2], *method(preset="dppa", alpha_per_model="demo:cipher=2.5,1.2"))
    cfg = load_config(d)
    assert cfg.models[0].amplification == [1.8, 1.0] and cfg.models[1].amplification == [2.5, 1.2]


@pytest.mark.parametrize("weights,err", [("1, 2, 3", "3 weights for 2"), ("a, b", "numbers")])
def test_bad_weights_name_the_problem(weights, err):
    with pytest.raises(cb.UserError, match=err):
        cb.build_config("demo:base", FTS[:2], *method(weights=weights))


def test_preset_view_shows_only_the_controls_the_preset_uses():
    def shown(preset):
        _, prune, dp, dpa, pcb, seed = cb.preset_view(preset)
        return {k for k, u in zip(("prune", "dp", "dpa", "pcb", "seed"), (prune, dp, dpa, pcb, seed)) if u["visible"]}
    assert shown("task_arithmetic") == set()
    assert shown("ties") == {"prune"}
    assert shown("dare_linear") == {"prune", "seed"}
    assert shown("dp") == {"prune", "dp"}
    assert shown("dppa") == {"prune", "dp", "dpa"}
    assert shown("pcb") == {"pcb"}
    info = cb.preset_view("ties")[0]
    assert "arxiv.org" in info and "prune **magnitude**" in info


# ------------------------------------------------------------------------------ load + inspect

@needs_zoo
def test_load_summarises_the_models(loaded):
    st = cb.new_state()
    summary, block, module, matrix, heat_model, compare, status = cb.load_models(st, "demo:base", FTS[:2])
    assert status.startswith("✓")
    assert "parameters" in summary and "demo:cipher" in summary
    assert module["value"] in module["choices"] and matrix["value"] in matrix["choices"]
    assert compare["choices"] == ["none", "base", *FTS[:2]]


@needs_zoo
def test_threshold_moves_with_the_prune_rate(loaded):
    def row(rate):
        fig, table, name, status = cb.inspect(loaded, 0, "mlp.down_proj", *method(preset="ties", prune_rate=rate))
        assert status == "" and "down_proj" in name
        assert fig.data, "the histogram has traces"
        return table[0]
    lo, hi = row(0.5), row(0.95)
    assert hi[2] > lo[2] > 0                      # keep |δ| ≥ threshold rises as more is pruned
    assert hi[4] < lo[4] and lo[4] == pytest.approx(50.0, abs=0.1)   # kept %
    # random pruning has no magnitude threshold
    dare = cb.inspect(loaded, 0, "mlp.down_proj", *method(preset="dare_linear", prune_rate=0.9))[1][0]
    assert dare[2] is None and dare[4] == pytest.approx(10.0, abs=2.0)


@needs_zoo
def test_inspect_shows_an_empty_dpa_band(loaded):
    """DP lowers a module's density below the top band's bound, so that band holds no entries of
    the tensor and has no edge: the table says so instead of the callback failing."""
    fig, table, name, status = cb.inspect(loaded, 0, "mlp.down_proj", *method(preset="dppa", prune_rate=0.95))
    assert status == "" and fig.data
    edges = {row[0]: row[3] for row in table}
    assert edges["demo:sort"] == "empty"                     # its module density 0.024 < bound 0.025
    assert all(e and e != "empty" for m, e in edges.items() if m != "demo:sort")


@needs_zoo
def test_heatmap_and_masks(loaded):
    fig, status = cb.heatmap(loaded, "DP density", 1, *method(preset="dp", prune_rate=0.8))
    assert status == "" and fig.data
    matrix = loaded.ws.tensor_name(1, "self_attn.q_proj")
    fig, numbers, status = cb.masks(loaded, matrix, *method(preset="ties", prune_rate=0.8))
    assert status == "" and "sign conflicts" in numbers and "kept" in numbers


# ------------------------------------------------------------------------------ bad input

@needs_zoo
def test_bad_model_choices_are_messages_and_keep_the_session(loaded):
    st = cb.new_state()
    assert not failed(cb.load_models(st, "demo:base", FTS[:1])[-1])
    ws = st.ws
    for base, fts, words in [("demo:base", [], "at least one fine-tune"),
                             (None, FTS[:1], "base"),
                             ("demo:base", ["demo:base"], "both the base and a fine-tune"),
                             ("demo:base", ["/etc"], "outside the allowed model folders"),
                             ("demo:base", ["nobody/no-such-model"], "hub")]:
        out = cb.load_models(st, base, fts)
        assert failed(out[-1]) and words in out[-1], out[-1]
        assert all(isinstance(u, dict) and u.get("__type__") == "update" for u in out[:-1])   # nothing changed
        assert st.ws is ws and st.ws.ft_refs == FTS[:1]                                    # still loaded
    assert cb.inspect(st, 0, "mlp.up_proj", *method())[-1] == ""                            # still usable


@needs_zoo
def test_incompatible_models_name_the_tensors(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    base_cfg = json.loads((zoo.demo_path("base") / "config.json").read_text())
    cfg = LlamaConfig(hidden_size=base_cfg["hidden_size"], num_hidden_layers=base_cfg["num_hidden_layers"],
                      num_attention_heads=base_cfg["num_attention_heads"],
                      num_key_value_heads=base_cfg.get("num_key_value_heads", base_cfg["num_attention_heads"]),
                      intermediate_size=base_cfg["intermediate_size"] + 8, vocab_size=base_cfg["vocab_size"])
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "other"))
    monkeypatch.setattr(session, "MODEL_ROOTS", [*session.MODEL_ROOTS, tmp_path.resolve()])
    st = cb.new_state()
    base, fts, status = cb.add_model(st, str(tmp_path / "other"), "demo:base", FTS[:1])
    assert status.startswith("✓") and str((tmp_path / "other").resolve()) in fts["value"]
    out = cb.load_models(st, "demo:base", fts["value"])
    assert failed(out[-1]) and "cannot be merged" in out[-1] and "mlp.up_proj.weight" in out[-1]
    assert st.ws is None


def test_add_box_refuses_paths_outside_the_roots_and_unknown_hub_ids(tmp_path):
    st = cb.new_state()
    for text, words in [("/etc", "outside the allowed model folders"), ("../../etc", "outside"),
                        ("nobody/no-such-model", "hub"), ("", "type a local model folder")]:
        *_, status = cb.add_model(st, text, "demo:base", [])
        assert failed(status) and words in status, status
    assert st.added == []


def test_callbacks_before_loading_say_what_to_do():
    st = cb.new_state()
    assert "load the models first" in cb.inspect(st, 0, "mlp.up_proj", *method())[-1]
    assert "load the models first" in cb.merge(st, *method(), progress=NOP)[-1]
    assert "load the models first" in cb.score(st, cb.DEMO_SUITE, None, progress=NOP)[-1]
    assert "load the models first" in list(cb.chat(st, "hi", [], [], "base", "", 0, 0.9, 8))[-1][-1]


# ------------------------------------------------------------------------------ merge, chat, score

@pytest.fixture(scope="module")
def merged():
    st = cb.new_state()
    assert not failed(cb.load_models(st, "demo:base", FTS)[-1])
    summary, board, status = cb.merge(st, *method(preset="ties", prune_rate=0.8), progress=NOP)
    assert status.startswith("✓"), status
    yield st, summary, board
    st.close()


@needs_zoo
def test_merge_summary_and_leaderboard(merged):
    st, summary, board = merged
    import re
    assert "Run 1: ties" in summary and "on **cpu**" in summary
    kept = [float(x) for x in re.findall(r"` (\d+\.\d)%", summary)]
    assert len(kept) == len(FTS) and all(abs(k - 20.0) < 0.5 for k in kept)
    assert board[0][:2] == [1, "ties"] and "density 0.2" in board[0][2]
    assert st.ws.merged is not None


@needs_zoo
def test_cancel_stops_a_merge_and_keeps_the_previous_one(merged):
    st, *_ = merged
    before = st.ws.merged
    out = cb.merge(st, *method(preset="task_arithmetic"), progress=lambda *a, **k: cb.cancel_merge(st))
    assert failed(out[-1]) and "cancelled" in out[-1]
    assert st.ws.merged is before and len(st.runs) == 1


@needs_zoo
def test_chat_streams_a_reply_and_the_compared_model(merged):
    st, *_ = merged
    steps = list(cb.chat(st, "reverse: abc", [], [], "base", "", 0.0, 0.9, 16))
    hist, hist_c, box, status = steps[-1]
    assert status == "" and box == ""
    assert [m["role"] for m in hist] == ["user", "assistant"] and hist[0]["content"] == "reverse: abc"
    assert [m["role"] for m in hist_c] == ["user", "assistant"]
    assert len(steps) >= 2                                      # streamed: empty reply first, then text
    bad = list(cb.chat(st, "   ", hist, hist_c, "base", "", 0.0, 0.9, 16))[-1]
    assert failed(bad[-1]) and "type a message" in bad[-1]


def test_chat_generation_failure_is_a_message(monkeypatch):
    from types import SimpleNamespace

    def broken_stream(model, tok, history, message, **kw):
        yield "partial"
        raise RuntimeError("generation failed: CUDA out of memory")
    monkeypatch.setattr(cb, "chat_stream", broken_stream)
    st = cb.new_state()
    st.ws = SimpleNamespace(merged=object(), model_for=lambda which: ("model", "tok"))
    steps = list(cb.chat(st, "hi", [], [], "none", "", 0.0, 0.9, 8))
    hist, hist_c, box, status = steps[-1]
    assert failed(status) and "generation failed" in status
    assert hist[-1] == {"role": "assistant", "content": "partial"} and hist_c == [] and box == ""


@needs_zoo
def test_score_bad_jsonl_then_demo_suite(merged, tmp_path):
    st, *_ = merged
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\nnot json\n')
    out = cb.score(st, cb.UPLOAD_SUITE, str(bad), progress=NOP)
    assert failed(out[-1]) and "line 2" in out[-1]
    out = cb.score(st, cb.UPLOAD_SUITE, None, progress=NOP)
    assert failed(out[-1]) and "upload" in out[-1]
    fig, obj_md, board, results, status = cb.score(st, cb.DEMO_SUITE, None, progress=NOP)
    assert status.startswith("✓"), status
    assert set(results) == {"merged", "base", *FTS}
    for per in results.values():
        assert set(per) == set(zoo.domain_names())
        for s in per.values():
            assert 0.0 <= s["em"] <= 1.0 and 0.0 <= s["smooth"] <= 1.0 and s["n"] == cb.SCORE_PER_DOMAIN
    assert "Objective" in obj_md and board[0][3] is not None
    assert fig.data and len(fig.data) == 2 + len(FTS)
    # a good upload works too, after the bad one
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(it) + "\n" for it in cb.demo_items(3)))
    assert cb.score(st, cb.UPLOAD_SUITE, str(good), progress=NOP)[-1].startswith("✓")


@needs_zoo
def test_scores_follow_a_newly_loaded_base():
    """Loading another base in the same session scores that base, not the previous one's cache."""
    st = cb.new_state()
    try:
        assert not failed(cb.load_models(st, "demo:base", ["demo:reverse"])[-1])
        assert not failed(cb.merge(st, *method(preset="task_arithmetic"), progress=NOP)[-1])
        first = cb.score(st, cb.DEMO_SUITE, None, progress=NOP)[3]
        assert not failed(cb.load_models(st, "demo:sort", ["demo:reverse"])[-1])
        assert not failed(cb.merge(st, *method(preset="task_arithmetic"), progress=NOP)[-1])
        second = cb.score(st, cb.DEMO_SUITE, None, progress=NOP)[3]
    finally:
        st.close()
    assert first["base"]["sort"]["em"] == 0.0          # demo:base cannot answer in chat form
    assert second["base"]["sort"]["em"] >= 0.8         # demo:sort, now the base, can


@needs_zoo
def test_reload_export_and_save(merged):
    st, *_ = merged
    *controls, status = cb.reload_run(st, 1)
    assert status.startswith("✓")
    base, fts, *mv = [c["value"] if isinstance(c, dict) else c for c in controls]
    assert base == "demo:base" and fts == FTS and mv[0] == "ties" and mv[1] == pytest.approx(0.8)
    text, file_u, status = cb.export_yaml(st, base, fts, *mv)
    assert status.startswith("✓") and Path(file_u["value"]).read_text() == text
    assert load_config(text).to_dict() == load_config(st.runs[0]["config"]).to_dict()
    assert failed(cb.reload_run(st, 7)[-1])
    file_u, status = cb.save_model(st)
    assert status.startswith("✓") and file_u["value"].endswith(".zip")
    folder = st.saved
    assert (folder / "dppa_merge.yaml").is_file() and (folder / "README.md").is_file()
    from safetensors.torch import load_file
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in st.ws.merged.state_dict.items() if k in saved)


@needs_zoo
def test_push_is_off_offline(merged):
    st, *_ = merged
    status = cb.push_to_hub(st, "me/merged", "hf_xxx", True)
    assert failed(status) and "offline" in status


@needs_zoo
def test_session_close_removes_its_files():
    st = cb.new_state()
    cb.load_models(st, "demo:base", FTS[:1])
    cb.merge(st, *method(preset="task_arithmetic"), progress=NOP)
    cb.save_model(st)
    cb.export_yaml(st, "demo:base", FTS[:1], *method())
    dirs = [st.saved.parent, st.tmp]
    assert all(d.is_dir() for d in dirs)
    cb.close_state(st)
    assert not any(d.exists() for d in dirs)


def test_yaml_with_problems_is_refused_without_touching_controls():
    st = cb.new_state()
    out = cb.load_yaml_into_controls(st, "merge_method: slerp\nbase_model: demo:base\nmodels: [demo:reverse]\n")
    assert failed(out[-1]) and "not supported" in out[-1]
    assert all(u.get("__type__") == "update" and len(u) == 1 for u in out[:-1])


# ------------------------------------------------------------------------------ lessons

def test_lessons_name_what_to_look_at():
    assert len(LESSONS) == 4
    for lesson in LESSONS.values():
        assert lesson.look and len(lesson.runs) >= 2
        for run in lesson.runs:
            v = {**cb.DEFAULTS, **run}
            load_config(cb.build_config("demo:base", [f"demo:{n}" for n in lesson.fts],
                                        *[v[k] for k in cb.METHOD_KEYS]))


@needs_zoo
def test_dare_vs_dp_lesson_runs_both_merges_and_scores_them():
    st = cb.new_state()
    steps = list(run_lesson(st, "dare_vs_dp", progress=NOP))
    last = dict(zip(LESSON_OUTPUTS, steps[-1]))
    assert "done" in last["lesson_note"] and "leaderboard" in last["lesson_note"]
    assert [r["method"] for r in st.runs] == ["dp", "dare_linear"]
    assert all(r["objective"] is not None and r["scores"] for r in st.runs)
    assert st.runs[0]["config"]["models"][0]["parameters"]["density"] == pytest.approx(0.1)
    st.close()


# ------------------------------------------------------------------------------ the page

def test_app_starts_without_the_demo_family_and_says_how_to_get_it(tmp_path, monkeypatch):
    import gradio as gr

    from dppa_ui.ui import build_app
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "no-zoo")
    refs, base, fts, note = cb.demo_choices()
    assert refs == [] and base is None and "zoo build" in note
    demo = build_app()
    blocks = demo.blocks.values()
    summary = next(b for b in blocks if getattr(b, "elem_id", None) == "models-summary")
    assert "zoo build" in summary.value
    state = next(b for b in blocks if isinstance(b, gr.State))
    assert state.delete_callback is cb.close_state            # temp files go when the session does
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"load_models", "add_model", "inspect", "heatmap", "masks", "auto_alpha", "merge", "cancel", "save",
            "push", "chat", "score", "reload_run", "export_yaml", "load_yaml", "load_example"} <= names
    assert {f"lesson_{k}" for k in LESSONS} <= names
    ids = {getattr(b, "elem_id", None) for b in blocks}
    assert {"base-model", "finetunes", "preset", "prune-rate", "histogram", "thresholds", "heatmap", "mask-plot",
            "merge-btn", "cancel-btn", "chat-merged", "chat-compare", "score-btn", "leaderboard",
            "yaml-code"} <= ids
