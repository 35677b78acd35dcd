"""lm-evaluation-harness on the models this project builds (issue 19): the demo domains as a local
lm-eval task folder (assets/lm_eval), generate_until with exact match equal to our own EM item by
item, multiple choice where each fine-tune beats the base on its own domain; `score --lm-eval` on
plain, disk-offloaded and SMILE models with its table and both JSON files; bad input refused in one
line before any model is built; the search's lm_eval objective, its split rule and the same rows
from worker processes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from dppa_ui import harness, modelbuild, search, zoo
from dppa_ui.cli import main
from dppa_ui.evaluation import greedy_answers, load_suite, score_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (zoo.ZOO_DIR / "reverse" / "config.json").is_file(), reason="assets/zoo is not built")]
TASKS = str(zoo.ZOO_DIR.parent / "lm_eval")
DOMAINS = ("reverse", "cipher", "sort", "brackets")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = modelbuild.load(f"demo:{name}", placed=False)
        return cache[name]
    return get


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


# ---------------------------------------------------------------------------- the demo task folder

def test_generate_task_exact_match_is_our_em_item_by_item(models):
    """The prompt `<bos><|user|>{prompt}<|assistant|>` (the YAML writes the demo chat format out),
    greedy to <eos>, whitespace stripped: lm-eval decodes what we decode, so its EM is ours item by
    item. (We stop one token after the longest answer, lm-eval at max_gen_toks: an answer that
    runs on is ours cut short, wrong either way.)"""
    model, tok = models("cipher")
    n = 40
    tasks = harness.load_tasks("zoo_cipher_gen,zoo_reverse_gen", TASKS)
    res = harness.run(harness.wrap(model, tok, 16), tasks, limit=n, log_samples=True)
    for domain in ("cipher", "reverse"):
        items = load_suite("zoo", "test", [domain])[:n]
        ours = greedy_answers(model, tok, items)
        theirs = _samples(res, f"zoo_{domain}_gen")
        assert [s["doc"]["prompt"] for s in theirs] == [it["prompt"] for it in items]
        answers = [s["filtered_resps"][0] for s in theirs]
        assert all(t.startswith(o) for t, o in zip(answers, ours))
        assert [s["exact_match"] for s in theirs] == [float(o.strip() == it["answer"]) for o, it in zip(ours, items)]
        em = score_model(model, tok, items)[domain]["em"]
        assert harness.metrics(res)[f"zoo_{domain}_gen"]["exact_match"] == pytest.approx(em)
    assert harness.metrics(res)["zoo_cipher_gen"]["exact_match"] > 0.8      # its own skill
    assert harness.metrics(res)["zoo_reverse_gen"]["exact_match"] < 0.1


def test_chat_template_prompt_gives_the_same_answers(models, tmp_path):
    """The other prompt format that matches: the task gives the bare prompt and lm-eval renders it
    with the tokenizer's chat template (--apply-chat-template)."""
    (tmp_path / "chat.yaml").write_text(textwrap.dedent(f"""\
        include: {TASKS}/_zoo_gen.yaml
        task: zoo_cipher_gen_chat
        doc_to_text: "{{{{prompt}}}}"
        dataset_kwargs: {{domain: cipher}}
        """))
    model, tok = models("cipher")
    tasks = harness.load_tasks("zoo_cipher_gen_chat", tmp_path)
    res = harness.run(harness.wrap(model, tok, 16), tasks, limit=24, apply_chat_template=True, log_samples=True)
    items = load_suite("zoo", "test", ["cipher"])[:24]
    assert [s["filtered_resps"][0] for s in _samples(res, "zoo_cipher_gen_chat")] == greedy_answers(model, tok, items)


