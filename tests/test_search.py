"""The merge-parameter search (dppa_ui/search.py): nevergrad's optimizers and DPPA's greedy walk on
one loop, candidates merged in memory and scored on dev data, the test split only for the result;
its presets `amplification: auto` and `lambda: auto`; bad search blocks refused; the CLI's files;
the same result from in-process, worker-process and Ray evaluation for the same seed and batch."""
from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import yaml

from dppa_ui import ConfigError, load_config, zoo
from dppa_ui import search
from dppa_ui.search import SearchParam, SearchSpec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
needs_zoo = pytest.mark.skipif(not (zoo.ZOO_DIR / "reverse" / "config.json").is_file(),
                               reason="assets/zoo is not built")


def dppa(params=None, **block):
    d = {"merge_method": "dppa", "base_model": "demo:base",
         "models": [{"model": "demo:reverse", "parameters": {"density": 0.2}},
                    {"model": "demo:sort", "parameters": {"density": 0.2}}]}
    if params is not None or block:
        d["search"] = {"parameters": params if params is not None else {"models[*].weight": [0.5, 1.5]}, **block}
    return d


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """12 dev and 20 test items per domain (reverse, sort) as JSONL: candidates score in a blink."""
    from dppa_ui.evaluation import load_suite
    root = tmp_path_factory.mktemp("search-data")
    out = {}
    for split, n in (("dev", 12), ("test", 20)):
        items = [it for d in ("reverse", "sort") for it in load_suite("zoo", split, domains=[d])[:n]]
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(it) + "\n" for it in items))
        out[split] = str(path)
    return out


# ------------------------------------------------------------------------------ the optimizer loop

def _spec(optimizer, budget, seed=3):
    return SearchSpec(params=[SearchParam("x", "lambda", None, None, 0.0, 2.0), SearchParam("y", "lambda", None, None, -1.0, 1.0)],
                      optimizer=optimizer, budget=budget, seed=seed)


def bowl(v):
    return 1.0 - (v[0] - 1.3) ** 2 - (v[1] + 0.4) ** 2


@pytest.mark.parametrize("optimizer,tol", [("ngopt", 0.05), ("cma", 0.05), ("oneplusone", 0.1)])
def test_nevergrad_search_finds_the_known_optimum(optimizer, tol):
    res = search.optimize(_spec(optimizer, 80), lambda pts: [{"objective": bowl(v)} for v in pts], init=[1.0, 0.0])
    assert abs(res.values[0] - 1.3) < tol and abs(res.values[1] + 0.4) < tol, res.values
    scored = [r["objective"] for r in res.rows]
    assert len(scored) == 80 and res.objective == max(scored) == pytest.approx(bowl(res.values))
    assert [r["best"] for r in res.rows] == [max(scored[:i + 1]) for i in range(80)]
    assert all(0 <= r["params"]["x"] <= 2 and -1 <= r["params"]["y"] <= 1 for r in res.rows)


def test_random_search_stays_in_bounds_and_improves_on_its_start():
    res = search.optimize(_spec("random", 40), lambda pts: [{"objective": bowl(v)} for v in pts], init=[0.0, 1.0])
    assert res.objective > bowl([0.0, 1.0]) + 0.5
    assert all(0 <= r["params"]["x"] <= 2 and -1 <= r["params"]["y"] <= 1 for r in res.rows)


def test_same_seed_and_batch_same_search():
    runs = [search.optimize(_spec("ngopt", 30, seed=s), lambda pts: [{"objective": bowl(v)} for v in pts],
                            init=[1.0, 0.0], batch=3) for s in (5, 5, 6)]
    assert runs[0].rows == runs[1].rows
    assert [r["params"] for r in runs[0].rows] != [r["params"] for r in runs[2].rows]


def test_greedy_walk_is_an_optimizer_of_the_same_loop():
    # DPPA's walk, through `optimize`: the end state [2.0, 1.0] (scored), not the best [2.0, 0.0].
    spec = SearchSpec(params=[SearchParam(f"a{k}", "amplification", 0, k, 0.0, 10.0) for k in range(2)],
                      optimizer="greedy", budget=60)

    def f(a):
        return 5 - (a[0] - 2.0) ** 2 - 0.5 * a[1]
    res = search.optimize(spec, lambda pts: [{"objective": f(v)} for v in pts], init=[1.8, 0.0], batch=4)
    assert res.values == pytest.approx([2.0, 1.0]) and res.objective == pytest.approx(f([2.0, 1.0]))
    assert [list(r["params"].values()) for r in res.rows][:4] == [pytest.approx(a) for a in
                                                                 ([1.8, 0.0], [1.9, 0.0], [2.0, 0.0], [2.1, 0.0])]


