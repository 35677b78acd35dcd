"""The app's handlers as plain functions ({key: value} in, {key: value} out) on the demo family:
what each section shows, and that bad input becomes a message and leaves the session usable."""
from __future__ import annotations

import math
import time
import re
from pathlib import Path

import pytest
import torch
from conftest import DEMO_FTS

from dppa_ui import zoo

from dppa_ui.controls import MethodControls
from dppa_ui.ui import chat, inspect, lessons, merge, method, models, score
from dppa_ui.ui.common import DEFAULT_UI, AppState, controls_from, ui_values, values_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
FTS = DEMO_FTS


class Progress:
    def __call__(self, *a, **k):
        pass


def ctl(**over) -> dict:
    return ui_values(**over)


@pytest.fixture(scope="module")
def state():
    s = AppState()
    out = models.load_models({"state": s, "base": "demo:base", "fts": FTS})
    assert out["models_status"].startswith("✓"), out["models_status"]
    s.ws.stats.wait(timeout=60)
    yield s
    s.close()


def drawn(fig) -> str:
    """What a view shows instead of a figure (its one-line state), '' for a drawn figure."""
    return " ".join(a.text for a in fig.layout.annotations) if not fig.data else ""


def cut(cell: str) -> float:
    """The |δ| a thresholds row keeps from ('|δ| ≥ 0.00981')."""
    return float(cell.removeprefix("|δ| ≥ "))


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
    t_lo = [cut(r[2]) for r in lo["thresholds"]]
    t_hi = [cut(r[2]) for r in hi["thresholds"]]
    assert all(h > l > 0 for l, h in zip(t_lo, t_hi))
    assert lo["matrix"]["value"] == "model.layers.1.mlp.down_proj.weight"    # the mask viewer follows the tensor
    assert "matrix" not in hi                                                # ... only when the tensor changes
    legend = " ".join(t.name for t in hi["histogram"].data if t.showlegend is not False)
    assert "reverse: keep |δ| ≥" in legend and "density 0.1" in legend


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
        assert "finite" in drawn(out["histogram"]) and out["thresholds"] == [], (bad, out)
        out = merge.merge({"state": state, "progress": Progress(), **ctl(**bad)})
        assert "finite" in out["merge_status"]


def test_heatmap_and_masks(state):
    out = inspect.heatmap({**view(state), "heat_metric": "DP density", "heat_model": 7})   # picker out of date
    assert out["heatmap_note"] == "" and out["heatmap"].data[0].z is not None
    out = inspect.masks(view(state, preset="ties", density=0.2))
    assert "sign conflicts" in out["mask_numbers"] and len(out["mask_plot"]["value"].data) == 6
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


def test_merge_progress_reaches_the_server_at_most_four_times_a_second(state, monkeypatch):
    """Each progress update is work for the server's event loop, which shares the GIL with the
    merge: one per tensor made the app's merge 1.06-1.09x the CLI's at 0.5 B (0.97x throttled)."""
    from dppa_ui import engine
    calls = []

    class Recorder:
        def __call__(self, value, desc=None, unit=None):
            calls.append((time.perf_counter(), value))

    real = engine.merge_tensor

    def slow(*a, **k):                   # ~40 demo tensors, 20 ms each: under a second in all
        time.sleep(0.02)
        return real(*a, **k)
    monkeypatch.setattr(engine, "merge_tensor", slow)
    out = merge.merge({"state": state, "progress": Recorder(), **ctl(preset="ties", density=0.2)})
    assert out["merge_status"].startswith("✓")
    done, total = calls[-1][1]
    assert done == total and total >= 30                              # the last one always arrives
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:-1])]
    assert len(calls) <= total * 0.02 / 0.25 + 3 and all(g >= 0.24 for g in gaps), (len(calls), gaps)


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
    assert back["yaml_status"].startswith("✓") and back["density"]["value"] == 0.3
    bad = score.load_yaml_into_controls({"state": state, "yaml_code": "merge_method: ties\nmodels: [a, b\n"})
    assert "line 3, column 1" in bad["yaml_status"] and "density" not in bad
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
    assert "load the models first" in drawn(inspect.inspect(view(s))["histogram"])
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


# ------------------------------------------------------------------------------ APL and SMILE (issue 9)

