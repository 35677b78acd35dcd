"""Score tab › lm-eval tasks (issue 19's app part): the merged model, the base and the fine-tunes
scored on lm-eval tasks, each number equal to `python -m dppa_ui score --lm-eval` on the same
model, task and limit; the merged model's in its leaderboard row; each (model, task, limit,
few-shot) scored once; bad input refused in one line before any model is built; the picker fed
by lm-eval's own index; lm-eval's own tasks refused while the server is offline; no include path
from the browser."""
from __future__ import annotations

import json

import pytest
from conftest import DEMO_FTS

from dppa_ui import gpu, harness, zoo
from dppa_ui.cli import main
from dppa_ui.modelbuild import POOL
from dppa_ui.ui import lm_eval, merge, models
from dppa_ui.ui.common import AppState, ui_values

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FTS = DEMO_FTS
TASKS = str(zoo.ZOO_DIR.parent / "lm_eval")


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def state():
    s = AppState()
    assert models.load_models({"state": s, "base": "demo:base", "fts": FTS})["models_status"].startswith("✓")
    out = merge.merge({"state": s, "progress": quiet, **ui_values(preset="ties", density=0.5)})
    assert out["merge_status"].startswith("✓"), out["merge_status"]
    yield s
    s.close()


def score(state, tasks, limit=20, fewshot=0) -> dict:
    return lm_eval.score_lm_eval({"state": state, "progress": quiet, "lm_tasks": tasks, "lm_limit": limit,
                                  "lm_fewshot": fewshot})


