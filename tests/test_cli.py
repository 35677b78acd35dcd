"""`python -m dppa_ui merge CONFIG.yaml --out DIR`: every preset end to end on tiny random Llama
models (in process via dppa_ui.cli.main, plus one real subprocess), dry runs, and a one-line
`error:` exit for each bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dppa_ui import merge_in_memory
from dppa_ui.cli import main

ROOT = Path(__file__).resolve().parents[1]

PRESET_PARAMS = {
    "task_arithmetic": ({}, [{"weight": 0.6}, {"weight": 0.4}]),
    "ties": ({"density": 0.5}, [{"weight": 1.0}, {"weight": 0.5}]),
    "dare_linear": ({"density": 0.5}, [{}, {}]),
    "dare_ties": ({"density": 0.5}, [{}, {}]),
    "dp": ({"density": 0.3}, [{}, {}]),
    "dppa": ({"density": 0.2, "partitions": [0.1, 0.2], "amplification": [1.8, 1.0]}, [{}, {}]),
    "pcb": ({"pcb_ratio": 0.2}, [{}, {}]),
}


def write_cfg(tmp_path, fam, method, params=None, model_params=None, name="merge.yaml", **top):
    params, mparams = PRESET_PARAMS.get(method, ({}, [{}, {}])) if params is None else (params, model_params)
    mparams = mparams or [{} for _ in fam.fts]
    d = {"merge_method": method, "base_model": str(fam.base),
         "models": [{"model": str(p), "parameters": dict(mp)} for p, mp in zip(fam.fts, mparams)],
         "parameters": dict(params), "seed": 4, **top}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def run_main(capsys, *argv):
    capsys.readouterr()              # drop anything printed before (e.g. model building)
    rc = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected a one-line reason, got {len(lines)} lines:\n{err}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def load_and_generate(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    assert torch.isfinite(model(ids).logits).all()


# --------------------------------------------------------------------------- every preset

@pytest.mark.parametrize("method", list(PRESET_PARAMS))
def test_cli_merge_every_preset(tiny_family, read_weights, tmp_path, capsys, method):
    cfg = write_cfg(tmp_path, tiny_family, method)
    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, cfg, "--out", out, "--quiet", "--device", "cpu")
    assert rc == 0, err
    assert "merged" in stdout and str(out) in stdout
    load_and_generate(out)
    merged = read_weights(out)
    ref = merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, str(cfg))
    assert set(merged) == set(ref)
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k
    # the merge moved the weights (pruned/combined deltas are not all zero)
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged[k], tiny_family.base_sd[k])
    assert (out / "dppa_merge.yaml").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_cli_subprocess_end_to_end(tiny_family, read_weights, tmp_path):
    cfg = write_cfg(tmp_path, tiny_family, "dppa")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "dppa_ui", "merge", str(cfg), "--out", str(out), "--seed", "3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "merged" in p.stdout
    assert yaml.safe_load((out / "dppa_merge.yaml").read_text())["seed"] == 3
    load_and_generate(out)
    # and a failure: non-zero exit, one line, out left as it was
    p = subprocess.run([sys.executable, "-m", "dppa_ui", "merge", str(cfg), "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(p.returncode, p.stderr, "--overwrite")


def test_cli_seed_override_changes_dare(tiny_family, read_weights, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_family, "dare_ties")
    assert run_main(capsys, cfg, "--out", tmp_path / "a", "--quiet")[0] == 0
    assert run_main(capsys, cfg, "--out", tmp_path / "b", "--quiet")[0] == 0
    assert run_main(capsys, cfg, "--out", tmp_path / "c", "--quiet", "--seed", "99")[0] == 0
    a, b, c = (read_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cli_overwrite(tiny_family, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_family, "ties")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run_main(capsys, cfg, "--out", out, "--quiet")
    assert_one_line_error(rc, err, "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    rc, _, err = run_main(capsys, cfg, "--out", out, "--quiet", "--overwrite")
    assert rc == 0, err
    assert not (out / "notes.txt").exists()


def test_cli_multi_shard_output(tiny_family, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_family, "ties")
    rc, _, err = run_main(capsys, cfg, "--out", tmp_path / "out", "--quiet", "--shard-size", "20KB")
    assert rc == 0, err
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    load_and_generate(tmp_path / "out")


def test_cli_dry_run_prints_plan_and_writes_nothing(tiny_family, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_family, "dppa")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run_main(capsys, cfg, "--out", tmp_path / "out", "--dry-run")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for name in tiny_family.base_sd:
        assert name in out
    assert "memory" in out and "disk" in out and "time" in out
    assert "partitions" in out and "density" in out
    # no --out needed for a dry run
    rc, out2, err = run_main(capsys, cfg, "--dry-run")
    assert rc == 0, err and "model.norm.weight" in out2


# --------------------------------------------------------------------------- one-line errors

def _bad(tmp_path, fam, **change):
    d = {"merge_method": "ties", "base_model": str(fam.base),
         "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fam.fts]}
    for k, v in change.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("change,needles", [
    ({"frobnicate": 1}, ["frobnicate"]),
    ({"merge_method": "slerp"}, ["slerp", "parameters.t", "give it"]),
    ({"merge_method": "slerp", "parameters": {"t": 0.5}}, ["slerp", "exactly 1", "got 2"]),
    ({"merge_method": "frankenmerge"}, ["frankenmerge", "supported"]),
    ({"dtype": "int4"}, ["dtype", "int4"]),
    ({"slices": [{"sources": []}]}, ["slices"]),
    ({"base_model": None}, ["base_model"]),
])
def test_cli_config_errors_one_line(tiny_family, tmp_path, capsys, change, needles):
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family, **change), "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("params,needles", [
    ({"density": 1.5}, ["density", "1.5"]),
    ({"density": 0}, ["density"]),
    ({"weight": []}, ["weight", "empty"]),
    ({"weight": [{"filter": "mlp"}]}, ["weight[0]", "value"]),
])
def test_cli_model_parameter_errors_one_line(tiny_family, tmp_path, capsys, params, needles):
    models = [{"model": str(p), "parameters": params} for p in tiny_family.fts]
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family, models=models), "--out", tmp_path / "out")
    assert_one_line_error(rc, err, *needles)


def test_cli_missing_config_file(tmp_path, capsys):
    rc, _, err = run_main(capsys, tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "nope.yaml")


def test_cli_missing_model_folder(tiny_family, tmp_path, capsys):
    models = [{"model": str(tmp_path / "no" / "such" / "model")}]
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family, models=models), "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "no/such/model")


def test_cli_missing_out(tiny_family, tmp_path, capsys):
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family))
    assert_one_line_error(rc, err, "--out")


def test_cli_cuda_without_gpu(tiny_family, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family), "--out", tmp_path / "out", "--device", "cuda")
    assert_one_line_error(rc, err, "cuda")
    assert not (tmp_path / "out").exists()


def test_cli_incompatible_models_one_line(tiny_family, tmp_path, capsys):
    from conftest import write_tiny_llama
    write_tiny_llama(tmp_path / "wide", seed=0, vocab=96)     # embeddings/lm_head rows differ
    models = [{"model": str(tiny_family.fts[0]), "parameters": {"density": 0.5}},
              {"model": str(tmp_path / "wide"), "parameters": {"density": 0.5}}]
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family, models=models), "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "vocab")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_unreachable_hub_id_one_line(tiny_family, tmp_path, capsys):
    models = [{"model": "dppa-test-org/no-such-model@main", "parameters": {"density": 0.5}}]
    rc, _, err = run_main(capsys, _bad(tmp_path, tiny_family, models=models), "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "dppa-test-org/no-such-model")
    assert not (tmp_path / "out").exists()


def test_cli_pickle_weights_need_allow_pickle(tiny_family, read_weights, tmp_path, capsys):
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_bytes((tiny_family.fts[0] / "config.json").read_bytes())
    torch.save(tiny_family.ft_sds[0], pk / "pytorch_model.bin")
    models = [{"model": str(pk), "parameters": {"density": 0.5}},
              {"model": str(tiny_family.fts[1]), "parameters": {"density": 0.5}}]
    cfg = _bad(tmp_path, tiny_family, models=models)
    rc, _, err = run_main(capsys, cfg, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "--allow-pickle")
    assert not (tmp_path / "out").exists()
    rc, _, err = run_main(capsys, cfg, "--out", tmp_path / "out", "--allow-pickle", "--quiet")
    assert rc == 0, err
    ref = merge_in_memory(tiny_family.base_sd, tiny_family.ft_sds, str(cfg))
    got = read_weights(tmp_path / "out")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