APL_YAML = """prune: apl
combine: ties
base_model: demo:base
models:
  - model: demo:reverse
    parameters: {density: 0.2}
  - model: demo:cipher
    parameters: {density: 0.2}
parameters: {apl_examples: 4}
"""


@pytest.fixture(scope="module", autouse=True)
def apl_cache(tmp_path_factory):
    """APL's importance cache in a folder of this module's own (never ~/.cache)."""
    from dppa_ui import apl
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(apl.CACHE_ENV, str(tmp_path_factory.mktemp("apl-cache")))
        yield


@pytest.fixture()
def apl_controls(monkeypatch):
    """The method controls describe an APL config (the preset list is another section's job): the
    handlers get it exactly as they get any config from the controls."""
    from dppa_ui.config import load_config
    cfg = load_config(APL_YAML)
    for section in (inspect, merge):
        monkeypatch.setattr(section, "controls_of", lambda v: cfg)
    return cfg


def test_apl_map_shows_the_importance_table(state, apl_controls, tmp_path, monkeypatch):
    from dppa_ui import apl
    v = {**view(state), "heat_model": 1, "progress": Progress()}
    assert "not computed yet for cipher" in inspect.apl_view(v)["apl_note"]
    out = inspect.apl_map(v)
    fig = out["apl_plot"]["value"]
    exact, grad, bar_e, bar_g = fig.data
    # an independent computation: empty caches, the core's table for the same fine-tune and data
    monkeypatch.setenv(apl.CACHE_ENV, str(tmp_path / "fresh"))
    monkeypatch.setattr(apl, "_MEMORY", {})
    table = apl.importance_table("demo:base", "demo:cipher", examples=4, density=0.2)
    assert table["seconds"] > 0                                            # really recomputed
    def flat(grid):
        return [float(x) for row in grid for x in row]
    assert flat(exact.z) == pytest.approx(flat(table["exact"]), rel=1e-9)
    assert flat(grad.z) == pytest.approx(flat(table["gradient"]), rel=1e-9)
    assert list(bar_e.x) == pytest.approx(table["block_exact"]) and list(bar_g.x) == pytest.approx(table["block_gradient"])
    assert flat(exact.customdata) == pytest.approx(flat(table["density"]))
    assert list(exact.y) == [str(b) for b in table["blocks"]] and len(exact.x) == len(table["modules"])
    assert "cipher" in fig.layout.title.text and f"{table['model_exact']:+.3g}" in fig.layout.title.text
    again = inspect.apl_view(v)                                              # a redraw reads the cache
    assert flat(again["apl_plot"]["value"].data[0].z) == flat(exact.z) and again["apl_note"] == out["apl_note"]