def cli(model, tasks: str, limit: int, fewshot: int, capsys) -> dict:
    capsys.readouterr()
    assert main(["score", str(model), "--lm-eval", tasks, "--include-path", TASKS, "--limit", str(limit),
                 "--num-fewshot", str(fewshot), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["lm_eval"]


def bars(fig) -> dict[str, dict[str, float]]:
    """{model label: {task label: bar height}} of the scores chart."""
    return {t.name: dict(zip(t.x, t.y)) for t in fig.data}


def test_scores_are_the_clis_and_the_merged_ones_go_to_its_leaderboard_row(state, capsys):
    out = score(state, ["zoo_cipher_mc", "zoo_reverse_gen"], limit=20)
    assert out["lm_status"].startswith("✓ scored 6 models on 2 lm-eval task(s) (20 documents each, 0-shot)"), out
    run = state.ws.runs.last
    merged = {t: r["metrics"] for (t, limit, shots), r in run.lm_eval.items() if (limit, shots) == (20, 0)}
    expected = cli(run.folder, "zoo_cipher_mc,zoo_reverse_gen", 20, 0, capsys)
    assert merged == {t: expected[t] for t in merged} and set(merged) == {"zoo_cipher_mc", "zoo_reverse_gen"}
    row = out["leaderboard"][-1]
    assert row[0] == run.number and row[-1] == (f"20 docs, 0-shot: zoo_cipher_mc acc {expected['zoo_cipher_mc']['acc']:.3g}"
                                                f" · zoo_reverse_gen exact_match "
                                                f"{expected['zoo_reverse_gen']['exact_match']:.3g}")
    drawn = bars(out["lm_plot"])
    assert list(drawn) == [f"merged ({run.name})", "base", "reverse", "cipher", "sort", "brackets"]
    for label, ref in (("base", "demo:base"), ("cipher", "demo:cipher"), ("reverse", "demo:reverse")):
        theirs = cli(ref, "zoo_cipher_mc,zoo_reverse_gen", 20, 0, capsys)
        assert drawn[label] == {"zoo_cipher_mc (acc)": theirs["zoo_cipher_mc"]["acc"],
                                "zoo_reverse_gen (exact_match)": theirs["zoo_reverse_gen"]["exact_match"]}
    assert drawn["cipher"]["zoo_cipher_mc (acc)"] > drawn["base"]["zoo_cipher_mc (acc)"]        # its own skill
    assert drawn["reverse"]["zoo_reverse_gen (exact_match)"] > drawn["base"]["zoo_reverse_gen (exact_match)"]


def test_few_shot_goes_through_and_a_tag_is_scored_task_by_task(state, capsys):
    out = score(state, ["zoo_mc"], limit=8, fewshot=2)
    assert "4 lm-eval task(s) (8 documents each, 2-shot)" in out["lm_status"], out["lm_status"]
    run = state.ws.runs.last
    got = {t: r["metrics"] for (t, limit, shots), r in run.lm_eval.items() if (limit, shots) == (8, 2)}
    assert got == cli(run.folder, "zoo_brackets_mc,zoo_cipher_mc,zoo_reverse_mc,zoo_sort_mc", 8, 2, capsys)
    assert "8 docs, 2-shot: zoo_brackets_mc acc" in out["leaderboard"][-1][-1]


def test_each_model_task_limit_and_few_shot_is_scored_once(state, monkeypatch):
    score(state, ["zoo_sort_mc"], limit=12)
    calls = []
    real = gpu.lm_eval_task
    monkeypatch.setattr(gpu, "lm_eval_task", lambda *a, **k: calls.append(a[1:5]) or real(*a, **k))
    assert score(state, ["zoo_sort_mc"], limit=12)["lm_status"].startswith("✓") and calls == []
    assert score(state, ["zoo_sort_mc"], limit=13)["lm_status"].startswith("✓")
    assert calls == [("zoo_sort_mc", TASKS, 13, 0)] * 6


@pytest.mark.parametrize("limit, fewshot, tasks, said", [
    (0, 0, ["zoo_mc"], "limit must be a whole number of documents per task (>= 1), got 0"),
    (-3, 0, ["zoo_mc"], "limit must be a whole number of documents per task (>= 1), got -3"),
    (2.5, 0, ["zoo_mc"], "got 2.5"),
    (None, 0, ["zoo_mc"], "limit: give the number of documents per task to score (1 to 2000)"),
    (5000, 0, ["zoo_mc"], "limit 5000: this app scores at most 2000 documents per task"),
    (10, -1, ["zoo_mc"], "few-shot must be a whole number of examples (>= 0), got -1"),
    (10, 0, [], "pick one or more lm-eval tasks"),
])
def test_bad_settings_are_one_line_before_any_model_is_built(state, limit, fewshot, tasks, said):
    loads = POOL.loads
    text = score(state, tasks, limit, fewshot)["lm_status"]
    assert text.startswith("⚠") and said in text and "\n" not in text, text
    assert POOL.loads == loads


def test_lm_evals_index_feeds_the_picker_and_its_own_tasks_wait_for_the_hub(state):
    """The first search loads lm-eval's own index (~14,700 names); its tasks read their data from
    the hub, so on this offline server they are refused by name, as an unknown name is."""
    out = lm_eval.find_tasks({"lm_query": "arc_e", "lm_tasks": ["zoo_mc"]})
    index = harness.index(TASKS, full=True).all_tasks
    assert len(index) > 10_000
    expected = sorted((n for n in index if "arc_e" in n), key=lambda n: (not n.startswith("arc_e"), n))
    choices = out["lm_tasks"]["choices"]
    assert choices[0] == "zoo_mc" and choices[1:1 + len(expected)] == expected and "arc_easy" in choices
    assert set(lm_eval.demo_tasks()) <= set(choices)
    assert out["lm_index_status"].startswith(f"✓ {len(expected)} of lm-eval's {len(index):,} task")
    assert "HF_HUB_OFFLINE=1" in out["lm_index_status"]
    wide = lm_eval.find_tasks({"lm_query": "mmlu", "lm_tasks": []})
    assert len(wide["lm_tasks"]["choices"]) == lm_eval.MAX_MATCHES + len(lm_eval.demo_tasks())
    assert f"the first {lm_eval.MAX_MATCHES} in the picker" in wide["lm_index_status"]
    assert lm_eval.find_tasks({"lm_query": "", "lm_tasks": []})["lm_index_status"].startswith("⚠ type part")
    assert "no name in lm-eval's index" in lm_eval.find_tasks({"lm_query": "qqzzqq", "lm_tasks": []})["lm_index_status"]
    loads = POOL.loads
    text = score(state, ["zoo_cipher_mc", "arc_easy"])["lm_status"]
    assert text.startswith("⚠ arc_easy is one of lm-eval's own tasks") and "HF_HUB_OFFLINE=1" in text
    text = score(state, ["zoo_mcc"])["lm_status"]
    assert text == "⚠ unknown lm-eval task 'zoo_mcc': not among the demo tasks nor in lm-eval's index; did you mean zoo_mc?"
    assert POOL.loads == loads


def test_demo_task_names_are_the_folders_as_lm_eval_indexes_it():
    assert lm_eval.demo_tasks() == sorted(harness.index(TASKS, full=False).all_tasks)
    assert lm_eval.TASK_FOLDER.resolve() == zoo.ZOO_DIR.parent.resolve() / "lm_eval"


def test_a_fresh_session_is_told_what_to_do_first_and_the_browser_names_no_include_path():
    out = score(AppState(), ["zoo_mc"])
    assert out["lm_status"] == "⚠ load the models first (1 · Models, 'Load models')"
    from dppa_ui.ui import build_app
    events = [e for e in build_app().page.events if e.fn is lm_eval.score_lm_eval]
    assert [e.inputs for e in events] == [("state", "lm_tasks", "lm_limit", "lm_fewshot")]
