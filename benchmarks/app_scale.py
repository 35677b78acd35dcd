"""The app at the sizes people merge, measured through its public API (printed, never asserted).

    python benchmarks/app_scale.py                       # demo family, 0.5 B and a deeper family
    python benchmarks/app_scale.py --families demo,0.5b  # a subset
    python benchmarks/app_scale.py --browser             # also: the demo page's time to interactive
    python benchmarks/app_scale.py --families 0.5b --merges-only --repeat 3   # the merge comparison alone

For each family the app runs in a server process of its own, as a Space runs it (its statistics
cache in a fresh folder), driven by gradio_client with the api names load_models, inspect, masks,
merge, chat, score, save. Printed beside each figure: the same operation's floor (reading the bytes
it needs from the page cache) and, for the merge, the CLI (`python -m dppa_ui merge` on the same
YAML, in its own process), run alternately with the app's merge in the same run.
  load -> first view   /load_models then /inspect (histogram + thresholds of one tensor), client time;
                       again after the server restarts (statistics then on disk)
  statistics ready     until /inspect no longer marks DP densities pending (the background pass)
  second load          a new session on the same models, until the statistics are back (disk cache)
  inspect, masks       median server time over density moves (handlers called in this process), and
                       the HTTP round trip
  merge                /merge (ties, density 0.2) vs the CLI on the same config: each one's own
                       reported time and their ratio, and the CPU seconds each took (the server's
                       during the request; the CLI's main()); the server process's absolute peak RssAnon
                       during the merge (and before it) vs the CLI process's peak plus the merged
                       model's size in its output dtype (the bound the app must stay under)
  chat, score, save    first reply (model built by accelerate), the demo suite (200 items), the zip
Each measurement prints the load average of the machine beside it: on shared cores, rerun when it
is high. 0.5 B / deep: Llama-shaped random bf16 models from benchmarks/_models.py (base + 3
fine-tunes, cached under bench-models/), given the demo family's character tokenizer so chat and
score run.
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
from merge_speed import rss_anon_kb, load_avg, measure  # noqa: E402


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
    """Peak RssAnon (absolute, MB) of process `pid` while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_kb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_kb(self.pid))
        self.peak_mb = self.peak / 1024


# app.py as it serves (its environment and handlers), on a given port, without opening a browser.
SERVE = """
import sys
import app
from dppa_ui.ui import launch_options
from dppa_ui.ui.common import stop_on_signals
opts = {k: v for k, v in launch_options().items() if k in ("run_history", "head", "css_paths")}
app.demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), prevent_thread_lock=True, quiet=True, **opts)
stop_on_signals()
print("ready", flush=True)
app.demo.block_thread()
"""


class Server:
    """The app in a process of its own, as app.py serves it (same settings, queue and handlers)."""

    def __init__(self, log: Path):
        import subprocess
        port = free_port()
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the server did not start; see {log}")
        self.pid, self.url = self.proc.pid, f"http://127.0.0.1:{port}/"

    def anon_mb(self) -> float:
        return rss_anon_kb(self.pid) / 1024

    def stop(self):
        import signal
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def read_floor(paths: list[str], names: list[str]) -> float:
    """Seconds to read `names` from every model folder into memory (page cache warm). safetensors
    may hand back a lazily mapped tensor, so each is copied: the bytes are really read."""
    from dppa_ui.io import CheckpointReader
    readers = [CheckpointReader(p) for p in paths]
    t0 = time.perf_counter()
    for r in readers:
        for n in names:
            r.get(n).clone()
    dt = time.perf_counter() - t0
    for r in readers:
        r.close()
    return dt


def ctl(**over) -> list:
    from dppa_ui.ui.common import api_controls
    return api_controls(**over)


def pending(table) -> bool:
    return any("*" in str(r[1]) for r in table["data"])


def first_view(url: str, base: str, fts: list[str]) -> tuple[float, object, dict]:
    """Seconds from /load_models to the first histogram + thresholds (a new session), its client and table."""
    from gradio_client import Client
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    out = client.predict(base, fts, api_name="/load_models")
    assert out[1].startswith("✓"), out[1]
    table = client.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")[1]
    return time.perf_counter() - t0, client, table


