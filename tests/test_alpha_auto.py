"""`amplification: auto`: DPPA's greedy alpha search wired to the demo scorer, through the engine."""
import pytest
import yaml

import dppa_ui
from dppa_ui import zoo

pytestmark = pytest.mark.slow


def test_auto_amplification_searches_and_saves_the_chosen_alpha(tmp_path):
    if not (zoo.ZOO_DIR / "reverse" / "config.json").is_file():
        pytest.skip("demo family not built")
    cfg = {"merge_method": "dppa", "base_model": "demo:base",
           "models": [{"model": "demo:reverse", "parameters": {"density": 0.2, "amplification": "auto"}}]}
    logs = []
    res = dppa_ui.merge(cfg, tmp_path / "out", log=logs.append)
    report = res.alpha_search["demo:reverse"]
    scores = [s for _, s in report["path"]]
    # The search starts at the official [1.8, 0.0], walks in 0.1 steps, and returns the walk's end
    # state, as python_contral.py does: replayed here from the scores it saw.
    assert report["path"][0][0] == [1.8, 0.0]
    seen = {tuple(round(x, 6) for x in a): s for a, s in report["path"]}
    alpha, idx, best = [1.8, 0.0], 0, 0.0
    while idx < 2:
        s = seen[tuple(round(x, 6) for x in alpha)]
        if s > best:
            best, alpha[idx] = s, round(alpha[idx] + 0.1, 6)
        else:
            if alpha[idx] > 1:
                alpha[idx] = round(alpha[idx] - 0.1, 6)
            idx += 1
            if idx < 2:
                alpha[idx] = 1.0 if alpha[idx] < 0.1 else round(alpha[idx] + 0.1, 6)
    assert report["alpha"] == [round(a, 6) for a in alpha] and alpha[1] >= 1.0
    assert len(scores) >= 3
    saved = yaml.safe_load((tmp_path / "out" / "dppa_merge.yaml").read_text())
    assert saved["models"][0]["parameters"]["amplification"] == report["alpha"]
    assert any("chose" in line for line in logs)
    # The saved YAML re-runs (no search this time) to the same tensors.
    res2 = dppa_ui.merge(tmp_path / "out" / "dppa_merge.yaml", tmp_path / "again")
    assert res2.alpha_search == {}
    from safetensors.torch import load_file
    a = load_file(tmp_path / "out" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_auto_amplification_needs_a_domain(tmp_path, tiny_family):
    import pytest
    base, fts = tiny_family.base, tiny_family.fts
    cfg = {"merge_method": "dppa", "base_model": str(base),
           "models": [{"model": str(fts[0]), "parameters": {"density": 0.2, "amplification": "auto"}}]}
    with pytest.raises(ValueError, match="domain"):
        dppa_ui.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
