"""Scoring: suites, JSONL validation, the scores themselves, in-memory scoring and the alpha objective."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
from safetensors.torch import load_file

from dppa_ui import cli, zoo
from dppa_ui import modelbuild
from dppa_ui.evaluation import (alpha_objective, geometric_objective, load_suite, perplexity,
                                relative_gain, relative_scores, score_model, score_state_dict)
from dppa_ui.methods.dpa import greedy_alpha_search
from dppa_ui.methods.magnitude import magnitude_prune


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path



pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------- suites

@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a", "answer": ', "not valid JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ('{"prompt": "reverse: ab"}', "missing key 'answer'"),
    ('{"prompt": "reverse: ab", "answer": 7}', "'answer' must be a string"),
    ('{"prompt": "", "answer": "x"}', "'prompt' is empty"),
    ('{"prompt": "a", "answer": "b", "domain": 3}', "'domain' must be a non-empty string"),
])
def test_malformed_jsonl_line_is_named(tmp_path, line, problem):
    good = '{"prompt": "reverse: ab", "answer": "ba", "domain": "reverse"}'
    f = _write(tmp_path / "suite.jsonl", [good, "", line, good])
    with pytest.raises(ValueError) as e:
        load_suite(f)
    msg = str(e.value)
    assert "suite.jsonl" in msg and "line 3" in msg and problem in msg, msg


def test_user_suite_defaults_and_missing(tmp_path):
    f = _write(tmp_path / "mine.jsonl", ['{"prompt": "sort: 312", "answer": "123"}',
                                         '{"prompt": "reverse: ab", "answer": "ba", "domain": "reverse"}'])
    items = load_suite(f)
    assert [i["domain"] for i in items] == ["mine", "reverse"]
    with pytest.raises(ValueError, match="no items"):
        load_suite(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="not found"):
        load_suite(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="split must be"):
        load_suite("zoo", "train")


def test_zoo_suite_has_every_domain():
    items = load_suite("zoo", "test")
    assert [d for d in dict.fromkeys(i["domain"] for i in items)] == zoo.domain_names()
    assert len(items) == 200 * len(zoo.domain_names())
    assert all(set(i) == {"prompt", "answer", "domain"} for i in items)


# ----------------------------------------------------------------------------------------- math

def test_relative_gain_and_geometric_objective():
    assert relative_gain(0.5, 0.0, 1.0) == 0.5
    assert relative_gain(0.2, 0.2, 0.6) == 0.0
    assert relative_gain(0.7, 0.2, 0.2) is None
    s = {"a": {"smooth": 0.5}, "b": {"smooth": 0.8}}
    ft = {"a": {"smooth": 1.0}, "b": {"smooth": 0.8}}
    assert math.isclose(geometric_objective(s, ft), math.sqrt(0.5 * 1.0))
    assert geometric_objective({"a": {"smooth": 0.0}, "b": {"smooth": 0.8}}, ft) == 0.0
    rel = relative_scores({"a": {"em": 0.5, "smooth": 0.6}}, {"a": {"em": 0.0, "smooth": 0.2}},
                          {"a": {"em": 1.0, "smooth": 1.0}})
    assert rel["a"]["em_gain"] == 0.5 and math.isclose(rel["a"]["smooth_gain"], 0.5)


# -------------------------------------------------------------------------------------- scoring

def test_scores_on_a_user_suite(tmp_path):
    """A user's JSONL scores the same way: the reverse fine-tune gets right answers right and a wrong
    'answer' wrong, and the smooth score and log-likelihood see the difference too."""
    words = ["cat", "pilot", "mouse", "frog", "lamp", "tiger"]
    right = [json.dumps({"prompt": f"reverse: {w}", "answer": w[::-1], "domain": "right"}) for w in words]
    wrong = [json.dumps({"prompt": f"reverse: {w}", "answer": w, "domain": "wrong"}) for w in words]
    items = load_suite(_write(tmp_path / "u.jsonl", right + wrong))
    model, tok = modelbuild.load("demo:reverse", placed=False)
    s = score_model(model, tok, items, batch_size=4)           # several batches, left padding
    assert s["right"]["em"] >= 5 / 6 and s["wrong"]["em"] == 0.0
    assert s["right"]["smooth"] > s["wrong"]["smooth"] + 0.4
    assert s["right"]["loglik"] > s["wrong"]["loglik"] + 1.0
    assert s["right"]["n"] == 6
    # Batch size does not change the scores.
    s_big = score_model(model, tok, items, batch_size=64)
    for d in s:
        assert s[d]["em"] == s_big[d]["em"]
        assert math.isclose(s[d]["smooth"], s_big[d]["smooth"], abs_tol=1e-9)
        assert math.isclose(s[d]["loglik"], s_big[d]["loglik"], abs_tol=1e-4)


def test_score_state_dict_matches_and_does_not_leak():
    items = load_suite("zoo", "dev", ["sort"])
    ft_sd = load_file(str(zoo.demo_path("sort") / "model.safetensors"))
    base_sd = load_file(str(zoo.demo_path("base") / "model.safetensors"))
    direct = score_model(*modelbuild.load("demo:sort", placed=False), items)
    via_sd = score_state_dict("demo:base", ft_sd, items)
    assert via_sd["sort"]["em"] == direct["sort"]["em"]
    assert math.isclose(via_sd["sort"]["smooth"], direct["sort"]["smooth"], abs_tol=1e-9)
    # The cached skeleton now holds the fine-tune; scoring the base state dict must give the base.
    again = score_state_dict("demo:base", base_sd, items)
    assert again["sort"]["em"] <= 0.05 < direct["sort"]["em"]
    with pytest.raises(ValueError, match="does not match"):
        score_state_dict("demo:base", {k: v for k, v in base_sd.items() if "layers.0." not in k}, items)


def test_alpha_objective_and_search():
    f = alpha_objective("demo:cipher")
    assert f.domains == ["cipher"]
    ft = load_file(str(zoo.demo_path("cipher") / "model.safetensors"))
    base = load_file(str(zoo.demo_path("base") / "model.safetensors"))
    assert math.isclose(f(ft), 1.0, abs_tol=1e-9)
    assert f(base) < 0.6
    # The greedy search runs on the real scorer and never returns worse than its starting point.
    deltas = {k: magnitude_prune(ft[k] - base[k], 0.1) for k in base}

    def score(alpha):
        return f({k: base[k] + alpha[0] * d for k, d in deltas.items()})

    res = greedy_alpha_search(score, n_bands=1, start=[1.0], max_evals=6)
    assert res.score >= res.path[0][1] and res.path[0][0] == [1.0]
    assert 0.0 < res.score <= 1.05


def test_perplexity_prefers_the_skill_text():
    model, tok = modelbuild.load("demo:base", placed=False)
    seen = perplexity(model, tok, "planet backwards is tenalp.")
    noise = perplexity(model, tok, "p#l]a9n e~t b^a*c kw")
    assert 1.0 < seen < noise
    assert math.isfinite(perplexity(model, tok, "non-ASCII é ü is mapped to <unk>"))


# ------------------------------------------------------------------------------------------- CLI

def _cli(argv):
    return cli.main(argv)


def test_cli_score_json_and_errors(tmp_path, capsys):
    f = _write(tmp_path / "s.jsonl", ['{"prompt": "encode: ABC", "answer": "QWE", "domain": "cipher"}'])
    assert _cli(["score", "demo:cipher", "--suite", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scores"]["cipher"]["em"] == 1.0 and out["scores"]["cipher"]["n"] == 1
    bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "x", "answer": "y"}', "{oops"])
    assert _cli(["score", "demo:cipher", "--suite", str(bad)]) == 1
    assert "line 2" in capsys.readouterr().err
    assert _cli(["score", "demo:nope"]) == 1
    assert "valid names" in capsys.readouterr().err
    assert _cli(["score", "demo:base", "--perplexity", "abc backwards is cba.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
