"""Cross-check: TSV-M, Iso-C and Iso-CTS through FusionBench 0.2.33 and through dppa_ui, tensor for tensor.

    python benchmarks/compare_fusionbench.py --fusionbench-python fb-venv/bin/python
    python benchmarks/compare_fusionbench.py --cases iso_cts_all4,tsv_m_pair_weights --verbose

The demo family (assets/zoo: base + four fine-tunes) is merged, pairs and all four, at several
lambda / per-task weights / common_space_fraction settings:
  - FusionBench: its own algorithm classes (TaskSingularVectorMerging, IsotropicMergingInCommonSubspace,
    IsotropicMergingInCommonAndTaskSubspace) run on a BaseModelPool of the transformers models, in
    FusionBench's own venv (a child process running this file with --fusionbench-side);
  - dppa_ui: the same merge as YAML through the CLI (the streaming engine) and through
    merge_in_memory (the app's in-memory path).
Printed per case: max |diff| over every tensor of each of ours against FusionBench's, with the
tensor where it is largest, and the largest |merged - base| for scale. Both do float32 arithmetic
on the same inputs, so the difference should be rounding only (PASS below 1e-6).

FusionBench's `alpha` / `scaling_factor` is our `lambda`; its per-task `alpha` list is our per-model
`weight` (it takes one or the other, so each case sets one). Needs FusionBench in its own venv:
    python3 -m venv fb-venv && fb-venv/bin/pip install torch==2.13.0 fusion-bench==0.2.33
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FINE_TUNES = ("brackets", "cipher", "reverse", "sort")
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
             "TRANSFORMERS_VERBOSITY": "error"}


def cases() -> dict[str, dict]:
    """name -> {method, models, lambda, weights, common_space_fraction} (None: the default)."""
    out: dict[str, dict] = {}

    def add(name, method, models, lam=None, weights=None, fraction=None):
        out[name] = {"method": method, "models": list(models), "lambda": lam, "weights": weights,
                     "common_space_fraction": fraction}

    for method in ("tsv_m", "iso_c", "iso_cts"):
        for pair in itertools.combinations(FINE_TUNES, 2):
            add(f"{method}_{'+'.join(pair)}", method, pair)
        add(f"{method}_all4", method, FINE_TUNES)
        add(f"{method}_three", method, FINE_TUNES[:3])          # T not a power of two
    add("tsv_m_all4_lambda0.6", "tsv_m", FINE_TUNES, lam=0.6)
    add("tsv_m_all4_weights", "tsv_m", FINE_TUNES, weights=[1.0, 0.5, 0.8, 1.3])
    add("tsv_m_pair_weights", "tsv_m", ("cipher", "sort"), weights=[0.7, 1.4])
    add("iso_c_all4_lambda1.5", "iso_c", FINE_TUNES, lam=1.5)
    add("iso_c_pair_lambda0.8", "iso_c", ("brackets", "reverse"), lam=0.8)
    add("iso_cts_all4_fraction0.5", "iso_cts", FINE_TUNES, fraction=0.5)
    add("iso_cts_all4_fraction0.95_lambda1.3", "iso_cts", FINE_TUNES, lam=1.3, fraction=0.95)
    add("iso_cts_pair_fraction0.3", "iso_cts", ("cipher", "reverse"), fraction=0.3)
    return out


# ----------------------------------------------------------------------------- FusionBench's side

def fusionbench_side(spec_path: str) -> None:
    """Runs in FusionBench's venv: every case through FusionBench's own algorithm class; writes
    each merged state dict to <out>/<case>/model.safetensors."""
    import copy

    import torch
    from fusion_bench.method import (IsotropicMergingInCommonAndTaskSubspace, IsotropicMergingInCommonSubspace,
                                     TaskSingularVectorMerging)
    from fusion_bench.modelpool import BaseModelPool
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    models = {n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for n, p in spec["paths"].items()}
    for name, case in spec["cases"].items():
        # the algorithms write the merge into the pretrained model, so each case gets a fresh copy
        pool = BaseModelPool({"_pretrained_": copy.deepcopy(models["base"]),
                              **{n: models[n] for n in case["models"]}})
        lam = 1.0 if case["lambda"] is None else case["lambda"]
        if case["method"] == "tsv_m":
            algo = TaskSingularVectorMerging(alpha=case["weights"] if case["weights"] is not None else lam)
        elif case["method"] == "iso_c":
            algo = IsotropicMergingInCommonSubspace(scaling_factor=lam)
        else:
            fraction = 0.8 if case["common_space_fraction"] is None else case["common_space_fraction"]
            algo = IsotropicMergingInCommonAndTaskSubspace(scaling_factor=lam, common_space_fraction=fraction)
        merged = algo.run(pool)
        sd = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
        folder = Path(spec["out"]) / name
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"))
        print(f"fusionbench: {name}", flush=True)


# ----------------------------------------------------------------------------- ours

def case_yaml(case: dict) -> str:
    lines = [f"merge_method: {case['method']}", "base_model: demo:base", "models:"]
    for i, n in enumerate(case["models"]):
        lines.append(f"  - model: demo:{n}")
        if case["weights"] is not None:
            lines.append(f"    parameters: {{weight: {case['weights'][i]}}}")
    params = {k: case[k] for k in ("lambda", "common_space_fraction") if case[k] is not None}
    if params:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    return "\n".join(lines) + "\n"


def max_diff(ref: dict, ours: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in sorted(ref):
        m = (ref[name].float() - ours[name].float()).abs().max().item()
        if m >= worst:
            worst, where = m, name
    return worst, where


def find_fusionbench(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("FUSIONBENCH_PYTHON"), str(REPO / "fb-venv" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fusionbench-python", default=None,
                    help="python of a venv with fusion-bench 0.2.33 (default: $FUSIONBENCH_PYTHON or fb-venv/)")
    ap.add_argument("--python", default=sys.executable, help="python that runs dppa_ui's CLI")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--verbose", action="store_true", help="print every tensor's max |diff|")
    ap.add_argument("--json", default=None, help="save the results here")
    ap.add_argument("--fusionbench-side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fusionbench_side:
        fusionbench_side(args.fusionbench_side)
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    import dppa_ui
    from dppa_ui import zoo
    from dppa_ui.io import read_state_dict

    fb_python = find_fusionbench(args.fusionbench_python)
    if fb_python is None:
        print("FusionBench not found: give --fusionbench-python (a venv with fusion-bench==0.2.33)")
        return 2
    all_cases = cases()
    names = args.cases.split(",") if args.cases else list(all_cases)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(all_cases)}")
        return 2
    chosen = {n: all_cases[n] for n in names}
    env = {**os.environ, **CHILD_ENV}
    work = Path(tempfile.mkdtemp(prefix="compare-fusionbench-"))
    results, failed = [], False
    try:
        fb_out = work / "fusionbench"
        fb_out.mkdir()
        paths = {n: str(zoo.demo_path(n)) for n in ("base", *FINE_TUNES)}
        spec = work / "spec.json"
        spec.write_text(json.dumps({"paths": paths, "cases": chosen, "out": str(fb_out)}))
        p = subprocess.run([fb_python, str(Path(__file__).resolve()), "--fusionbench-side", str(spec)],
                           cwd=work, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print("FusionBench failed:\n" + (p.stdout + p.stderr)[-3000:])
            return 1
        base_sd = read_state_dict(paths["base"])
        sds = {n: read_state_dict(paths[n]) for n in FINE_TUNES}
        for name, case in chosen.items():
            fb = read_state_dict(fb_out / name)
            cfg_path = work / f"{name}.yaml"
            cfg_path.write_text(case_yaml(case))
            out = work / f"ours-{name}"
            p = subprocess.run([args.python, "-m", "dppa_ui", "merge", str(cfg_path), "--out", str(out), "--quiet"],
                               cwd=REPO, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{name}: dppa_ui failed:\n{(p.stdout + p.stderr)[-2000:]}")
                failed = True
                continue
            engine = read_state_dict(out)
            memory = dppa_ui.merge_in_memory(base_sd, [sds[n] for n in case["models"]], cfg_path.read_text())
            if set(fb) != set(engine) or set(fb) != set(memory):
                print(f"{name}: tensors differ: only FusionBench {sorted(set(fb) - set(engine))[:3]}, "
                      f"only ours {sorted(set(engine) - set(fb))[:3]}")
                failed = True
                continue
            d_engine, at_engine = max_diff(fb, engine)
            d_memory, at_memory = max_diff(fb, memory)
            moved = max((fb[k] - base_sd[k]).abs().max().item() for k in fb)
            ok = d_engine <= args.tol and d_memory <= args.tol
            failed |= not ok
            results.append({"case": name, **case, "engine": d_engine, "engine_at": at_engine, "in_memory": d_memory,
                            "in_memory_at": at_memory, "max_moved": moved, "ok": ok})
            print(f"{name:38s} engine {d_engine:.2g} ({at_engine}), in-memory {d_memory:.2g}; "
                  f"max|merged - base| {moved:.3g}  {'PASS' if ok else f'FAIL (> {args.tol:g})'}", flush=True)
            if args.verbose:
                for k in sorted(fb):
                    print(f"    {k:45s} {(fb[k] - engine[k]).abs().max().item():.3g}")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(r['ok'] for r in results)}/{len(chosen)} cases agree with FusionBench 0.2.33 "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads here)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
