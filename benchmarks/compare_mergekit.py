"""Cross-check: the same ties / task_arithmetic YAML through mergekit and through dppa_ui.

    python benchmarks/compare_mergekit.py            # float32, 2 layers, hidden 64
    python benchmarks/compare_mergekit.py --dtype bfloat16

The issue's contract: a mergekit ties/task_arithmetic YAML runs unchanged here and gives the
same tensors. In float32 both tools do the same float32 arithmetic, so the difference should
be rounding only (~1e-7 relative); in bfloat16 mergekit does its math in bfloat16 while we
do it in float32, and ties at the magnitude threshold (common among bf16 deltas) may be
broken differently, so only a small fraction of entries should differ by ~1 bf16 ulp.

Needs mergekit: mk-venv/bin/mergekit-yaml (see merge_speed.py) or --mergekit PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from dppa_ui.io import read_state_dict  # noqa: E402
from _models import LlamaShape, build_models  # noqa: E402
from merge_speed import CHILD_ENV, find_mergekit  # noqa: E402

# Per-model weights and densities differ on purpose, so per-model parameters, negative
# weights (task negation) and the normalize divisor are all exercised.
CASES = {
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {ft2}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.8, density: 0.9}}
dtype: {dtype}
""",
    "ties_nonorm_lambda": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: -0.4, density: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.7, density: 0.3}}
parameters: {{normalize: false, lambda: 0.9}}
dtype: {dtype}
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
  - model: {ft3}
    parameters: {{weight: -0.3}}
dtype: {dtype}
""",
    "task_arithmetic_norm": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.25}}
parameters: {{normalize: true}}
dtype: {dtype}
""",
}


def run(cmd: list[str]) -> str | None:
    import os

    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **CHILD_ENV})
    if p.returncode != 0:
        return (p.stdout + p.stderr).strip()[-2000:]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mergekit", default=None)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--verbose", action="store_true", help="print every tensor")
    args = ap.parse_args(argv)

    mergekit = find_mergekit(args.mergekit)
    if not mergekit:
        print("mergekit not found: install it into mk-venv (see merge_speed.py)")
        return 2
    shape = LlamaShape(vocab=256, hidden=64, intermediate=192, layers=2, head_dim=16)
    work = Path(tempfile.mkdtemp(prefix="compare-mergekit-"))
    base, fts = build_models(shape, 3, args.dtype, work / "models", seed=1)
    paths = {"base": base, **{f"ft{i + 1}": p for i, p in enumerate(fts)}}
    tol = 1e-6 if args.dtype == "float32" else None
    failed = False
    try:
        base_t = read_state_dict(base)
        for case in args.cases.split(","):
            cfg = work / f"{case}.yaml"
            cfg.write_text(CASES[case].format(dtype=args.dtype, **paths))
            mk_out, our_out = work / f"mk-{case}", work / f"ours-{case}"
            err = run([*mergekit, str(cfg), str(mk_out)])
            if err:
                print(f"{case}: mergekit failed:\n{err}")
                failed = True
                continue
            err = run([args.python, "-m", "dppa_ui", "merge", str(cfg), "--out", str(our_out),
                       "--quiet"])
            if err:
                print(f"{case}: dppa_ui failed:\n{err}")
                failed = True
                continue
            mk, ours = read_state_dict(mk_out), read_state_dict(our_out)
            if set(mk) != set(ours):
                print(f"{case}: tensor names differ: only mergekit {sorted(set(mk) - set(ours))[:5]}"
                      f", only ours {sorted(set(ours) - set(mk))[:5]}")
                failed = True
                continue
            worst, worst_name, n_diff, n_all, n_moved = 0.0, "", 0, 0, 0
            for name in sorted(mk):
                a, b = mk[name], ours[name]
                if a.dtype != b.dtype or a.shape != b.shape:
                    print(f"  {case} {name}: mergekit {a.dtype} {tuple(a.shape)} vs ours "
                          f"{b.dtype} {tuple(b.shape)}")
                    failed = True
                    continue
                d = (a.float() - b.float()).abs()
                m = d.max().item()
                n_diff += int((d > 0).sum())
                n_all += d.numel()
                # Entries the merge moved off the base: shows the check is not vacuous.
                n_moved += int((b.float() != base_t[name].float()).sum())
                if args.verbose:
                    print(f"  {case:22s} {name:45s} max|diff| {m:.3g}  "
                          f"(max|x| {a.float().abs().max().item():.3g})")
                if m >= worst:
                    worst, worst_name = m, name
            verdict = ""
            if tol is not None:
                ok = worst <= tol
                failed |= not ok
                verdict = "PASS" if ok else f"FAIL (> {tol:g})"
            print(f"{case:22s} {args.dtype}: {len(mk)} tensors, max|diff| {worst:.3g} "
                  f"at {worst_name}; {n_diff}/{n_all} entries differ; the merge moved "
                  f"{100 * n_moved / n_all:.1f}% of entries off the base  {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