def _official_ngopt(budget, seed, init, lower, upper, f):
    """pcb_ES.py's search: NGOpt over a bounded array, `minimize(-f)`, its recommendation returned
    (seeded here as our optimizer is, so the two ask the same points)."""
    import nevergrad as ng
    import numpy as np
    arr = ng.p.Array(init=np.array(init, dtype=float), lower=np.array(lower, dtype=float),
                     upper=np.array(upper, dtype=float))
    arr.random_state = np.random.RandomState(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # NGOpt's inner solvers warn about their own settings
        return [float(x) for x in ng.optimizers.NGOpt(parametrization=arr, budget=budget).minimize(
            lambda x: -f(list(x))).value]


def test_recommendation_choice_returns_what_nevergrad_minimize_returns():
    # Scores come in steps (accuracies), so several points tie for the best: nevergrad recommends
    # one of them by its own rule, the `best` choice takes the first scored.
    def steps(v):
        return math.floor(10 * bowl(v)) / 10
    spec = _spec("ngopt", 30)
    spec.choice = "recommendation"
    res = search.optimize(spec, lambda pts: [{"objective": steps(v)} for v in pts], init=[1.0, 0.0])
    want = _official_ngopt(30, 3, [1.0, 0.0], [0.0, -1.0], [2.0, 1.0], steps)
    assert res.values == pytest.approx(want, abs=1e-12)
    assert res.objective == steps(res.values)              # scored (once more if never asked)
    best = search.optimize(_spec("ngopt", 30), lambda pts: [{"objective": steps(v)} for v in pts], init=[1.0, 0.0])
    assert [r["params"] for r in best.rows] == [r["params"] for r in res.rows if r["phase"] == "search"]
    first = next(r for r in best.rows if r["objective"] == max(x["objective"] for x in best.rows))
    assert best.values == list(first["params"].values()) and best.values != pytest.approx(res.values)


def test_mean_objective_is_the_mean_score_over_the_domains():
    scores = {"reverse": {"smooth": 0.2}, "sort": {"smooth": 0.6}, "cipher": {"smooth": 0.9}}
    assert search.Scoring([], ["reverse", "sort"], "mean").value(scores) == pytest.approx(0.4)
    geo = search.Scoring([], ["reverse", "sort"], "geometric", reference={"reverse": 0.4, "sort": 0.6})
    assert geo.value(scores) == pytest.approx((0.5 * 1.0) ** 0.5)


def test_cancel_stops_between_rounds_and_keeps_the_best():
    seen = []
    res = search.optimize(_spec("ngopt", 50), lambda pts: [{"objective": bowl(v)} for v in pts], init=[1.0, 0.0],
                          on_eval=seen.append, cancel=lambda: len(seen) >= 5)
    assert res.cancelled and len(res.rows) == 5 == len(seen)
    assert res.objective == max(r["objective"] for r in res.rows)


# ------------------------------------------------------------------------------ bad search blocks

@pytest.mark.parametrize("block,needles", [
    ({"parameters": {"models[*].gamma": [0, 1]}}, ["search.parameters.models[*].gamma", "unknown parameter"]),
    ({"parameters": {"temperature": [0, 1]}}, ["search.parameters.temperature", "unknown parameter"]),
    ({"parameters": {"models[*].weight": [0.5, 0.5]}}, ["models[*].weight", "empty bounds"]),
    ({"parameters": {"models[*].weight": [1.5, 0.5]}}, ["models[*].weight", "empty bounds"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "budget": 0}, ["search.budget", ">= 1"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "budget": 2.5}, ["search.budget", "integer"]),
    ({"parameters": {"models[*].weight": [0.5, "x"]}}, ["search.parameters.models[*].weight.upper", "number"]),
    ({"parameters": {}}, ["search.parameters", "at least one"]),
    ({"parameters": {"pcb_ratio": [0.05, 0.3]}}, ["pcb_ratio", "no effect", "combine: pcb"]),
    ({"parameters": {"models[2].weight": [0.5, 1.5]}}, ["models[2].weight", "out of range", "2 model(s)"]),
    ({"parameters": {"models[0].amplification[2]": [1, 2]}}, ["amplification[2]", "out of range"]),
    ({"parameters": {"models[0].partitions[1]": [0.05, 0.15]}}, ["partitions[1]", "the density"]),
    ({"parameters": {"models[*].density": [0.1, 1.5]}}, ["models[0].density", "1.5", "invalid config"]),
    ({"parameters": {"models[*].weight": {"lower": 0.5, "upper": 1.5, "init": 2.0}}}, ["init 2.0", "outside"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "optimizer": "bayes"}, ["search.optimizer", "bayes"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "data": ["missing.jsonl"]}, ["search.data", "missing.jsonl"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "budgets": 10}, ["search.budgets", "unknown key"]),
    ({"parameters": {"models[*].weight": [0.5, 1.5]}, "choice": "worst"}, ["search.choice", "worst", "recommendation"]),
    ({"parameters": {"weight": [0.5, 1.5], "models[*].weight": [0.5, 1.5], "models[0].weight": [0.5, 1]}},
     ["named twice"]),
])
def test_bad_search_blocks_are_refused_naming_the_key(block, needles):
    d = dppa()
    d["search"] = block
    with pytest.raises(ConfigError) as e:
        search.parse_search(load_config(d))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_search_block_round_trips_and_expands_per_model():
    cfg = load_config(dppa({"models[*].density": [0.1, 0.5], "weight": [0.5, 1.5], "lambda": [0.8, 1.2]},
                           budget=20, optimizer="cma", seed=4))
    spec = search.parse_search(load_config(cfg.to_dict()))
    assert [p.name for p in spec.params] == ["models[0].density", "models[1].density", "weight", "lambda"]
    assert (spec.budget, spec.optimizer, spec.seed) == (20, "cma", 4)
    assert (spec.objective, spec.choice) == ("geometric", "best")
    pcb_like = search.parse_search(load_config(dppa({"weight": [0.5, 1.5]}, objective="mean", choice="recommendation")))
    assert (pcb_like.objective, pcb_like.choice) == ("mean", "recommendation")
    # A moved density carries its partitions with it (they must end at the density).
    d = search.apply_values(search.search_base(cfg), spec.params[:1], [0.4])
    assert d["models"][0]["parameters"]["partitions"] == pytest.approx([0.2, 0.4])
    assert load_config(d).models[1].get("density") == 0.2


# ------------------------------------------------------------------------------ on the demo family

@needs_zoo
def test_search_scores_each_candidate_as_an_independent_merge_would(small_data):
    from dppa_ui import merge_in_memory
    from dppa_ui.evaluation import geometric_objective, load_suite, score_state_dict
    from dppa_ui.io import read_state_dict
    from dppa_ui.refs import resolve_model
    cfg = dppa({"models[*].weight": [0.5, 1.5], "models[*].density": [0.1, 0.5]}, budget=6, seed=1,
               data=[small_data["dev"]], test_data=[small_data["test"]])
    rows = []
    res = search.run_search(cfg, on_eval=rows.append)
    assert len(res.rows) == 6 == len(rows) and [r["eval"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) >= {"params", "objective", "best", "scores", "seconds", "error"}
    assert set(rows[0]["params"]) == {"models[0].weight", "models[1].weight", "models[0].density", "models[1].density"}
    top = max(rows, key=lambda r: r["objective"])
    assert res.objective == top["objective"] and res.values == top["params"]
    # The chosen config, merged and scored here from scratch, gives the same objective.
    base, fts = read_state_dict(resolve_model("demo:base")), [read_state_dict(resolve_model(f"demo:{d}"))
                                                               for d in ("reverse", "sort")]
    items = load_suite(small_data["dev"], "dev")
    merged = merge_in_memory(base, fts, res.config)
    s = score_state_dict("demo:base", merged, items, generate=False)
    refs = [score_state_dict("demo:base", ft, items, generate=False) for ft in fts]
    ref = {d: {"smooth": max(r[d]["smooth"] for r in refs)} for d in ("reverse", "sort")}
    assert geometric_objective(s, ref) == pytest.approx(res.objective, abs=1e-12)
    assert res.config.models[0].get("weight") == pytest.approx(res.values["models[0].weight"])
    assert res.config.search is None and load_config(res.config.to_dict()).models[1].get("density") == \
        pytest.approx(res.values["models[1].density"])
    # The test split is scored once, for the result only.
    assert set(res.test["scores"]) == {"reverse", "sort"} and all(v["n"] == 20 for v in res.test["scores"].values())
    assert 0 < res.test["objective"] <= 1.5


@needs_zoo
def test_cli_search_writes_a_yaml_that_merges_a_csv_and_a_plot(tmp_path, small_data):
    from dppa_ui.cli import main
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(dppa({"models[*].weight": [0.5, 1.5]}, budget=4, data=[small_data["dev"]],
                                        test_data=[small_data["test"]])))
    out = tmp_path / "out"
    assert main(["search", str(path), "--out", str(out), "--quiet"]) == 0
    with open(out / "search_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"models[0].weight", "objective", "best_so_far", "score:reverse"} <= set(rows[0])
    assert float(rows[-1]["best_so_far"]) == max(float(r["objective"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(max(float(r["objective"]) for r in rows))
    assert "plotly" in (out / "search_plot.html").read_text().lower()
    best = load_config(out / "best.yaml")
    assert best.search is None and [m.get("weight") for m in best.models] == pytest.approx(
        [summary["values"]["models[0].weight"], summary["values"]["models[1].weight"]])
    assert main(["merge", str(out / "best.yaml"), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    # The output folder is never overwritten without --overwrite.
    assert main(["search", str(path), "--out", str(out), "--quiet"]) == 1


@needs_zoo
def test_lambda_auto_is_searched_and_written_into_the_saved_yaml(tmp_path, monkeypatch):
    import dppa_ui
    monkeypatch.setattr(search, "LAMBDA_BUDGET", 6)        # the preset's budget is 100; the test needs few
    cfg = {"merge_method": "pcb", "base_model": "demo:base", "parameters": {"lambda": "auto", "pcb_ratio": 0.2},
           "models": [{"model": "demo:cipher"}, {"model": "demo:sort"}]}
    res = dppa_ui.merge(cfg, tmp_path / "out", log=lambda s: None)
    report = res.lambda_search
    assert report["evaluations"] == 6 and all(0.8 <= w <= 1.3 for w in report["weights"])
    saved = yaml.safe_load((tmp_path / "out" / "dppa_merge.yaml").read_text())
    assert saved["parameters"]["lambda"] == 1.0
    assert [m["parameters"]["weight"] for m in saved["models"]] == report["weights"]
    assert load_config(saved).lambda_auto is False


@needs_zoo
@pytest.mark.parametrize("ours", [False, True])
def test_lambda_auto_official_objective_and_recommendation(small_data, monkeypatch, ours):
    # The preset maximises the mean dev score over the models' domains and returns nevergrad's
    # recommendation (pcb_ES.py); `lambda_objective: geometric` / `lambda_choice: best` are ours.
    monkeypatch.setattr(search, "LAMBDA_BUDGET", 6)
    params = {"lambda": "auto", "pcb_ratio": 0.2, **({"lambda_objective": "geometric", "lambda_choice": "best"}
                                                      if ours else {})}
    cfg = load_config({"merge_method": "pcb", "base_model": "demo:base", "parameters": params,
                       "models": [{"model": "demo:reverse"}, {"model": "demo:sort"}],
                       "search": {"parameters": {"models[*].weight": [0.8, 1.3]}, "data": [small_data["dev"]]}})
    assert (cfg.get("lambda_objective"), cfg.get("lambda_choice")) == (("geometric", "best") if ours else ("mean", "recommendation"))
    res = search.lambda_search(cfg, None, None)
    rows = [r for r in res.rows if r["phase"] == "search"]
    assert len(rows) == 6
    mean = [sum(r["scores"][d] for d in ("reverse", "sort")) / 2 for r in rows]
    if ours:
        assert [r["objective"] for r in rows] != pytest.approx(mean)
        assert res.objective == max(r["objective"] for r in rows)
        return
    assert [r["objective"] for r in rows] == pytest.approx(mean)
    # nevergrad fed the same objectives in the same order asks the same points and recommends ours
    told = iter(r["objective"] for r in rows)
    asked = []
    want = _official_ngopt(6, cfg.seed, [1.0, 1.0], [0.8, 0.8], [1.3, 1.3],
                           lambda x: asked.append(x) or next(told))
    assert asked == [pytest.approx(list(r["params"].values()), abs=1e-12) for r in rows]
    assert list(res.values.values()) == pytest.approx(want, abs=1e-12)


@needs_zoo
def test_lambda_auto_needs_a_domain(tiny_family, tmp_path):
    import dppa_ui
    cfg = {"merge_method": "pcb", "base_model": str(tiny_family.base), "parameters": {"lambda": "auto"},
           "models": [{"model": str(p)} for p in tiny_family.fts]}
    with pytest.raises(ValueError, match="domain"):
        dppa_ui.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_zoo
def test_worker_processes_give_the_in_process_result(small_data):
    cfg = dppa({"models[*].weight": [0.5, 1.5], "models[*].density": [0.1, 0.5]}, budget=6, seed=2,
               data=[small_data["dev"]])
    local = search.run_search(cfg, batch=2, test=False)
    procs = search.run_search(cfg, workers=2, test=False)
    assert [r["params"] for r in procs.rows] == [r["params"] for r in local.rows]
    assert [r["objective"] for r in procs.rows] == [r["objective"] for r in local.rows]
    assert procs.values == local.values


@needs_zoo
def test_ray_actors_give_the_local_result(small_data):
    ray = pytest.importorskip("ray", reason="ray is not installed (optional: pip install ray)")
    cfg = dppa({"models[*].weight": [0.5, 1.5], "models[*].density": [0.1, 0.5]}, budget=6, seed=2,
               data=[small_data["dev"]])
    local = search.run_search(cfg, batch=2, test=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = search.run_search(cfg, workers=2, ray="auto", test=False)
    finally:
        ray.shutdown()
    assert [r["params"] for r in remote.rows] == [r["params"] for r in local.rows]
    assert [r["objective"] for r in remote.rows] == [r["objective"] for r in local.rows]
    assert remote.values == local.values and remote.config.to_dict() == local.config.to_dict()