def test_an_apl_config_inspects_pending_then_its_maps_and_merges_like_the_cli(state, apl_controls, tmp_path,
                                                                               read_weights, monkeypatch):
    import threading

    from dppa_ui import apl, gpu
    from dppa_ui.runner import merge as cli_merge
    monkeypatch.setenv(apl.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(apl, "_MEMORY", {})
    gate, real = threading.Event(), gpu.apl_importance
    monkeypatch.setattr(gpu, "apl_importance", lambda *a, **k: gate.wait(60) and real(*a, **k))
    ws, cfg = state.ws, apl_controls
    state.ws.apl._jobs.clear()
    out = inspect.inspect(view(state))
    assert "APL importance of the fine-tunes 0/2 computed" in out["inspect_status"]
    assert {r[1] for r in out["thresholds"]} == {"0.2"}                     # the target density until then
    assert "target density shown" in inspect.masks(view(state))["mask_numbers"]
    assert ws.kept_fraction(cfg) is None
    gate.set()
    plan = ws.apl.wait(cfg, ws.align(cfg), timeout=120)
    name = "model.layers.1.mlp.down_proj.weight"
    out = inspect.inspect(view(state))
    assert "APL" not in out["inspect_status"]
    want = apl.merge_inputs(cfg)                                                    # the core's plan, from the refs
    assert [float(r[1]) for r in out["thresholds"]] == pytest.approx([m[name].density for m in want.maps], abs=1e-3)
    assert {float(r[1]) for r in out["thresholds"]} != {0.2}
    assert all(plan.maps[i][n].density == want.maps[i][n].density for i in range(2) for n in want.maps[i])
    merged = merge.merge({"state": state, "progress": Progress(), **ctl()})
    assert merged["merge_status"].startswith("✓") and "apl+none+ties" in merged["merge_summary"]
    cli = cli_merge(APL_YAML, tmp_path / "cli", device="cpu", log=lambda s: None)
    a, b = read_weights(ws.runs.last.folder), read_weights(cli.out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ws.runs.last.kept_fraction == pytest.approx(ws.kept_fraction(cfg))


SMILE = {"smile_rank": 16, "smile_full": False, "smile_router": 8, "smile_k": 1, "smile_scope": "blocks (paper)"}


def test_smile_upscale_chats_with_routing_and_scores_with_routing_accuracy(state):
    from safetensors import safe_open

    from dppa_ui import evaluation, figures, smile, smile_model
    from dppa_ui.chat import prompt_ids
    base = zoo.demo_path("base")
    with safe_open(str(next(base.glob("*.safetensors"))), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    plain = sum(math.prod(s) for s in shapes.values())
    # every 2-D weight in a block: 4 experts of rank 16 (U: out x 16, ΣVᵀ: 16 x in) and a router of 8 x in
    extra = sum(4 * (16 * (o + i) + 8 * i) for k, (o, i) in
                ((k, s) for k, s in shapes.items() if ".layers." in k and len(s) == 2))
    est = merge.smile_estimate({"state": state, **SMILE})["smile_size"]
    assert f"{plain + extra:,} parameters ({(plain + extra) / plain:.1f}× a plain merge's {plain:,})" in est
    out = merge.upscale({"state": state, "progress": Progress(), **SMILE})
    run = state.ws.runs.last
    assert out["merge_status"].startswith("✓") and run.is_smile and run.parameters["total"] == plain + extra
    assert f"{plain + extra:,} parameters" in out["merge_summary"] and out["leaderboard"][-1][1] == "smile"
    # chat: the reply of the SMILE folder, and one routing entry per generated token
    prompt = "sort: 5213"
    outs = list(chat.chat({"state": state, "msg": prompt, "chat_merged": [], "chat_compare": [], "compare": "none",
                           "system": "", "temperature": 0.0, "top_p": 0.9, "max_new": 16}))
    hist = outs[-1]["chat_merged"]
    model, tok = smile_model.load(run.folder)
    ids, _ = prompt_ids(model, tok, [{"role": "user", "content": prompt}], 16)
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                         do_sample=False)[0, ids.shape[1]:].tolist()
    generated = [t for t in new if t != tok.eos_token_id]
    assert hist[-1]["content"] == tok.decode(generated)
    r = chat.routing({"state": state, "chat_merged": hist, "system": ""})
    strip = r["chat_routing"]
    assert strip["visible"] and len(strip["value"]) == len(generated) > 0
    assert "".join(t for t, _ in strip["value"]) == hist[-1]["content"]
    names = [f.removeprefix("demo:") for f in FTS]
    assert strip["color_map"] == {n: figures.color(i) for i, n in enumerate(names)}
    assert {lab for _, lab in strip["value"]} <= set(names) and f"{len(generated)} tokens" in r["routing_note"]
    # score: the app's scores of the SMILE run are the CLI's, and routing accuracy per demo domain
    res = score.score({"state": state, "progress": Progress(), "suite": score.DEMO_SUITE, "upload": None})
    assert res["score_status"].startswith("✓")
    direct = evaluation.score_model(model, tok, score.demo_items())
    assert {d: s["em"] for d, s in res["score_json"]["merged"].items()} == {d: s["em"] for d, s in direct.items()}
    acc = score.score_routing({"state": state, "suite": score.DEMO_SUITE, "upload": None})
    assert acc["routing_col"]["visible"] and [row[0] for row in acc["routing_table"]] == names
    want = smile.routing_accuracy(model, tok, score.demo_items())
    assert [row[1] for row in acc["routing_table"]] == pytest.approx([round(want[n]["decisions"], 3) for n in names])
    assert all(0 <= x <= 1 for row in acc["routing_table"] for x in row[1:])
    assert "is a SMILE model" in score.reload_run({"state": state, "run_no": run.number})["runs_status"]
    # a plain merge next: the routing views hide
    merge.merge({"state": state, "progress": Progress(), **ctl(preset="task_arithmetic")})
    assert chat.routing({"state": state, "chat_merged": hist, "system": ""})["chat_routing"]["visible"] is False
    assert score.score_routing({"state": state, "suite": score.DEMO_SUITE, "upload": None})["routing_col"] == \
        {"__type__": "update", "visible": False}


def test_smile_bad_settings_are_refused_by_name(state):
    n = len(state.ws.runs.items)
    for bad, text in [(dict(smile_rank=200), "at most 128"), (dict(smile_rank=500), "outside its range 1 to 256"),
                      (dict(smile_k=5), "more than the 4 fine-tune(s)"), (dict(smile_router=float("nan")), "finite")]:
        out = merge.upscale({"state": state, "progress": Progress(), **SMILE, **bad})
        assert out["smile_size"].startswith("⚠") and text in out["smile_size"], out
    assert len(state.ws.runs.items) == n                                   # nothing was built
    full = merge.smile_estimate({"state": state, **SMILE, "smile_full": True})["smile_size"]
    assert "parameters" in full and "×" in full


# ----------------------------------------------------------------------------------- 7 · Search

from dppa_ui import search as core_search
from dppa_ui.config import load_config
from dppa_ui.ui import search as search_ui


@pytest.fixture(scope="module")
def pair():
    """A session with two demo fine-tunes loaded (the searches' size)."""
    s = AppState()
    out = models.load_models({"state": s, "base": "demo:base", "fts": FTS[::2]})     # reverse, sort
    assert out["models_status"].startswith("✓"), out["models_status"]
    s.ws.stats.wait(timeout=60)
    yield s
    s.close()


def search_inputs(state, rows=None, **over) -> dict:
    c = controls_from(DEFAULT_UI)
    return {"state": state, "search_params": rows if rows is not None else search_ui.default_rows(c),
            "search_optimizer": "ngopt", "search_budget": 5, "search_objective": "geometric",
            "search_data": search_ui.DEMO_DEV, "search_upload": None, "search_seed": 0, "search_test": False,
            **DEFAULT_UI, **over}


def controls_shown(out: dict) -> MethodControls:
    return controls_from({**DEFAULT_UI, **{k: (v["value"] if isinstance(v, dict) else v) for k, v in out.items()
                                           if k in DEFAULT_UI}})


def test_search_streams_its_candidates_and_the_best_loads_into_the_controls(pair):
    outs = list(search_ui.start(search_inputs(pair, search_budget=6, search_test=True)))
    last = outs[-1]
    res = last["search_best"]
    assert last["search_status"].startswith("✓") and not res.cancelled
    # the live plot: dots per candidate and the best so far, the last one has all six
    plots = [o["search_plot"] for o in outs if "search_plot" in o and len(o["search_plot"].data) == 2]
    assert len(plots[-1].data[0].x) == 6 and list(plots[-1].data[1].y) == sorted(plots[-1].data[1].y)
    table = last["search_rows"]["value"]
    assert table["headers"][:4] == ["#", "weight reverse", "weight sort", "density"]
    assert [r[0] for r in table["data"]] == [6, 5, 4, 3, 2, 1]                 # newest first
    objectives = [r[4] for r in table["data"]]
    # the best scored candidate is chosen (the table shows 3 significant digits)
    assert res.objective == pytest.approx(max(objectives), rel=5e-3)
    best = [r for r in table["data"] if r[4] == max(objectives)]
    assert any(r[1:4] == pytest.approx([res.values["models[0].weight"], res.values["models[1].weight"],
                                        res.values["density"]], rel=5e-3) for r in best)
    assert all(0.5 <= r[1] <= 1.5 and 0.5 <= r[2] <= 1.5 and 0.05 <= r[3] <= 0.6 for r in table["data"])
    assert "test split" in last["search_status"]                              # scored once, for the best
    assert load_config(last["search_yaml"]).models[1].get("weight") == pytest.approx(res.values["models[1].weight"])
    assert Path(last["search_file"]["value"]).read_text() == last["search_yaml"]
    out = search_ui.load_best({"state": pair, "search_best": res})
    assert out["search_status"].startswith("✓")
    shown = controls_shown(out).to_config("demo:base", FTS[::2])            # to 3 significant digits
    assert [m.get("weight") for m in shown.models] == pytest.approx([res.values["models[0].weight"],
                                                              res.values["models[1].weight"]], rel=5e-3)
    assert shown.models[0].get("density") == pytest.approx(res.values["density"], rel=5e-3) == shown.models[1].get("density")


def test_stop_ends_the_search_with_the_best_so_far(pair):
    outs = []
    for o in search_ui.start(search_inputs(pair, search_budget=200)):
        outs.append(o)
        m = re.search(r"⟳ (\d+)/200", o.get("search_status", ""))
        if m and int(m.group(1)) >= 2 and not pair.cancel.is_set():
            assert "stop requested" in search_ui.stop({"state": pair})["search_status"]
    res = outs[-1]["search_best"]
    assert res.cancelled and "stopped after" in outs[-1]["search_status"]
    scored = [r for r in res.rows if r["phase"] == "search"]
    assert 2 <= len(scored) < 20
    top = max(scored, key=lambda r: r["objective"])
    assert res.objective == top["objective"] and res.values == top["params"]


def test_search_refuses_bad_input_by_name(pair, tmp_path):
    def status(rows=None, **over) -> str:
        outs = list(search_ui.start(search_inputs(pair, rows, **over)))
        assert len(outs) == 1 and "search_best" not in outs[0]                 # nothing ran
        return outs[0]["search_status"]
    assert "density" in status([[True, "density", "shared", 0.5, 0.2]]) and "empty bounds" in status(
        [[True, "density", "shared", 0.5, 0.2]])
    s = status([[True, "density", "shared", 0.1, 1.5]])
    assert "density" in s and "invalid config" in s
    s = status([[True, "gamma", "—", 0.1, 0.5]])
    assert "gamma" in s and "unknown parameter" in s
    s = status([[True, "PCB ratio", "—", 0.1, 0.5]])
    assert "pcb_ratio" in s and "no effect" in s                                # dppa has no PCB stage
    s = status([[True, "weight", "cipher", 0.5, 1.5]])
    assert "cipher" in s and "reverse, sort" in s                               # not a loaded fine-tune
    assert "finite" in status([[True, "weight", "each", float("nan"), 1.5]])
    assert "tick at least one" in status([[False, "weight", "each", 0.5, 1.5]])
    for budget in (0, 201, 2.5, float("inf")):
        assert "budget" in status(search_budget=budget)
    assert "objective" in status(search_objective="nosuch")
    secret = tmp_path / "dev.jsonl"
    secret.write_text('{"prompt": "reverse: ab", "answer": "ba", "domain": "reverse"}\n')
    s = status(search_data=score.UPLOAD_SUITE, search_upload=str(secret))
    assert "uploaded in this session" in s and str(tmp_path) not in s


def test_load_best_refuses_what_the_controls_cannot_hold(pair):
    base = {"merge_method": "dppa", "base_model": "demo:base",
            "models": [{"model": m, "parameters": {"density": d, "partitions": [d / 2, d], "amplification": [1.8, 1.0]}}
                       for m, d in zip(FTS[::2], (0.2, 0.4))]}
    cfg = load_config(base)
    spec = core_search.parse_search(cfg, {"parameters": {"models[*].density": [0.1, 0.5]}})
    res = core_search.SearchResult(config=cfg, values={"models[0].density": 0.2, "models[1].density": 0.4},
                                   objective=0.5, spec=spec)
    out = search_ui.load_best({"state": pair, "search_best": res})
    assert "cannot hold models[0].density, models[1].density" in out["search_status"] and "density" not in out
    pcb = load_config({"merge_method": "pcb", "base_model": "demo:base", "models": FTS[::2],
                       "parameters": {"clip_ratio": 0.01}})
    spec = core_search.parse_search(pcb, {"parameters": {"clip_ratio": [0.0001, 0.05], "models[*].weight": [0.5, 1.5]}})
    res = core_search.SearchResult(config=pcb, values={"clip_ratio": 0.01, "models[0].weight": 1.0,
                                                       "models[1].weight": 1.0}, objective=0.5, spec=spec)
    out = search_ui.load_best({"state": pair, "search_best": res})
    # the method controls hold every parameter of the method now (clip_ratio among PCB's)
    assert out["search_status"].startswith("✓") and out["x_clip_ratio"]["value"] == 0.01
    assert out["x_clip_ratio"]["visible"] and out["preset"] == "pcb"


def test_the_parameter_table_follows_the_preset(pair):
    out = search_ui.rows_for_preset({"preset": "pcb", "n_bands": 2, "search_for": "dppa/2",
                                     "search_params": [[True, "weight", "each", 0.7, 1.2]]})
    rows = out["search_params"]
    assert out["search_for"] == "pcb/2" and [r[1] for r in rows] == ["weight", "λ", "PCB ratio"]
    assert rows[0] == [True, "weight", "each", 0.7, 1.2]                        # the user's edit stays
    assert search_ui.rows_for_preset({"preset": "pcb", "n_bands": 2, "search_for": "pcb/2",
                                      "search_params": rows}) == {"search_for": "pcb/2"}   # the table stays
    three = search_ui.rows_for_preset({"preset": "dppa", "n_bands": 3, "search_for": "pcb/2", "search_params": rows})
    assert [r[1] for r in three["search_params"] if r[1].startswith("α")] == ["α1", "α2", "α3"]
    block = search_ui.parameters_block([[True, "α2", "sort", 0, 2], [True, "DP λ", "—", 0, 0.2],
                                        [True, "models[0].weight", "", 0.5, 1]], FTS[::2])
    assert block == {"models[1].amplification[1]": [0, 2], "dp_lambda": [0, 0.2], "models[0].weight": [0.5, 1]}


def test_auto_lambda_writes_the_lambdas_it_found_into_the_weights(pair, monkeypatch):
    monkeypatch.setattr(core_search, "LAMBDA_BUDGET", 6)          # PCB's budget is 100: the same search, shorter
    outs = list(method.auto_lambda({"state": pair, **ctl(preset="pcb")}))
    last = outs[-1]
    assert last["lambda_status"].startswith("✓") and last["lambda_"] == 1.0
    weights = [float(w) for w in last["weights"].split(",")]
    tried = [(float(o), [float(x) for x in lam.split(",")]) for lam, o in
             re.findall(r"#\d+: λ ([0-9., ]+) → ([0-9.]+)", last["lambda_log"])]
    assert len(tried) == 6 and all(0.8 <= x <= 1.3 for _, lam in tried for x in lam)
    top = max(o for o, _ in tried)                                            # (the log shows 3 digits)
    assert any(weights == pytest.approx(lam, abs=5e-3) for o, lam in tried if o == top)   # the best candidate's λ_i
    assert len(outs) >= 2                                                     # the log streamed before the end


def test_auto_alpha_streams_the_official_walk_and_writes_what_it_chose(pair):
    outs = list(method.auto_alpha({"state": pair, **ctl(preset="dppa")}))
    last = outs[-1]
    assert last["alpha_status"].startswith("✓") and len(outs) >= 3           # the log streamed before the end
    chosen = [[float(x) for x in a.split(",")] for a in re.findall(r"chose \[([0-9., ]+)\]", last["alpha_log"])]
    written = controls_from({**DEFAULT_UI, "alpha_per_model": last["alpha_per_model"]}).alpha_per_model
    assert list(written) == FTS[::2] and list(written.values()) == chosen
    # the official walk starts at [1.8, 0.0]: its first step is scored there, whatever the sliders say
    assert "alpha [1.8, 0.0] ->" in last["alpha_log"]


# ----------------------------------------------------------------------------- every method in the picker

def test_the_picker_offers_every_method_with_only_its_controls():
    from dppa_ui.registry import METHODS
    names = [n for _, n in method.method_choices()]
    assert {n for n, m in METHODS.items() if m.family != "upscale"} == set(names)
    v = method.preset_view({"preset": "slerp"})
    assert v["x_t"]["visible"] and v["x_t"]["value"] == 0.5 and not v["density"]["visible"]
    assert not v["lambda_"]["visible"] and not v["dp_group"]["visible"] and v["gradient_acc"]["visible"]
    v = method.preset_view({"preset": "della"})
    assert v["x_epsilon"]["visible"] and v["x_epsilon"]["value"] == 0.15 and v["seed"]["visible"] and \
        v["density"]["visible"] and v["x_rescale"]["value"] == "l1"
    v = method.preset_view({"preset": "ram"})
    assert v["x_epsilon"]["value"] == 1e-5 and not v["lambda_"]["visible"] and not v["x_t"]["visible"]


def test_a_per_layer_gradient_round_trips_through_the_yaml(state):
    rows = [["t", "self_attn", "0, 0.5, 1"], ["t", "mlp", "1, 0"], ["t", "", "0.5"]]
    v = ctl(preset="slerp", gradients=rows)
    c = controls_from(v)
    assert c.params["t"] == [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]},
                             {"value": 0.5}]
    models.load_models({"state": state, "base": "demo:base", "fts": ["demo:reverse"]})
    exp = score.export_yaml({"state": state, "base": "demo:base", "fts": ["demo:reverse"], **v})
    assert "filter: self_attn" in exp["yaml_code"]
    back = score.load_yaml_into_controls({"state": state, "yaml_code": exp["yaml_code"]})
    assert back["gradients"] == [["t", "self_attn", "0, 0.5, 1"], ["t", "mlp", "1, 0"], ["t", "", "0.5"]]
    plot = method.gradient_view({"state": state, "preset": "slerp", "gradients": rows})["gradient_plot"]
    assert [tr.name for tr in plot.data] == ["t · self_attn", "t · mlp", "t"]
    assert list(plot.data[0].y) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])        # 4 layers: 0 .. 1 evenly
    bad = ctl(preset="slerp", gradients=[["density", "", "0.1, 0.2"]])
    out = inspect.inspect({**view(state), **bad})
    assert "slerp has no per-layer parameter 'density'" in drawn(out["histogram"])
    models.load_models({"state": state, "base": "demo:base", "fts": FTS})
    state.ws.stats.wait(timeout=60)


