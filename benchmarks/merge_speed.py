"""Merge speed and memory: dppa_ui against mergekit and against the I/O floor.

    python benchmarks/merge_speed.py                 # ~0.5 B params, base + 3 fine-tunes, bf16
    python benchmarks/merge_speed.py --params 67e6   # the size the issue measured mergekit at
    python benchmarks/merge_speed.py --params 67e6 --layers 22 --json deep.json
    python benchmarks/merge_speed.py --params 67e6 --methods all    # every mergekit method + ours

Builds Llama-shaped random models (cached under bench-models/, keyed by shape), then runs,
each in its own process:
  - the floor: read every input tensor with safe_open and write the output tensors, no math;
  - `python -m dppa_ui merge CONFIG.yaml --out DIR` for each method asked for;
  - `mergekit-yaml CONFIG.yaml DIR` (default flags, CPU) for the same YAML, for every method
    mergekit has (our dp, dppa, pcb are compared with mergekit's ties), when
    mk-venv/bin/mergekit-yaml exists or mergekit is importable. Methods that take several models
    get all fine-tunes; slerp, nearswap and arcee_fusion get the base and one; passthrough copies
    one fine-tune's layers through `slices`.
Times are wall-clock for the whole process (interpreter start and imports included). Peak
memory is RssAnon (anonymous pages: not the reclaimable page cache that mmap'ed safetensors
files show up in) summed over the process and its children, sampled from /proc every ~20 ms.
The machine's load average is printed with every run: on a shared machine compare numbers
taken under the same load only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

MERGEKIT = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
            "della_linear", "sce", "ram", "ramplus_tl", "linear", "slerp", "nuslerp", "multislerp", "karcher",
            "model_stock", "nearswap", "arcee_fusion", "passthrough")
OURS = ("ties", "dare_ties", "dp", "dppa", "pcb")          # the default set; --methods all: every one
ALL = MERGEKIT + ("dp", "dppa", "pcb")
DENSITY = 0.2
# The target the issue sets for each of our methods, as a fraction of mergekit's time
# (mergekit's methods against the same method; dp, dppa, pcb against mergekit's ties).
TARGET = {**{m: 0.5 for m in MERGEKIT}, "dp": 1.0, "dppa": 1.0, "pcb": 1.0}
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
             "GRADIO_ANALYTICS_ENABLED": "False", "TRANSFORMERS_VERBOSITY": "error"}


# ---------------------------------------------------------------------------------------
# Configs


def config_yaml(method: str, base: Path, finetunes: list[Path], layers: int = 0) -> str:
    """The YAML both tools get (every mergekit method) or our preset YAML (dp, dppa, pcb)."""
    def models(params: str | None, fts=finetunes) -> str:
        p = f"\n    parameters: {params}" if params else ""
        return "models:\n" + "".join(f"  - model: {f}{p}\n" for f in fts)
    dens = "{weight: 1.0, density: %s}" % DENSITY
    head = f"merge_method: {method}\nbase_model: {base}\n"
    body = {
        "pcb": models("{weight: 1.0}") + "parameters: {pcb_ratio: %s}\n" % DENSITY,
        "ties": models(dens) + "parameters: {normalize: true}\n",
        "dppa": models(dens) + "parameters: {partitions: [0.1, 0.2], amplification: [1.8, 1.0]}\n",
        "dp": models(dens), "dare_ties": models(dens), "dare_linear": models(dens),
        "breadcrumbs": models(dens) + "parameters: {gamma: 0.01}\n",
        "breadcrumbs_ties": models(dens) + "parameters: {gamma: 0.01}\n",
        "della": models(dens) + "parameters: {epsilon: 0.1}\n",
        "della_linear": models(dens) + "parameters: {epsilon: 0.1}\n",
        "task_arithmetic": models("{weight: 0.5}"),
        "sce": models(None) + "parameters: {select_topk: 0.5}\n",
        "ram": models(None), "ramplus_tl": models(None),
        "linear": models("{weight: 1.0}"),
        "slerp": models(None, finetunes[:1]) + "parameters: {t: [0, 0.5, 1]}\n",
        "nuslerp": models("{weight: 1.0}", finetunes[:2]),
        "multislerp": models("{weight: 1.0}"),
        "karcher": models(None),
        "model_stock": models(None),
        "nearswap": models(None, finetunes[:1]) + "parameters: {t: 0.001}\n",
        "arcee_fusion": models(None, finetunes[:1]),
    }
    if method == "passthrough":
        return (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {finetunes[0]}, "
                f"layer_range: [0, {layers}]}}]\ndtype: bfloat16\n")
    if method in ("linear", "karcher"):
        head = f"merge_method: {method}\n"          # a base_model would be one more input
    return head + body[method] + "dtype: bfloat16\n"


# ---------------------------------------------------------------------------------------
# Measuring a process tree


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/PID/task/TID/children (cheap to read)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def measure(cmd: list[str], log_path: Path, interval: float = 0.02,
            timeout: float | None = None) -> dict:
    """Run cmd; return wall seconds, peak RssAnon (MB) of its tree, exit code, load."""
    env = {**os.environ, **CHILD_ENV}
    load_before = load_avg()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        peak, cpu = 0, None
        while True:
            # wait4 rather than poll(): its rusage gives the CPU seconds of the process and
            # its reaped children, a figure far less sensitive to other load than wall time.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                break
            peak = max(peak, sum(rss_anon_kb(p) for p in _tree(proc.pid)))
            if timeout and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                break
            time.sleep(interval)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_anon_mb": peak / 1024,
            "rc": proc.returncode,
            "load_before": load_before, "load_after": load_avg(), "cmd": cmd,
            "log": str(log_path)}


def tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join("      | " + l[-200:] for l in lines[-n:])


def output_tensor_names(out: Path) -> set[str]:
    """Tensor names in an output directory (sharded or not), for a sanity check."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            names.update(sf.keys())
    return names