def test_each_finetune_beats_the_base_on_its_own_multiple_choice_task(models):
    n = 40
    base = harness.run(harness.wrap(*models("base"), 64), harness.load_tasks("zoo_mc", TASKS), limit=n)
    got = harness.metrics(base)
    assert set(got) == {f"zoo_{d}_mc" for d in DOMAINS}
    for d in DOMAINS:
        own = harness.metrics(harness.run(harness.wrap(*models(d), 64), harness.load_tasks(f"zoo_{d}_mc", TASKS),
                                          limit=n))[f"zoo_{d}_mc"]
        assert own["acc"] > got[f"zoo_{d}_mc"]["acc"] and own["acc_norm"] > got[f"zoo_{d}_mc"]["acc_norm"]
        assert own["acc"] >= 0.9
        # As in our scores: the fine-tune's answers are likelier on its domain than the base's.
        items = load_suite("zoo", "test", [d])[:n]
        assert score_model(*models(d), items, generate=False)[d]["smooth"] > \
            score_model(*models("base"), items, generate=False)[d]["smooth"]


def test_multiple_choice_items_put_the_answer_among_three_other_answers():
    tasks = harness.load_tasks("zoo_sort_mc", TASKS)
    docs = list(tasks.leaves["zoo_sort_mc"].test_docs())
    items = load_suite("zoo", "test", ["sort"])
    assert [d["prompt"] for d in docs] == [it["prompt"] for it in items]
    assert all(d["choices"][d["label"]] == it["answer"] and len(set(d["choices"])) == 4 for d, it in zip(docs, items))
    assert {d["label"] for d in docs} == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------- the CLI