def test_slerp_and_della_in_the_views_and_merged_as_the_cli(state, tmp_path, read_weights):
    import math

    import torch

    from dppa_ui.runner import merge as cli_merge
    models.load_models({"state": state, "base": "demo:base", "fts": ["demo:sort"]})
    name = "model.layers.1.mlp.down_proj.weight"
    v = {**view(state), "matrix": name, **ctl(preset="slerp", x_t=0.3)}
    out = inspect.masks(v)
    assert "interpolates the weights" in out["mask_numbers"] and out["mask_plot"]["visible"] is False
    angles = out["method_plot"]["value"].data[0].y
    from dppa_ui.io import CheckpointReader
    with CheckpointReader(zoo.demo_path("base")) as rb, CheckpointReader(zoo.demo_path("sort")) as rf:
        a, b = rb.get(name).reshape(-1).double(), rf.get(name).reshape(-1).double()
    assert angles[1] == pytest.approx(math.degrees(math.acos(float(a @ b / a.norm() / b.norm()))), abs=1e-3)
    run = merge.merge({"state": state, "progress": Progress(), **ctl(preset="slerp", x_t=0.3)})
    assert run["merge_status"].startswith("✓")
    cli = cli_merge(state.ws.runs.last.config.to_dict(), tmp_path / "cli", device="cpu")
    x, y = read_weights(state.ws.runs.last.folder), read_weights(cli.out)
    assert all(torch.equal(x[k], y[k]) for k in x)
    d = {**view(state), "matrix": name, **ctl(preset="della", density=0.3, x_epsilon=0.1, seed=5)}
    rows = inspect.inspect(d)["thresholds"]
    from dppa_ui.analysis import thresholds
    from dppa_ui.pipeline import plan_steps, prune_amplify
    cfg = state.ws.config(controls_from(d))
    step = plan_steps(cfg, name, (128, 384), None)[0]
    kept = int((prune_amplify(cfg, 0, name, state.ws.access.delta(name, 0), step) != 0).sum())
    assert thresholds(state.ws, cfg, name)[0]["kept"] == kept and float(rows[0][4]) == pytest.approx(
        100 * kept / (128 * 384), rel=5e-3)
    mv = inspect.masks(d)["method_plot"]["value"]
    assert "DELLA: keep probability" in mv.layout.title.text and mv.data[0].y[0] == pytest.approx(0.2)
    assert "L1 norm" in mv.layout.title.text                # mergekit's default rescale, as the merge does
    models.load_models({"state": state, "base": "demo:base", "fts": FTS})
    state.ws.stats.wait(timeout=60)


