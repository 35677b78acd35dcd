"""The app at the sizes people merge, measured through its public API (printed, never asserted).

    python benchmarks/app_scale.py                       # demo family, 0.5 B and a deeper family
    python benchmarks/app_scale.py --families demo,0.5b  # a subset
    python benchmarks/app_scale.py --browser             # also: the demo page's time to interactive

For each family the app runs in this process (its statistics cache in a fresh folder), driven by
gradio_client with the api names load_models, inspect, masks, heatmap, merge, chat, score, save.
Printed beside each figure: the same operation's floor (reading the bytes it needs from the page
cache) and, for the merge, the CLI (`python -m dppa_ui merge` on the same YAML, in its own process).
  load -> first view   /load_models then /inspect (histogram + thresholds of one tensor), client time
  statistics ready     until /inspect no longer marks DP densities pending (the background pass)
  second load          a new session on the same models, until the statistics are back (disk cache)
  inspect, masks       median server time over density moves (handlers called in this process), and
                       the HTTP round trip
  merge                /merge (dppa, density 0.2) vs the CLI's own reported time; peak RssAnon of
                       this process during the merge vs the CLI process's
  chat, score, save    first reply (model built by accelerate), the demo suite (200 items), the zip
0.5 B / deep: Llama-shaped random bf16 models from benchmarks/_models.py (base + 3 fine-tunes,
cached under bench-models/), given the demo family's character tokenizer so chat and score run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
             "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(k, v)

import warnings  # noqa: E402

warnings.filterwarnings("ignore")
from merge_speed import _rss_anon_kb, load_avg, measure  # noqa: E402


def families(args) -> dict[str, tuple[str, list[str]]]:
    from _models import build_models, shape_for
    out = {}
    for name in args.families.split(","):
        if name == "demo":
            out["demo (0.9 M)"] = ("demo:base", ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"])
            continue
        layers = args.deep_layers if name == "deep" else None
        shape = shape_for(args.params, layers)
        base, fts = build_models(shape, 3, "bfloat16", args.cache_dir)
        for p in [base, *fts]:
            add_tokenizer(p)
        out[f"{name} ({shape.n_params() / 1e9:.2f} B, {shape.layers} layers)"] = (str(base), [str(f) for f in fts])
    return out


def add_tokenizer(folder: Path) -> None:
    """The demo family's character tokenizer and chat template, so a random model can chat."""
    from dppa_ui import zoo
    src = zoo.demo_path("base")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakAnon:
    """Peak RssAnon of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon_kb(os.getpid()))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def read_floor(paths: list[str], names: list[str]) -> float:
    """Seconds to read `names` from every model folder into memory (page cache warm)."""
    from dppa_ui.io import CheckpointReader
    readers = [CheckpointReader(p) for p in paths]
    t0 = time.perf_counter()
    for r in readers:
        for n in names:
            r.get(n)
    dt = time.perf_counter() - t0
    for r in readers:
        r.close()
    return dt


def ctl(**over) -> list:
    from dppa_ui.ui.common import api_controls
    return api_controls(**over)


def pending(table) -> bool:
    return any("*" in str(r[1]) for r in table["data"])


def run_family(label: str, base: str, fts: list[str], demo) -> dict:
    from gradio_client import Client

    from dppa_ui.controls import MethodControls
    from dppa_ui.ui import common, inspect, models
    from dppa_ui.ui.common import AppState
    r: dict = {"family": label}
    url = demo.local_url
    client = Client(url, verbose=False)
    # load -> first histogram and thresholds
    t0 = time.perf_counter()
    out = client.predict(base, fts, api_name="/load_models")
    assert out[1].startswith("✓"), out[1]
    fig, table, name, matrix, status = client.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")
    r["first_view"] = time.perf_counter() - t0
    r["first_view_pending"] = pending(table)
    while pending(table):
        time.sleep(0.25)
        fig, table, name, matrix, status = client.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")
    r["stats_ready"] = time.perf_counter() - t0
    paths = [str(models.resolve_model(x, policy=common.policy())) for x in [base, *fts]]
    from dppa_ui.io import CheckpointReader
    with CheckpointReader(paths[0]) as rd:
        all_names = [n for n in rd.names if rd.dtype(n).is_floating_point]
    r["floor_stats"] = read_floor(paths, all_names)
    r["floor_one_tensor"] = read_floor(paths, [name.strip("`")])
    # second load: a new session, statistics from the disk cache
    c2 = Client(url, verbose=False)
    t0 = time.perf_counter()
    c2.predict(base, fts, api_name="/load_models")
    table = c2.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")[1]
    while pending(table):
        time.sleep(0.05)
        table = c2.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")[1]
    r["second_load"] = time.perf_counter() - t0
    # inspect / masks per slider move: server time (the handlers, in this process) and round trip
    state = AppState()
    models.load_models({"state": state, "base": base, "fts": fts})
    state.ws.stats.wait(timeout=600)
    densities = [0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
    mname = state.ws.access.tensor_name(0, "mlp.down_proj")
    srv_i, srv_m, rt_i, rt_m = [], [], [], []
    for d in densities:
        v = {"state": state, "block": 0, "module": "mlp.down_proj", "matrix": mname, **common.DEFAULT_UI, "density": d}
        t = time.perf_counter(); inspect.inspect(v); srv_i.append(time.perf_counter() - t)
        t = time.perf_counter(); inspect.masks(v); srv_m.append(time.perf_counter() - t)
        t = time.perf_counter(); client.predict(0, "mlp.down_proj", *ctl(density=d), api_name="/inspect")
        rt_i.append(time.perf_counter() - t)
        t = time.perf_counter(); client.predict(mname, *ctl(density=d), api_name="/masks"); rt_m.append(time.perf_counter() - t)
    # the first move on a tensor pays its sort; report the median of the moves after it
    r["inspect_srv"], r["masks_srv"] = statistics.median(srv_i[1:]), statistics.median(srv_m[1:])
    r["inspect_first"], r["masks_first"] = srv_i[0], srv_m[0]
    r["inspect_rt"], r["masks_rt"] = statistics.median(rt_i[1:]), statistics.median(rt_m[1:])
    state.close()
    # merge: the app vs the CLI on the same config
    with PeakAnon() as before:
        time.sleep(0.2)
    with PeakAnon() as pk:
        t0 = time.perf_counter()
        summary, board, dl, status = client.predict(*ctl(density=0.2), api_name="/merge")
        r["merge_app_wall"] = time.perf_counter() - t0
    assert status.startswith("✓"), status
    r["merge_app"] = float(status.split("merged in ")[1].split(" s")[0])
    r["merge_app_peak_mb"] = pk.peak / 1024
    r["idle_anon_mb"] = before.peak / 1024
    cfg = MethodControls(density=0.2).to_config(base, fts)
    work = Path(tempfile.mkdtemp(prefix="app-scale-"))
    (work / "m.yaml").write_text(cfg.to_yaml())
    cli = measure([sys.executable, "-m", "dppa_ui", "merge", str(work / "m.yaml"), "--out", str(work / "out"),
                   "--quiet"], work / "cli.log")
    log = (work / "cli.log").read_text()
    r["merge_cli"] = float(log.split(" in ")[-1].split(" s;")[0]) if " s;" in log else float("nan")
    r["merge_cli_wall"], r["merge_cli_peak_mb"] = cli["seconds"], cli["peak_rss_anon_mb"]
    out_bytes = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
    r["merged_mb"] = out_bytes / 2**20
    r["floor_merge"] = read_floor(paths, all_names)
    shutil.rmtree(work, ignore_errors=True)
    # chat, score, save on the merged model
    t0 = time.perf_counter()
    hist, hist_c, box, status = client.predict("reverse: abc", [], [], "none", "", 0.0, 0.9, 16, api_name="/chat")
    r["chat_first"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hist, *_ = client.predict("reverse: abcd", [], [], "none", "", 0.0, 0.9, 16, api_name="/chat")
    r["chat_next"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = client.predict("demo suite", None, api_name="/score")
    r["score"] = time.perf_counter() - t0
    r["score_ok"] = out[-1].startswith("✓")
    t0 = time.perf_counter()
    r["save_status"] = client.predict(api_name="/save")[-1]
    r["save"] = time.perf_counter() - t0
    return r


def page_interactive(url: str) -> tuple[float, float]:
    from playwright.sync_api import expect, sync_playwright
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = b.new_page(viewport={"width": 1500, "height": 1000})
        t0 = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        expect(page.locator("#load-models-btn")).to_be_enabled(timeout=60_000)
        t1 = time.perf_counter() - t0
        expect(page.locator("#histogram .js-plotly-plot")).to_have_count(1, timeout=60_000)
        t2 = time.perf_counter() - t0
        b.close()
    return t1, t2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="demo,0.5b,deep")
    ap.add_argument("--params", type=float, default=5e8)
    ap.add_argument("--deep-layers", type=int, default=54)
    ap.add_argument("--cache-dir", default=str(REPO / "bench-models"))
    ap.add_argument("--browser", action="store_true")
    args = ap.parse_args(argv)
    fams = families(args)
    os.environ["DPPA_UI_CACHE_DIR"] = tempfile.mkdtemp(prefix="app-scale-cache-")
    os.environ["DPPA_UI_MODEL_ROOTS"] = os.pathsep.join([str(REPO / "assets" / "zoo"), args.cache_dir])
    from dppa_ui.ui import build_app, launch_options
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    opts = {k: v for k, v in launch_options().items() if k in ("run_history", "head", "css_paths")}
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, **opts)
    print(f"cpus: {os.cpu_count()}, load average: {load_avg()}")
    rows = []
    try:
        if args.browser:
            t1, t2 = page_interactive(demo.local_url)
            print(f"demo page: interactive {t1:.2f} s, histogram drawn {t2:.2f} s")
        for label, (base, fts) in fams.items():
            r = run_family(label, base, fts, demo)
            r["load"] = load_avg()
            rows.append(r)
            print_family(r)
    finally:
        demo.close()
    return 0


def print_family(r: dict) -> None:
    f = r
    print(f"\n== {f['family']}  (load average {f['load']})")
    print(f"load -> first histogram + thresholds   {f['first_view']:6.2f} s"
          f"{'  (DP densities pending: target shown)' if f['first_view_pending'] else ''}")
    print(f"whole-model statistics ready           {f['stats_ready']:6.2f} s   floor (read every tensor once) "
          f"{f['floor_stats']:.2f} s")
    print(f"second load (disk cache)               {f['second_load']:6.2f} s")
    print(f"inspect per move: server {1000 * f['inspect_srv']:7.1f} ms, round trip {1000 * f['inspect_rt']:7.1f} ms, "
          f"first move on the tensor {1000 * f['inspect_first']:.0f} ms; floor (read the tensor) "
          f"{1000 * f['floor_one_tensor']:.1f} ms")
    print(f"masks per move:   server {1000 * f['masks_srv']:7.1f} ms, round trip {1000 * f['masks_rt']:7.1f} ms, "
          f"first {1000 * f['masks_first']:.0f} ms")
    print(f"merge: app {f['merge_app']:.2f} s (wall {f['merge_app_wall']:.2f} s) vs CLI {f['merge_cli']:.2f} s "
          f"(process {f['merge_cli_wall']:.2f} s) = {f['merge_app'] / f['merge_cli']:.2f}x; floor (read inputs) "
          f"{f['floor_merge']:.2f} s")
    print(f"       peak anon: app process {f['merge_app_peak_mb']:.0f} MB (idle {f['idle_anon_mb']:.0f} MB, "
          f"+{f['merge_app_peak_mb'] - f['idle_anon_mb']:.0f} MB), CLI {f['merge_cli_peak_mb']:.0f} MB; merged model "
          f"{f['merged_mb']:.0f} MB")
    print(f"chat: first reply {f['chat_first']:.2f} s (model built), next {f['chat_next']:.2f} s; score (demo suite, "
          f"6 models) {f['score']:.2f} s{'' if f['score_ok'] else ' FAILED'}; save {f['save']:.2f} s "
          f"({f['save_status'][:60]})")


if __name__ == "__main__":
    raise SystemExit(main())