def test_cli_prints_lm_evals_table_and_writes_its_json_beside_ours(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", "demo:reverse", "--lm-eval", "zoo_reverse_gen,zoo_reverse_mc", "--include-path", TASKS,
                 "--limit", "20", "--batch-size", "32", "--suite", "zoo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "|zoo_reverse_gen|" in text and "exact_match" in text and "acc_norm" in text and "reverse" in text
    theirs = json.loads((out / "lm_eval_results.json").read_text())
    ours = json.loads((out / "scores.json").read_text())
    assert theirs["results"]["zoo_reverse_mc"]["sample_len"] == 20 and theirs["config"]["limit"] == 20
    assert ours["lm_eval"]["zoo_reverse_gen"]["exact_match"] == theirs["results"]["zoo_reverse_gen"]["exact_match,none"]
    assert set(ours["scores"]) == set(DOMAINS) and ours["scores"]["reverse"]["n"] == 200
    # Written atomically, never over a non-empty folder without --overwrite.
    assert main(["score", "demo:reverse", "--lm-eval", "zoo_reverse_mc", "--include-path", TASKS, "--out", str(out)]) == 1
    assert json.loads((out / "scores.json").read_text()) == ours


def test_cli_scores_a_disk_offloaded_model_as_the_plain_one(tmp_path, capsys, monkeypatch):
    real = modelbuild.load

    def squeezed(ref, **kw):        # a CPU budget that fits no layer: accelerate offloads them to disk
        model, tok = real(ref, **{**kw, "max_memory": {"cpu": 20_000}})
        assert model.placement.offload
        return model, tok
    args = ["--lm-eval", "zoo_sort_gen", "--include-path", TASKS, "--limit", "12", "--json"]
    assert main(["score", "demo:sort", *args]) == 0
    plain = json.loads(capsys.readouterr().out)["lm_eval"]
    monkeypatch.setattr(modelbuild, "load", squeezed)
    assert main(["score", "demo:sort", *args]) == 0
    assert json.loads(capsys.readouterr().out)["lm_eval"] == plain and plain["zoo_sort_gen"]["exact_match"] > 0.8


def test_cli_scores_a_smile_folder(tmp_path, capsys):
    path = tmp_path / "smile.yaml"
    path.write_text("merge_method: smile\nbase_model: demo:base\nmodels: [demo:cipher, demo:brackets]\n"
                    "parameters: {rank_of_expert: 16, rank_of_router: 8}\n")
    assert main(["merge", str(path), "--out", str(tmp_path / "smile"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "smile"), "--lm-eval", "zoo_cipher_mc,zoo_brackets_mc", "--include-path",
                 TASKS, "--limit", "16", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["lm_eval"]
    assert got["zoo_cipher_mc"]["acc"] > 0.5 and got["zoo_brackets_mc"]["acc"] > 0.5


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built")
    monkeypatch.setattr(modelbuild, "load", refuse)


def _one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("limit", ["0", "-3", "2.5", "many"])
def test_bad_limit_is_one_line_before_anything_loads(limit, capsys, no_model, monkeypatch):
    monkeypatch.setattr(harness, "load_tasks", lambda *a, **k: pytest.fail("tasks were loaded"))
    assert main(["score", "demo:base", "--lm-eval", "zoo_sort_mc", "--include-path", TASKS, "--limit", limit]) == 1
    line = _one_line_error(capsys)
    assert "--limit" in line and repr(limit) in line


def test_unknown_task_is_one_line_naming_it(capsys, no_model):
    assert main(["score", "demo:base", "--lm-eval", "zoo_sort_mc,zoo_revrse_mc", "--include-path", TASKS]) == 1
    line = _one_line_error(capsys)
    assert "unknown lm-eval task 'zoo_revrse_mc'" in line and "zoo_reverse_mc" in line     # and the near name


def test_task_whose_data_is_not_offline_is_one_line_naming_it(tmp_path, capsys, no_model):
    (tmp_path / "hub.yaml").write_text("task: needs_the_hub\ndataset_path: dppa-ui-tests/not-cached\n"
                                       "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\n"
                                       "doc_to_target: 0\ndoc_to_choice: [a, b]\n")
    assert main(["score", "demo:base", "--lm-eval", "needs_the_hub", "--include-path", str(tmp_path)]) == 1
    line = _one_line_error(capsys)
    assert "lm-eval task 'needs_the_hub'" in line and "cannot be loaded" in line and "HF_HUB_OFFLINE" in line


def test_lm_eval_options_need_lm_eval(capsys):
    assert main(["score", "demo:base", "--limit", "5"]) == 1
    assert "--limit is an lm-eval option" in _one_line_error(capsys)


def test_lm_eval_is_imported_only_when_used():
    code = ("import sys; import dppa_ui, dppa_ui.cli, dppa_ui.search, dppa_ui.harness, dppa_ui.zoo_cli; "
            "dppa_ui.cli.build_parser(); print('lm_eval' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


# -------------------------------------------------------------------------------------- the search

def _cfg(objective, **block):
    return {"merge_method": "task_arithmetic", "base_model": "demo:base",
            "models": [{"model": "demo:cipher"}, {"model": "demo:sort"}],
            "search": {"parameters": {"models[*].weight": [0.3, 1.3]}, "budget": 4, "seed": 1,
                       "objective": objective, **block}}


GEN = {"lm_eval": ["zoo_cipher_gen", "zoo_sort_gen"], "metric": "exact_match", "limit": 8, "include_path": TASKS,
       "batch_size": 16}


def test_lm_eval_objective_scores_validation_and_reports_test(monkeypatch):
    res = search.run_search(_cfg(GEN))
    rows = [r for r in res.rows if r["phase"] == "search"]
    assert len(rows) == 4 and all(set(r["scores"]) == {"zoo_cipher_gen", "zoo_sort_gen"} for r in rows)
    assert all(r["objective"] == pytest.approx(sum(r["scores"].values()) / 2) for r in rows)
    assert res.objective == max(r["objective"] for r in rows)
    # The test report: lm-eval's own simple_evaluate on the merged model, first 8 test documents.
    from dppa_ui import merge_in_memory
    from dppa_ui.evaluation import load_weights
    from dppa_ui.io import read_state_dict
    from dppa_ui.refs import resolve_model
    merged = merge_in_memory(read_state_dict(resolve_model("demo:base")),
                             [read_state_dict(resolve_model(f"demo:{d}")) for d in ("cipher", "sort")], res.config)
    model, tok = modelbuild.load("demo:base", placed=False)
    load_weights(model, merged)
    direct = harness.metrics(harness.run(harness.wrap(model, tok, 16), harness.load_tasks(GEN["lm_eval"], TASKS),
                                         limit=8))
    assert {t: s["exact_match"] for t, s in res.test["scores"].items()} == \
        {t: direct[t]["exact_match"] for t in GEN["lm_eval"]}
    assert res.test["documents"] == "test split, first 8" and set(res.test["reference"]) == set(GEN["lm_eval"])


def test_split_rule_validation_or_disjoint_slices(tmp_path):
    tasks = harness.load_tasks("zoo_sort_mc", TASKS)
    assert harness.split_documents(tasks, 5) == {"zoo_sort_mc": ("validation", [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])}
    assert harness.split_documents(tasks, None) == {"zoo_sort_mc": ("validation", None, None)}
    (tmp_path / "one.yaml").write_text(f"include: {TASKS}/_zoo_mc.yaml\ntask: one_split\nvalidation_split: null\n"
                                       "dataset_kwargs: {domain: sort}\n")
    one = harness.load_tasks("one_split", tmp_path)
    assert harness.split_documents(one, 3) == {"one_split": (None, [0, 1, 2], [3, 4, 5])}
    with pytest.raises(ValueError, match="one split only.*limit"):
        harness.split_documents(one, None)
    with pytest.raises(ValueError, match="200 documents"):
        harness.split_documents(one, 200)


def test_worker_processes_give_the_in_process_rows():
    """Each worker loads the tasks and wraps its model once, from the pickled job (as a Ray actor
    does: test_search covers Ray's own path); the rows depend on the seed and batch only."""
    cfg = _cfg({**GEN, "lm_eval": ["zoo_cipher_gen"], "limit": 6})
    local = search.run_search(cfg, batch=2, test=False)
    procs = search.run_search(cfg, workers=2, test=False)
    assert [r["params"] for r in procs.rows] == [r["params"] for r in local.rows]
    assert [r["scores"] for r in procs.rows] == [r["scores"] for r in local.rows]
    assert procs.values == local.values


@pytest.mark.parametrize("objective, block, needle", [
    ({"lm_eval": ["zoo_sort_mc"], "limit": 0}, {}, "limit"),
    ({"lm_eval": ["zoo_sort_mc"], "metrics": "acc"}, {}, "unknown: ['metrics']"),
    ({"lm_eval": []}, {}, "no lm-eval task"),
    ({"lm_eval": ["zoo_sort_mc"]}, {"data": ["x.jsonl"]}, "`search.data`"),
    ({"lm_eval": ["zoo_sort_mc"], "include_path": "no/such/folder"}, {}, "include_path"),
])
def test_bad_lm_eval_objectives_are_refused_naming_the_key(objective, block, needle):
    from dppa_ui import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        search.parse_search(load_config(_cfg(objective, **block)))
    assert needle in str(e.value)


@pytest.mark.parametrize("objective, needle", [
    ({"lm_eval": ["zoo_sort_mc", "zoo_sotr_mc"], "include_path": TASKS}, "unknown lm-eval task 'zoo_sotr_mc'"),
    ({"lm_eval": ["zoo_sort_gen"], "metric": "acc_norm", "include_path": TASKS}, "does not report it"),
])
def test_unknown_tasks_and_metrics_are_refused_before_any_weight_is_read(objective, needle, monkeypatch):
    from dppa_ui import io
    monkeypatch.setattr(io, "read_state_dict", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=needle):
        search.run_search(_cfg(objective))


def test_cli_search_with_an_lm_eval_objective(tmp_path, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(_cfg({**GEN, "limit": 4}, budget=2)))
    assert main(["search", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test (test split, first 4): objective" in out and "zoo_sort_gen exact_match" in out
    header = (tmp_path / "out" / "search_log.csv").read_text().splitlines()[0]
    assert "score:zoo_cipher_gen" in header and "score:zoo_sort_gen" in header