def test_breadcrumbs_draws_both_cuts(state):
    out = inspect.inspect(view(state, preset="breadcrumbs", density=0.3, x_gamma=0.05))
    cuts = [t for t in out["histogram"].data if t.line.dash == "dashdot"]
    assert len(cuts) == 4 and "outliers above" in cuts[0].hovertemplate
    assert "kept band between" in out["histogram"].layout.title.text
    lo, hi = (float(x) for x in out["thresholds"][0][2].split(" ≤ |δ| ≤ "))  # the table states the band too
    assert 0 < lo < hi


def test_a_yaml_runs_as_written_with_its_layer_stack(state):
    text = (Path(__file__).resolve().parents[1] / "assets/examples/mergekit/passthrough.yaml").read_text()
    out = score.plan_yaml({"state": state, "yaml_code": text})
    assert out["layer_stack"]["value"] == [[0, "reverse", 0], [1, "reverse", 1], [2, "reverse", 2], [3, "sort", 2],
                                           [4, "sort", 3]]
    assert "passthrough" in out["yaml_plan"] and "5 layers" in out["yaml_plan"]
    done = score.merge_yaml({"state": state, "yaml_code": text, "progress": Progress()})
    assert done["yaml_status"].startswith("✓") and "passthrough of reverse, sort" in done["merge_summary"]
    import json
    assert json.loads((state.ws.runs.last.folder / "config.json").read_text())["num_hidden_layers"] == 5
    bad = text.replace("demo:sort", "/etc")
    assert "outside the allowed model folders" in score.plan_yaml({"state": state, "yaml_code": bad})["yaml_status"]
    assert "outside the allowed model folders" in score.merge_yaml({"state": state, "yaml_code": bad,
                                                                    "progress": Progress()})["yaml_status"]