# `python -m dppa_ui merge ...` with the CPU seconds of main() printed: what the merge costs the CLI
# process, its imports left out (the engine is imported first, as the CLI's merge command does).
CLI = """
import sys, time
import dppa_ui.engine
from dppa_ui.cli import main
t = time.process_time()
rc = main(sys.argv[1:])
print(f"cpu {time.process_time() - t:.2f}", file=sys.stderr)
raise SystemExit(rc)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge_pair(client, server: Server, base: str, fts: list[str], work: Path, k: int) -> dict:
    """One app merge and one CLI merge of the same ties config (density 0.2), back to back: each
    one's own reported time and the CPU seconds it took (far less sensitive to other jobs)."""
    from dppa_ui.controls import MethodControls
    r: dict = {"load_before": load_avg()}
    with PeakAnon(server.pid) as before:
        time.sleep(0.5)
    with PeakAnon(server.pid) as pk:
        t0, c0 = time.perf_counter(), cpu_seconds(server.pid)
        summary, board, dl, status = client.predict(*ctl(preset="ties", density=0.2), api_name="/merge")
        r["app_wall"], r["app_cpu"] = time.perf_counter() - t0, cpu_seconds(server.pid) - c0
    assert status.startswith("✓"), status
    r["app"] = float(status.split("merged in ")[1].split(" s")[0])
    r["app_peak_mb"], r["app_idle_mb"] = pk.peak_mb, before.peak_mb
    cfg = MethodControls(preset="ties", density=0.2).to_config(base, fts)
    (work / "m.yaml").write_text(cfg.to_yaml())
    out = work / f"out-{k}"
    c0 = cpu_seconds(server.pid)
    cli = measure([sys.executable, "-c", CLI, "merge", str(work / "m.yaml"), "--out", str(out), "--quiet"],
                  work / "cli.log")
    r["server_cpu_during_cli"] = cpu_seconds(server.pid) - c0      # the server should be idle meanwhile
    log = (work / "cli.log").read_text()
    r["cli"] = float(log.split(" in ")[-1].split(" s")[0]) if " s;" in log else float("nan")
    r["cli_cpu"] = float(log.split("cpu ")[-1].split()[0])
    r["cli_wall"], r["cli_peak_mb"] = cli["seconds"], cli["peak_rss_anon_mb"]
    r["merged_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    r["load_after"] = load_avg()
    shutil.rmtree(out, ignore_errors=True)
    return r


def run_family(label: str, base: str, fts: list[str], args, work: Path) -> dict:
    from gradio_client import Client

    from dppa_ui.refs import resolve_model
    from dppa_ui.ui import common, inspect, models
    from dppa_ui.ui.common import AppState
    r: dict = {"family": label, "load": load_avg()}
    os.environ["DPPA_UI_CACHE_DIR"] = tempfile.mkdtemp(prefix="app-scale-cache-", dir=work)
    server = Server(work / "server.log")
    try:
        # load -> first histogram and thresholds (statistics not cached yet)
        r["first_view"], client, table = first_view(server.url, base, fts)
        r["first_view_pending"], r["first_view_load"] = pending(table), load_avg()
        t0 = time.perf_counter() - r["first_view"]
        while pending(table):
            time.sleep(0.25)
            table = client.predict(0, "mlp.down_proj", *ctl(), api_name="/inspect")[1]
        r["stats_ready"] = time.perf_counter() - t0
        paths = [str(resolve_model(x, policy=common.policy())) for x in [base, *fts]]
        from dppa_ui.io import CheckpointReader
        with CheckpointReader(paths[0]) as rd:
            all_names = [n for n in rd.names if rd.dtype(n).is_floating_point]
            one = rd.names[[i for i, n in enumerate(rd.names) if "mlp.down_proj" in n][0]]
        r["floor_stats"] = read_floor(paths, all_names)
        r["floor_one_tensor"] = read_floor(paths, [one])
        if not args.merges_only:
            # second load: a new session, statistics from the disk cache
            c2 = Client(server.url, verbose=False)
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
                v = {"state": state, "block": 0, "module": "mlp.down_proj", "matrix": mname, **common.DEFAULT_UI,
                     "density": d}
                t = time.perf_counter(); inspect.inspect(v); srv_i.append(time.perf_counter() - t)
                t = time.perf_counter(); inspect.masks(v); srv_m.append(time.perf_counter() - t)
                t = time.perf_counter(); client.predict(0, "mlp.down_proj", *ctl(density=d), api_name="/inspect")
                rt_i.append(time.perf_counter() - t)
                t = time.perf_counter(); client.predict(mname, *ctl(density=d), api_name="/masks")
                rt_m.append(time.perf_counter() - t)
            # the first move on a tensor pays its sort; report the median of the moves after it
            r["inspect_srv"], r["masks_srv"] = statistics.median(srv_i[1:]), statistics.median(srv_m[1:])
            r["inspect_first"], r["masks_first"] = srv_i[0], srv_m[0]
            r["inspect_rt"], r["masks_rt"] = statistics.median(rt_i[1:]), statistics.median(rt_m[1:])
            state.close()
        # merge: the app and the CLI on the same config, alternately
        r["merges"] = [merge_pair(client, server, base, fts, work, k) for k in range(args.repeat)]
        r["floor_merge"] = read_floor(paths, all_names)
        if not args.merges_only:
            # chat, score, save on the merged model
            t0 = time.perf_counter()
            client.predict("reverse: abc", [], [], "none", "", 0.0, 0.9, 16, api_name="/chat")
            r["chat_first"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.predict("reverse: abcd", [], [], "none", "", 0.0, 0.9, 16, api_name="/chat")
            r["chat_next"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = client.predict("demo suite", None, api_name="/score")
            r["score"] = time.perf_counter() - t0
            r["score_ok"] = out[-1].startswith("✓")
            t0 = time.perf_counter()
            r["save_status"] = client.predict(api_name="/save")[-1]
            r["save"] = time.perf_counter() - t0
    finally:
        server.stop()
    # a restart: a new server process, the statistics on disk; the same load -> first view
    restarts = []
    for _ in range(args.repeat):
        server = Server(work / "server.log")
        try:
            dt, _, table = first_view(server.url, base, fts)
            restarts.append((dt, load_avg()))
        finally:
            server.stop()
    r["restart_view"] = restarts
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
    ap.add_argument("--repeat", type=int, default=2, help="app/CLI merge pairs and restarts per family")
    ap.add_argument("--merges-only", action="store_true", help="skip inspect, masks, chat, score and save")
    ap.add_argument("--browser", action="store_true")
    args = ap.parse_args(argv)
    fams = families(args)
    os.environ["DPPA_UI_MODEL_ROOTS"] = os.pathsep.join([str(REPO / "assets" / "zoo"), args.cache_dir])
    print(f"cpus: {os.cpu_count()}, load average: {load_avg()}")
    work = Path(tempfile.mkdtemp(prefix="app-scale-"))
    try:
        if args.browser:
            os.environ["DPPA_UI_CACHE_DIR"] = tempfile.mkdtemp(prefix="app-scale-cache-", dir=work)
            server = Server(work / "server.log")
            try:
                t1, t2 = page_interactive(server.url)
            finally:
                server.stop()
            print(f"demo page: interactive {t1:.2f} s, histogram drawn {t2:.2f} s")
        for label, (base, fts) in fams.items():
            print_family(run_family(label, base, fts, args, work), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_family(f: dict, args) -> None:
    print(f"\n== {f['family']}  (load average at start {f['load']})")
    print(f"load -> first histogram + thresholds   {f['first_view']:6.2f} s"
          f"{'  (DP densities pending: target shown)' if f['first_view_pending'] else ''} (load {f['first_view_load']})")
    print("  after a server restart (statistics on disk): "
          + ", ".join(f"{dt:.2f} s (load {ld})" for dt, ld in f["restart_view"]))
    print(f"whole-model statistics ready           {f['stats_ready']:6.2f} s   floor (read every tensor once) "
          f"{f['floor_stats']:.2f} s")
    if not args.merges_only:
        print(f"second load (disk cache)               {f['second_load']:6.2f} s")
        print(f"inspect per move: server {1000 * f['inspect_srv']:7.1f} ms, round trip {1000 * f['inspect_rt']:7.1f} "
              f"ms, first move on the tensor {1000 * f['inspect_first']:.0f} ms; floor (read the tensor) "
              f"{1000 * f['floor_one_tensor']:.1f} ms")
        print(f"masks per move:   server {1000 * f['masks_srv']:7.1f} ms, round trip {1000 * f['masks_rt']:7.1f} ms, "
              f"first {1000 * f['masks_first']:.0f} ms")
    print(f"merge (ties, density 0.2), floor (read the inputs once) {f['floor_merge']:.2f} s:")
    for m in f["merges"]:
        bound = m["cli_peak_mb"] + m["merged_mb"]
        print(f"  app {m['app']:.2f} s (wall {m['app_wall']:.2f}) vs CLI {m['cli']:.2f} s (process {m['cli_wall']:.2f}) "
              f"= {m['app'] / m['cli']:.2f}x, CPU {m['app_cpu']:.1f} s vs {m['cli_cpu']:.1f} s = "
              f"{m['app_cpu'] / m['cli_cpu']:.2f}x; server peak RssAnon {m['app_peak_mb']:.0f} MB (before the merge "
              f"{m['app_idle_mb']:.0f}) vs CLI peak {m['cli_peak_mb']:.0f} + merged model {m['merged_mb']:.0f} = "
              f"{bound:.0f} MB ({'within' if m['app_peak_mb'] <= bound else 'OVER'}); load {m['load_before']} -> "
              f"{m['load_after']}; server CPU while the CLI ran {m['server_cpu_during_cli']:.1f} s")
    ratios = sorted(m["app"] / m["cli"] for m in f["merges"])
    cpu = sorted(m["app_cpu"] / m["cli_cpu"] for m in f["merges"])
    peaks = [m["app_peak_mb"] for m in f["merges"]]
    print(f"  app/CLI: time median {statistics.median(ratios):.2f}x, CPU median {statistics.median(cpu):.2f}x over "
          f"{len(ratios)} alternating pairs; server peak "
          f"RssAnon at most {max(peaks):.0f} MB against {min(m['cli_peak_mb'] + m['merged_mb'] for m in f['merges']):.0f}")
    if not args.merges_only:
        print(f"chat: first reply {f['chat_first']:.2f} s (model built), next {f['chat_next']:.2f} s; score (demo "
              f"suite, 6 models) {f['score']:.2f} s{'' if f['score_ok'] else ' FAILED'}; save {f['save']:.2f} s "
              f"({f['save_status'][:60]})")


if __name__ == "__main__":
    raise SystemExit(main())
