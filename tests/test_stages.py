"""Multi-stage configs (several YAML documents, mergekit-multimerge's format): later stages read
earlier ones by name; every document is validated before the first merge; cycles, duplicate
names and several unnamed documents are refused."""
from __future__ import annotations

import pytest
import torch
import yaml

import dppa_ui
from dppa_ui import ConfigError, merge_in_memory
from dppa_ui.config import load_stages


def two_stage(fam, final_name=None):
    first = {"name": "soup", "merge_method": "linear", "models": [str(p) for p in fam.fts]}
    final = {"merge_method": "slerp", "base_model": str(fam.base), "models": ["soup"], "parameters": {"t": 0.5}}
    if final_name:
        final["name"] = final_name
    return yaml.safe_dump_all([final, first])          # order in the file does not matter


def test_two_stage_merge_equals_the_stages_run_by_hand(tiny_family, read_weights, tmp_path):
    fam = tiny_family
    p = tmp_path / "multi.yaml"
    p.write_text(two_stage(fam))
    res = dppa_ui.merge(p, tmp_path / "out")
    out = read_weights(tmp_path / "out")
    soup = merge_in_memory(None, fam.ft_sds, {"merge_method": "linear", "models": ["a", "b"]})
    ref = merge_in_memory(fam.base_sd, [soup], {"merge_method": "slerp", "base_model": "b", "models": ["s"],
                                               "parameters": {"t": 0.5}})
    assert all(torch.allclose(out[k], ref[k], atol=1e-6) for k in ref)
    assert any("stage soup" in n for n in res.notices)
    assert not [q for q in tmp_path.iterdir() if ".stages-" in q.name]      # temporary stage folder removed


def test_intermediate_dir_keeps_and_reuses_stages(tiny_family, tmp_path, capsys):
    from dppa_ui.cli import main
    p = tmp_path / "multi.yaml"
    p.write_text(two_stage(tiny_family))
    assert main(["merge", str(p), "--out", str(tmp_path / "out"), "-I", str(tmp_path / "stages"), "--quiet"]) == 0
    assert (tmp_path / "stages" / "soup" / "config.json").is_file()
    assert main(["merge", str(p), "--out", str(tmp_path / "out2"), "-I", str(tmp_path / "stages"), "--quiet"]) == 0
    assert "reused" in capsys.readouterr().err


def test_stage_order_and_refusals():
    docs = [{"name": "c", "merge_method": "linear", "models": ["a", "b"]},
            {"merge_method": "linear", "models": ["c", "d"]},
            {"name": "d", "merge_method": "linear", "models": ["c", "e"]}]
    order = load_stages(docs)
    assert [s.name for s in order] == ["c", "d", None] and order[-1].depends == ["c", "d"]
    with pytest.raises(ConfigError, match="cycle"):
        load_stages([{"name": "x", "merge_method": "linear", "models": ["y", "a"]},
                     {"name": "y", "merge_method": "linear", "models": ["x", "a"]}])
    with pytest.raises(ConfigError, match="named 'x'"):
        load_stages([{"name": "x", "merge_method": "linear", "models": ["a"]},
                     {"name": "x", "merge_method": "linear", "models": ["b"]}])
    with pytest.raises(ConfigError, match="only the final merge may be unnamed"):
        load_stages([{"merge_method": "linear", "models": ["a"]}, {"merge_method": "linear", "models": ["b"]}])
    with pytest.raises(ConfigError, match="document 2 \\(bad\\).*frobnicate"):
        load_stages([{"name": "ok", "merge_method": "linear", "models": ["a"]},
                     {"name": "bad", "merge_method": "linear", "models": ["b"], "frobnicate": 1}])


def test_load_config_points_multi_documents_to_the_stage_loader():
    with pytest.raises(ConfigError, match="multi-stage"):
        dppa_ui.load_config("merge_method: linear\nmodels: [a]\n---\nmerge_method: linear\nmodels: [b]\n")


def test_dry_run_lists_the_stages(tiny_family):
    res = dppa_ui.merge(two_stage(tiny_family), None, dry_run=True)
    assert "stage soup: linear" in res.report and "reads stage(s) soup" in res.report