def test_a_multi_stage_yaml_is_planned_and_merged_as_the_cli_does(state, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "assets/examples/mergekit/two_stages.yaml").read_text()
    out = score.plan_yaml({"state": state, "yaml_code": text})
    assert out["yaml_status"].startswith("✓") and "2 stages" in out["yaml_status"]
    assert out["yaml_plan"].index("stage ") < out["yaml_plan"].index("stage (final)")
    done = score.merge_yaml({"state": state, "yaml_code": text, "progress": Progress()})
    assert done["yaml_status"].startswith("✓"), done["yaml_status"]
    from dppa_ui.runner import merge_stages
    from dppa_ui.io import CheckpointReader
    merge_stages(text, tmp_path / "cli", log=lambda s: None)
    app, cli = CheckpointReader(state.ws.runs.last.folder), CheckpointReader(tmp_path / "cli")
    assert set(app.names) == set(cli.names)
    for n in app.names:
        assert torch.equal(app.get(n), cli.get(n)), n
    assert not [p for p in state.ws.runs.last.folder.parent.iterdir() if ".stages-" in p.name]   # intermediates removed


def test_sce_select_is_drawn_as_the_merge_applies_it(state):
    """With select_topk < 1 the histogram splits each fine-tune by SCE's select, the table counts
    the selected entries, and the mask viewer's "no winner" cells are exactly where the merged
    tensor (pipeline.merge_tensor, the CLI's own function) equals the base."""
    from dppa_ui.pipeline import merge_tensor
    name = "model.layers.1.mlp.down_proj.weight"
    v = {**view(state), "matrix": name, **ctl(preset="sce", x_select_topk=0.3)}
    out = inspect.inspect(v)
    assert "SCE keeps the 30%" in out["histogram"].layout.title.text
    assert [t.line.dash for t in out["histogram"].data[:2]] == [None, "dot"]
    assert all(float(r[4]) == pytest.approx(30.0, abs=0.01) for r in out["thresholds"])
    base, fts = state.ws.access.views(name)
    cfg = state.ws.config(controls_from(v))
    merged = merge_tensor(cfg, name, base.float(), [ft.float() for ft in fts])
    unchanged = 100.0 * float((merged == base.float()).sum()) / merged.numel()
    numbers = inspect.masks(v)["mask_numbers"]
    none = float(re.search(r"none ([0-9.]+)%", numbers).group(1))
    assert none == pytest.approx(unchanged, abs=0.05) and none > 60
    full = inspect.inspect({**v, "x_select_topk": 1.0})
    assert "SCE keeps" not in full["histogram"].layout.title.text and float(full["thresholds"][0][4]) == 100.0