# ---------------------------------------------------------------------------------------
# The floor (runs in a child process)


def floor_child(out: str, inputs: list[str]) -> None:
    """Read every input tensor, write the base's tensors as the output: I/O, no math."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (imported here so the I/O time below excludes it)
    from safetensors import safe_open
    from safetensors.torch import save_file

    t1 = time.perf_counter()
    handles = [safe_open(str(Path(p) / "model.safetensors"), "pt") for p in inputs]
    merged = {}
    for name in handles[0].keys():
        tensors = [h.get_tensor(name) for h in handles]
        merged[name] = tensors[0]
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(merged, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(inputs[0]) / "config.json", Path(out) / "config.json")
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "io_s": t2 - t1}))


# ---------------------------------------------------------------------------------------


def find_mergekit(arg: str | None) -> list[str] | None:
    if arg == "none":
        return None
    if arg:
        return [arg]
    exe = REPO / "mk-venv" / "bin" / "mergekit-yaml"
    if exe.exists():
        return [str(exe)]
    try:
        import importlib.util

        if importlib.util.find_spec("mergekit") is not None:
            return [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    except (ImportError, ValueError):
        pass
    return None


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=5e8,
                    help="approximate parameter count of each model (default 5e8)")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the depth, keeping the width --params picks")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--finetunes", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--cache-dir", default=str(REPO / "bench-models"))
    ap.add_argument("--methods", default=",".join(OURS),
                    help="methods to time, comma separated, or `all` (default: ties, dare_ties, dp, dppa, pcb)")
    ap.add_argument("--mergekit", default=None,
                    help="mergekit-yaml executable (default: mk-venv/bin/mergekit-yaml or an "
                         "importable mergekit); 'none' to skip")
    ap.add_argument("--python", default=sys.executable, help="interpreter for dppa_ui")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per entry; the fastest time and the largest peak are kept")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--json", default=None, help="save the results here")
    ap.add_argument("--floor-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.floor_child:
        floor_child(args.floor_child[0], args.floor_child[1:])
        return 0

    from _models import build_models, shape_for

    shape = shape_for(args.params, args.layers, args.vocab)
    t0 = time.perf_counter()
    base, fts = build_models(shape, args.finetunes, args.dtype, args.cache_dir)
    build_s = time.perf_counter() - t0
    bytes_per = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    info = {
        "shape": shape.__dict__, "params_m": shape.n_params() / 1e6,
        "largest_tensor_m": shape.largest_tensor() / 1e6,
        "model_mb": shape.n_params() * bytes_per / 2**20, "dtype": args.dtype,
        "finetunes": args.finetunes, "base": str(base), "build_s": build_s,
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    print(f"model: Llama h={shape.hidden} i={shape.intermediate} L={shape.layers} "
          f"V={shape.vocab}: {info['params_m']:.1f} M params, {info['model_mb']:.0f} MB "
          f"{args.dtype} each; largest tensor {info['largest_tensor_m']:.1f} M "
          f"({shape.largest_tensor() * 4 / 2**20:.0f} MB float32); base + {args.finetunes} "
          f"fine-tunes in {base.parent}")
    print(f"cpus: {os.cpu_count()}, load average now: {load_avg()}")

    # YAMLs and per-run logs are kept here (outputs are deleted unless --keep).
    (Path(args.cache_dir) / "runs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%m%d-%H%M%S-"),
                                 dir=Path(args.cache_dir) / "runs"))
    expected = set(shape.tensor_shapes())
    mergekit = find_mergekit(args.mergekit)
    methods = list(ALL) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL)}")

    runs: list[tuple[str, str, list[str], Path]] = []  # (tool, method, cmd, out)
    out = work / "floor"
    runs.append(("floor", "read+write", [sys.executable, str(Path(__file__).resolve()),
                                         "--floor-child", str(out), str(base),
                                         *map(str, fts)], out))
    if not mergekit:
        print("mergekit not found (no mk-venv/bin/mergekit-yaml, not importable): skipped")
    # mergekit's run of a method goes right before ours, so that both see about the same
    # load from whatever else shares the machine.
    # mergekit runs the methods it shares with us, plus ties as the yardstick for the rest.
    mk_methods = [m for m in MERGEKIT if mergekit and (
        m in methods or (m == "ties" and set(methods) - set(MERGEKIT)))]
    for m in dict.fromkeys([*mk_methods, *methods]):
        cfg = work / f"{m}.yaml"
        cfg.write_text(config_yaml(m, base, fts, shape.layers))
        if m in mk_methods:
            out = work / f"mergekit-{m}"
            runs.append(("mergekit", m, [*mergekit, str(cfg), str(out)], out))
        if m in methods:
            out = work / f"ours-{m}"
            runs.append(("dppa_ui", m, [args.python, "-m", "dppa_ui", "merge", str(cfg),
                                        "--out", str(out)], out))

    results = []
    try:
        for tool, method, cmd, out in runs:
            best = None
            for r in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                res = measure(cmd, work / f"{tool}-{method}.log", timeout=args.timeout)
                res.update(tool=tool, method=method)
                if res["rc"] == 0:
                    names = output_tensor_names(out)
                    if names != expected:
                        res["rc"] = "bad-output"
                        res["error"] = (f"output has {len(names)} tensors, expected "
                                        f"{len(expected)}; missing e.g. "
                                        f"{sorted(expected - names)[:3]}")
                if tool == "floor" and res["rc"] == 0:
                    lines = Path(res["log"]).read_text().strip().splitlines()
                    res.update(json.loads(lines[-1]))
                if best is None or (res["rc"] == 0 and res["seconds"] < best["seconds"]):
                    peak = max(res["peak_rss_anon_mb"], best["peak_rss_anon_mb"] if best else 0)
                    best = {**res, "peak_rss_anon_mb": peak}
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                if res["rc"] != 0:
                    break
            status = "ok" if best["rc"] == 0 else f"FAILED (rc={best['rc']})"
            extra = f" (I/O {best['io_s']:.2f} s)" if "io_s" in best else ""
            print(f"  {tool:8s} {method:16s} {best['seconds']:8.2f} s{extra}  "
                  f"cpu {fmt(best['cpu_seconds'], '.1f')} s  "
                  f"{best['peak_rss_anon_mb']:8.0f} MB  load {best['load_before']} -> "
                  f"{best['load_after']}  {status}", flush=True)
            if best["rc"] != 0:
                print(best.get("error", "") or tail(best["log"]))
            results.append(best)
    finally:
        if not args.keep:
            for f in work.glob("*"):
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)

    # ---- table
    ok = {(r["tool"], r["method"]): r for r in results if r["rc"] == 0}
    floor = ok.get(("floor", "read+write"))
    print()
    print(f"{'tool':9s} {'method':16s} {'seconds':>8s} {'cpu s':>7s} {'peak anon MB':>12s} "
          f"{'vs mergekit':>12s} {'cpu vs mk':>9s} {'target':>7s} {'vs floor':>9s}")
    for r in results:
        tool, method = r["tool"], r["method"]
        good = r["rc"] == 0
        ref = None
        if tool == "dppa_ui":
            ref = ok.get(("mergekit", method if method in MERGEKIT else "ties"))
        vs_mk = r["seconds"] / ref["seconds"] if (good and ref) else None
        cpu_mk = (r["cpu_seconds"] / ref["cpu_seconds"]
                  if (good and ref and r["cpu_seconds"] and ref["cpu_seconds"]) else None)
        vs_floor = r["seconds"] / floor["seconds"] if (good and floor) else None
        r["ratio_to_mergekit"] = vs_mk
        r["cpu_ratio_to_mergekit"] = cpu_mk
        r["mergekit_reference"] = (f"mergekit {method if method in MERGEKIT else 'ties'}"
                                   if ref else None)
        r["ratio_to_floor"] = vs_floor
        target = ""
        if vs_mk is not None:
            target = "ok" if vs_mk <= TARGET[method] else f">{TARGET[method]:g}x"
        ref_tag = "" if method in MERGEKIT or tool != "dppa_ui" else " (ties)"
        print(f"{tool:9s} {method:16s} "
              f"{fmt(r['seconds'] if good else None, '8.2f'):>8s} "
              f"{fmt(r['cpu_seconds'] if good else None, '7.1f'):>7s} "
              f"{fmt(r['peak_rss_anon_mb'] if good else None, '12.0f'):>12s} "
              f"{(fmt(vs_mk, '.2f') + 'x' + ref_tag) if vs_mk else '-':>12s} "
              f"{(fmt(cpu_mk, '.2f') + 'x') if cpu_mk else '-':>9s} "
              f"{target:>7s} {(fmt(vs_floor, '.1f') + 'x') if vs_floor else '-':>9s}")
    if floor:
        print(f"floor = whole process; its I/O alone took {floor['io_s']:.2f} s "
              f"(imports {floor['import_s']:.2f} s). Targets: mergekit's methods <= 0.5x mergekit, "
              "dp/dppa/pcb <= 1x mergekit ties (wall time), peak anon < 3 GB at 0.5 B.\n"
              "cpu s = user+sys CPU seconds of the process tree: steadier than wall time "
              "when others load the machine.")
    print(f"load average at the end: {load_avg()}")

    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
        print(f"saved {args.json}")
    print(f"configs and logs: {work}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
