"""Every event of the app as a plain function: inputs are component values, outputs are values or
`gr.update`s, and the per-browser-session `AppState` travels in a `gr.State`.

The UI layer only wires components to the core (dppa_ui.session, .analysis, .chat, .engine,
.evaluation). Bad input never raises out of a callback: it becomes a visible status line (and a
toast) and leaves the session as it was, so the user can fix it and go on.
"""
from __future__ import annotations

import functools
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from .. import zoo
from ..chat import chat_stream, to_messages
from ..config import PRESET_INFO, PRESETS, ConfigError, MergeConfig, load_config

# ----------------------------------------------------------------------------------- constants

# The method controls, in the order every callback that needs a config takes them.
METHOD_KEYS = ("preset", "prune_rate", "lam", "weights", "dp_lambda", "dp_m", "n_bands", "bound1", "bound2",
               "alpha1", "alpha2", "alpha3", "alpha_per_model", "pcb_ratio", "seed")
DEFAULTS = dict(preset="dppa", prune_rate=0.8, lam=1.0, weights="", dp_lambda=0.08, dp_m=5.0, n_bands=2,
                bound1=0.5, bound2=0.75, alpha1=1.8, alpha2=1.0, alpha3=1.0, alpha_per_model="",
                pcb_ratio=0.1, seed=0)
HEATMAP_METRICS = {"mean |δ|": "mean_abs", "outlier %": "outlier_pct", "DP density": "dp_density"}
SAVE_DOWNLOAD_LIMIT = int(float(os.environ.get("DPPA_UI_MAX_DOWNLOAD_BYTES", 200e6)))
# The app scores the first N test items per domain: enough to rank merges, quick on 2 CPU cores
# (the CLI's `score` runs the whole split).
SCORE_PER_DOMAIN = int(os.environ.get("DPPA_UI_SCORE_PER_DOMAIN", "50"))
MAX_UPLOAD_ITEMS = int(os.environ.get("DPPA_UI_MAX_UPLOAD_ITEMS", "2000"))
DEMO_SUITE = "demo suite"
UPLOAD_SUITE = "uploaded JSONL"

# Scores of unchanging models (demo refs) are shared by every session: same weights, same items.
_SHARED_SCORES: dict[tuple, dict] = {}
_SHARED_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------- the session

class AppState:
    """What one browser session owns. gr.State(AppState()) gives each session its own copy (via
    __deepcopy__), created when the session first uses it. Not a callable default: gradio runs a
    callable on page load in its own event, which can race the app's load event and replace a
    freshly loaded workspace."""

    def __init__(self):
        self.ws = None                               # dppa_ui.session.Workspace once models are loaded
        self.tmp: Path | None = None                 # this session's temp dir (exports, uploads)
        self.cancel = threading.Event()
        self.runs: list[dict] = []                   # the leaderboard: one dict per merge
        self.scores: dict[tuple, dict] = {}          # (model ref | ("merged", run), suite key) -> scores
        self.saved: Path | None = None               # the last saved model folder
        self.added: list[str] = []                   # refs added through the path/hub box

    def __deepcopy__(self, memo):
        return AppState()

    def __repr__(self):
        return f"AppState(loaded={self.ws is not None}, runs={len(self.runs)})"

    def tempdir(self) -> Path:
        if self.tmp is None or not self.tmp.is_dir():
            self.tmp = Path(tempfile.mkdtemp(prefix="dppa-ui-session-"))
        return self.tmp

    def close(self) -> None:
        """Session ended: drop the models and remove every file this session wrote."""
        self.cancel.set()
        if self.ws is not None:
            self.ws.close()          # its temp dir (saved models) and model references
        self.ws = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def new_state() -> AppState:
    """gr.State's factory: one AppState per browser (or API client) session."""
    return AppState()


def close_state(state: AppState | None) -> None:
    """gr.State delete_callback (tab closed / expired)."""
    if isinstance(state, AppState):
        state.close()


def _session():
    from .. import session   # imported lazily: the app must start (and say why) even if it is broken
    return session


# ----------------------------------------------------------------------------------- messages

class UserError(ValueError):
    """Bad input the user can fix: shown as a message, never as a traceback."""


_USER_ERRORS = (UserError, ConfigError, ValueError, FileNotFoundError, KeyError, InterruptedError, MemoryError)


def ok(msg: str) -> str:
    return f"✓ {msg}"


def warn(msg: str) -> str:
    """Show `msg` as a toast and return it as the section's status line."""
    gr.Warning(msg, duration=8)
    return f"⚠ {msg}"


def _message(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.strip("'\"") if isinstance(e, KeyError) else text


def _keep(n: int) -> list:
    return [gr.update() for _ in range(n)]


# ----------------------------------------------------------------------------------- models

def demo_choices() -> tuple[list[str], str | None, list[str], str]:
    """(all demo refs, default base, default fine-tunes, note). The note is non-empty when the
    demo family is missing, so the app can still start and say how to get it."""
    refs, missing = [], []
    for name in zoo.demo_names():
        try:
            zoo.demo_path(name)
            refs.append(f"demo:{name}")
        except ValueError:
            missing.append(name)
    if not refs:
        return [], None, [], (f"The demo model family is not built ({zoo.ZOO_DIR} is missing). Run "
                              f"`python -m dppa_ui zoo build`, or add a model folder under the model roots below.")
    base = "demo:base" if "demo:base" in refs else refs[0]
    fts = [f"demo:{d}" for d in zoo.domain_names() if f"demo:{d}" in refs]
    note = f"Demo models missing: {', '.join(missing)}." if missing else ""
    return refs, base, fts, note


def roots_note() -> str:
    try:
        roots = _session().MODEL_ROOTS
    except Exception as e:   # noqa: BLE001 - the app shows why instead of failing to start
        return f"(model roots unavailable: {e})"
    return "Local folders must be under: " + ", ".join(f"`{r}`" for r in roots)


def resolve_user_ref(text: str) -> str:
    """Validate what the user typed in the path/hub box and return the ref to use.

    Local paths must lie under the model roots (a hosted app never reads the rest of the disk);
    hub ids must be reachable (not offline) and under the size cap. session.resolve_ref does both."""
    text = (text or "").strip()
    if not text:
        raise UserError("type a local model folder (under the model roots) or a hub id like org/name")
    path = _session().resolve_ref(text)
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a model folder: it has no config.json (the folder with config.json and "
                        f"the *.safetensors weights is needed)")
    if text.startswith("demo:"):
        return text
    try:
        return str(_session().check_path_allowed(path))
    except ValueError:
        return text      # a hub id stays an id (its files live in the hub cache, outside the roots)


def add_model(state: AppState, text: str, base_choices_value: str | None, fts_value: list[str] | None):
    """The 'add' box: validate a path or hub id and add it to both model pickers (as a fine-tune)."""
    try:
        ref = resolve_user_ref(text)
    except _USER_ERRORS as e:
        return gr.update(), gr.update(), warn(_message(e))
    if ref not in state.added:
        state.added.append(ref)
    choices = all_choices(state)
    fts = list(fts_value or [])
    if ref not in fts and ref != base_choices_value:
        fts.append(ref)
    return (gr.update(choices=choices), gr.update(choices=choices, value=fts),
            ok(f"added {ref}: it is selected as a fine-tune (pick it as the base instead if it is one)"))


def all_choices(state: AppState | None) -> list[str]:
    refs = demo_choices()[0]
    return refs + [r for r in (state.added if state else []) if r not in refs]


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def summary_markdown(summary: dict) -> str:
    """The loaded models in a few lines (from Workspace.summary())."""
    lines = [f"**{_fmt_int(summary.get('parameters', 0))} parameters** in {summary.get('tensors', '?')} tensors "
             f"({summary.get('blocks', '?')} blocks), dtype **{summary.get('dtype', '?')}**; base "
             f"`{summary.get('base', '?')}`."]
    rows = summary.get("fine_tunes") or []
    if rows:
        lines += ["", "| fine-tune | ‖δ‖ / ‖base‖ |", "|---|---|"]
        for r in rows:
            rel = r.get("delta_norm")
            lines.append(f"| `{r.get('model', '?')}` | {rel:.4f} |" if isinstance(rel, (int, float))
                         else f"| `{r.get('model', '?')}` | {rel} |")
    return "\n".join(lines)


def load_models(state: AppState, base: str | None, fts: list[str] | None):
    """Load base + fine-tunes into the session's workspace; returns the summary and the inspect
    pickers' new choices. Outputs: summary, block slider, module dd, matrix dd, heatmap model dd,
    compare dd, status."""
    n = 6
    fts = [f for f in (fts or []) if f]
    if not base:
        return (*_keep(n), warn("pick a base model first"))
    if not fts:
        return (*_keep(n), warn("pick at least one fine-tune to merge into the base"))
    if base in fts:
        return (*_keep(n), warn(f"{base} is both the base and a fine-tune; its delta would be zero — "
                                f"remove it from the fine-tunes"))
    try:
        s = _session()
        ws = state.ws if state.ws is not None else s.Workspace(roots=s.MODEL_ROOTS, cache=s.GLOBAL_CACHE)
        ws.load(base, fts)
    except (*_USER_ERRORS, OSError) as e:   # io.IncompatibleModels and io.ModelRefError are ValueErrors
        return (*_keep(n), warn(_message(e)))
    state.ws = ws
    blocks, modules, matrices = ws.blocks(), ws.module_types(), ws.matrix_names()
    block_max = max(blocks) if blocks else 0
    module = "mlp.down_proj" if "mlp.down_proj" in modules else (modules[0] if modules else None)
    return (summary_markdown(ws.summary()),
            gr.update(minimum=min(blocks) if blocks else 0, maximum=max(block_max, 1), value=min(blocks) if blocks else 0,
                      step=1, interactive=len(blocks) > 1),
            gr.update(choices=modules, value=module),
            gr.update(choices=matrices, value=ws.tensor_name(blocks[0], module) if blocks and module else
                      (matrices[0] if matrices else None)),
            gr.update(choices=[(r, i) for i, r in enumerate(fts)], value=0),
            gr.update(choices=["none", "base", *fts], value="base"),
            ok(f"loaded {base} and {len(fts)} fine-tune(s)"))


def _ws(state: AppState):
    if state is None or state.ws is None:
        raise UserError("load the models first (section 1, 'Load models')")
    return state.ws


# ----------------------------------------------------------------------------------- method

def parse_weights(text: str, n: int) -> list[float]:
    """'' -> [1]*n; '0.5' -> [0.5]*n; '1, 0.5, ...' -> one per fine-tune."""
    text = (text or "").strip()
    if not text:
        return [1.0] * n
    try:
        vals = [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise UserError(f"weights {text!r}: give numbers separated by commas, one per fine-tune") from None
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise UserError(f"{len(vals)} weights for {n} fine-tunes: give one per fine-tune, or a single number for all")
    return vals


def parse_alpha_per_model(text: str) -> dict[str, list[float]]:
    """'demo:reverse=1.9,1.0; demo:sort=2.1,1.0' -> {ref: [alpha, ...]} (the auto-α result)."""
    out = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        ref, eq, vals = part.partition("=")
        try:
            out[ref.strip()] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise UserError(f"per-model α {part.strip()!r}: write MODEL=α1,α2 separated by ';'") from None
        if not eq:
            raise UserError(f"per-model α {part.strip()!r}: write MODEL=α1,α2 separated by ';'")
    return out


def build_config(base: str | None, fts: list[str] | None, preset: str, prune_rate: float, lam: float,
                 weights: str, dp_lambda: float, dp_m: float, n_bands: int, bound1: float, bound2: float,
                 alpha1: float, alpha2: float, alpha3: float, alpha_per_model: str, pcb_ratio: float,
                 seed: float) -> dict:
    """The merge config (a dict `load_config` accepts) that the method controls describe.

    Partition bounds are shares of the kept entries: with density d and 2 bands at bound 0.5,
    partitions = [0.5 d, d] (the top half of the kept entries by |δ|, then the rest)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; pick one of {', '.join(PRESETS)}")
    fts = [f for f in (fts or []) if f]
    if not base or not fts:
        raise UserError("pick a base and at least one fine-tune (section 1)")
    prune, amplify, combine = PRESETS[preset]
    density = round(1.0 - float(prune_rate), 6)
    if prune != "none" and not 0 < density <= 1:
        raise UserError(f"prune rate {prune_rate} leaves nothing: keep it below 1")
    w = parse_weights(weights, len(fts))
    per_model = parse_alpha_per_model(alpha_per_model)
    n_bands = int(n_bands or 1)
    bounds = {1: [], 2: [bound1], 3: [bound1, bound2]}[n_bands]
    if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])) or any(not 0 < b < 1 for b in bounds):
        raise UserError(f"band bounds {bounds} must be ascending and strictly between 0 and 1")
    alphas = [float(alpha1), float(alpha2), float(alpha3)][:n_bands]
    models = []
    for ref, wt in zip(fts, w):
        p: dict[str, Any] = {"weight": wt}
        if prune != "none":
            p["density"] = density
        if amplify == "dpa":
            p["partitions"] = [round(b * density, 6) for b in bounds] + [density]
            a = per_model.get(ref, alphas)
            if len(a) != n_bands:
                raise UserError(f"per-model α for {ref} has {len(a)} values for {n_bands} bands: "
                                f"clear the per-model α box or run auto α again")
            p["amplification"] = a
        models.append({"model": ref, "parameters": p})
    params: dict[str, Any] = {"lambda": float(lam)}
    if prune == "dp":
        params.update(dp_lambda=float(dp_lambda), dp_outlier_m=float(dp_m))
    if combine == "pcb":
        params["pcb_ratio"] = float(pcb_ratio)
    return {"merge_method": preset, "base_model": base, "models": models, "parameters": params,
            "seed": int(seed or 0)}


def config_from_controls(base, fts, *method_values) -> MergeConfig:
    """build_config + validation: a MergeConfig, or a UserError/ConfigError naming the problem."""
    return load_config(build_config(base, fts, *method_values))


def controls_from_config(cfg) -> dict:
    """The inverse of build_config: control values (by METHOD_KEYS, plus base and fts) from a config
    (dict, YAML text or MergeConfig). Values the controls cannot express fall back to defaults."""
    cfg = cfg if isinstance(cfg, MergeConfig) else load_config(cfg)
    preset = cfg.merge_method if cfg.merge_method in PRESETS else next(
        (p for p, st in PRESETS.items() if st == cfg.stages), DEFAULTS["preset"])
    m0 = cfg.models[0]
    v = dict(DEFAULTS)
    v.update(preset=preset, lam=cfg.lambda_, dp_lambda=cfg.dp_lambda, dp_m=cfg.dp_outlier_m,
             pcb_ratio=cfg.pcb_ratio, seed=cfg.seed, base=cfg.base_model, fts=[m.model for m in cfg.models])
    if cfg.prune != "none":
        v["prune_rate"] = round(1.0 - m0.density, 6)
    ws = [m.weight for m in cfg.models]
    v["weights"] = "" if all(x == 1.0 for x in ws) else ", ".join(f"{x:g}" for x in ws)
    if cfg.amplify == "dpa" and m0.partitions:
        d = m0.density
        v["n_bands"] = len(m0.partitions)
        b = [p / d for p in m0.partitions[:-1]]
        if b:
            v["bound1"] = round(b[0], 6)
        if len(b) > 1:
            v["bound2"] = round(b[1], 6)
        amps = [m.amplification for m in cfg.models]
        if all(a == amps[0] for a in amps) and not isinstance(amps[0], str):
            for i, a in enumerate(amps[0]):
                v[f"alpha{i + 1}"] = a
        else:
            v["alpha_per_model"] = "; ".join(f"{m.model}=" + ",".join(f"{x:g}" for x in m.amplification)
                                             for m in cfg.models if not isinstance(m.amplification, str))
    return v


def control_values(v: dict) -> list:
    """Values for [base, fts, *METHOD_KEYS] components, in that order."""
    return [v["base"], v["fts"], *[v[k] for k in METHOD_KEYS]]


def preset_view(preset: str):
    """Show only the controls a preset uses, and two lines on what it does with its paper.
    Outputs: info md, prune-rate slider, dp group, dpa group, pcb group, seed."""
    prune, amplify, combine = PRESETS.get(preset, PRESETS[DEFAULTS["preset"]])
    text, url = PRESET_INFO.get(preset, ("", ""))
    stages = f"prune **{prune}** → amplify **{amplify}** → combine **{combine}**"
    info = f"{text}  \n{stages} · [paper]({url})"
    return (info, gr.update(visible=prune != "none"), gr.update(visible=prune == "dp"),
            gr.update(visible=amplify == "dpa"), gr.update(visible=combine == "pcb"),
            gr.update(visible=prune == "random"))


def bands_view(n_bands: int):
    """Bound and α sliders for the chosen number of DPA bands. Outputs: bound1, bound2, a1, a2, a3."""
    n = int(n_bands or 1)
    return (gr.update(visible=n >= 2), gr.update(visible=n >= 3), gr.update(visible=True),
            gr.update(visible=n >= 2), gr.update(visible=n >= 3))


def example_files() -> dict[str, Path]:
    root = Path(__file__).resolve().parents[2] / "assets" / "examples"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def load_yaml_into_controls(state: AppState, yaml_text: str):
    """Set every control from a YAML config. Outputs: base, fts, *METHOD_KEYS, status."""
    n = 2 + len(METHOD_KEYS)
    try:
        v = controls_from_config(yaml_text)
    except _USER_ERRORS as e:
        return (*_keep(n), warn(f"this config cannot be loaded: {_message(e)}"))
    choices = all_choices(state)
    for ref in [v["base"], *v["fts"]]:
        if ref not in choices:
            try:
                ref = resolve_user_ref(ref)
            except _USER_ERRORS as e:
                return (*_keep(n), warn(_message(e)))
            state.added.append(ref)
    choices = all_choices(state)
    vals = control_values(v)
    return (gr.update(choices=choices, value=vals[0]), gr.update(choices=choices, value=vals[1]), *vals[2:],
            ok("config loaded into the controls; press 'Load models' if the models changed"))


def load_example(state: AppState, name: str):
    """The example picker: assets/examples/NAME.yaml into the controls."""
    files = example_files()
    if name not in files:
        return (*_keep(2 + len(METHOD_KEYS)), warn(f"no example named {name!r}"))
    return load_yaml_into_controls(state, files[name].read_text())


# ----------------------------------------------------------------------------------- inspect

def _cfg_for_ws(state: AppState, method_values) -> MergeConfig:
    """The current config over the models that are loaded (not what the pickers show now)."""
    ws = _ws(state)
    return config_from_controls(ws.base_ref, list(ws.ft_refs), *method_values)


def thresholds_table(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        thr = r.get("threshold")
        edges = r.get("band_edges") or []
        out.append([r["model"], round(float(r["density"]), 4),
                    None if thr is None else float(f"{thr:.4g}"),
                    ", ".join("empty" if e is None else f"{e:.3g}" for e in edges),   # None: no entry in band
                    round(100.0 * r["kept"] / max(r["numel"], 1), 2), f"{int(r['kept']):,} / {int(r['numel']):,}"])
    return out


THRESHOLD_HEADERS = ["fine-tune", "density", "keep |δ| ≥", "DPA band edges", "kept %", "kept"]


def inspect(state: AppState, block: float, module: str, *method_values):
    """Histogram of |δ| for (block, module) with each fine-tune's keep threshold, and the numbers.
    Outputs: histogram, thresholds table, tensor name md, status."""
    try:
        ws = _ws(state)
        cfg = _cfg_for_ws(state, method_values)
        if not module:
            raise UserError("pick a module type")
        name = ws.tensor_name(int(block), module)
        from .. import analysis
        rows = analysis.thresholds(ws, cfg, name)
        fig = analysis.histogram_figure(ws, cfg, name, rows)
    except _USER_ERRORS as e:
        return (*_keep(3), warn(_message(e)))
    return fig, thresholds_table(rows), f"`{name}`", ""


def matrix_for(state: AppState, block: float, module: str):
    """Keep the mask viewer on the block/module the histogram shows (when it is a matrix)."""
    try:
        ws = _ws(state)
        name = ws.tensor_name(int(block), module)
    except _USER_ERRORS:
        return gr.update()
    return gr.update(value=name) if name in ws.matrix_names() else gr.update()


def heatmap(state: AppState, metric: str, model_index: int | None, *method_values):
    """Blocks × module types heatmap of one fine-tune. Outputs: plot, status."""
    try:
        ws = _ws(state)
        cfg = _cfg_for_ws(state, method_values)
        from .. import analysis
        fig = analysis.heatmap_figure(ws, cfg, HEATMAP_METRICS.get(metric, metric), model_index=int(model_index or 0))
    except _USER_ERRORS as e:
        return gr.update(), warn(_message(e))
    return fig, ""


def masks(state: AppState, matrix: str, *method_values):
    """Mask viewer for one weight matrix. Outputs: plot, kept-% markdown, status."""
    try:
        ws = _ws(state)
        cfg = _cfg_for_ws(state, method_values)
        if not matrix:
            raise UserError("pick a weight matrix")
        from .. import analysis
        fig, numbers = analysis.mask_figure(ws, cfg, matrix)
    except _USER_ERRORS as e:
        return gr.update(), gr.update(), warn(_message(e))
    return fig, numbers_markdown(numbers), ""


def numbers_markdown(info: dict) -> str:
    """The mask viewer's numbers (from analysis.mask_figure) as a short list."""
    short = lambda r: r.removeprefix("demo:")  # noqa: E731
    lines = [f"`{info.get('name', '')}` {info.get('shape', '')}, each cell {'×'.join(map(str, info.get('cell', [])))} entries"]
    if info.get("kept_pct"):
        lines.append("- **kept**: " + ", ".join(f"{short(k)} {v:.1f}%" for k, v in info["kept_pct"].items()))
    if info.get("winner_pct"):
        lines.append("- **wins the entry**: " + ", ".join(f"{short(k)} {v:.1f}%" for k, v in info["winner_pct"].items())
                     + f", none {info.get('no_winner_pct', 0):.1f}%")
    if info.get("conflict_pct") is not None:
        lines.append(f"- **sign conflicts**: {info['conflict_pct']:.2f}% of entries")
    if info.get("pcb_mean_weight"):
        lines.append("- **mean PCB weight**: " + ", ".join(f"{short(k)} {v:.2f}" for k, v in info["pcb_mean_weight"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- auto alpha

def auto_alpha(state: AppState, *method_values) -> Iterator[tuple]:
    """DPPA's greedy α search per fine-tune on its domain's dev split, with the log streamed.
    Outputs (yielded): log text, alpha1, alpha2, alpha3, per-model α box, status."""
    try:
        ws = _ws(state)
        cfg = _cfg_for_ws(state, method_values)
        if cfg.amplify != "dpa":
            raise UserError("auto α tunes the DPA amplification: pick the dppa preset first")
    except _USER_ERRORS as e:
        yield (*_keep(5), warn(_message(e)))
        return
    lines: "queue.Queue[str | None]" = queue.Queue()
    result: dict = {}

    def run():
        try:
            result["cfg"], result["report"] = ws.search_amplification(cfg, log=lines.put)
        except Exception as e:   # noqa: BLE001 - shown to the user below
            result["error"] = e
        finally:
            lines.put(None)

    threading.Thread(target=run, daemon=True).start()
    log: list[str] = []
    while True:
        line = lines.get()
        if line is None:
            break
        log.append(line)
        yield ("\n".join(log[-200:]), *_keep(4), f"searching α … ({len(log)} steps)")
    if "error" in result:
        yield ("\n".join(log), *_keep(4), warn(f"auto α failed: {_message(result['error'])}"))
        return
    models = result["cfg"].models
    per_model = "; ".join(f"{m.model}=" + ",".join(f"{a:.3g}" for a in m.amplification) for m in models)
    first = list(models[0].amplification) + [1.0] * 3
    yield ("\n".join(log), *first[:3], per_model,
           ok("α found per fine-tune: it is in the per-model α box and used by the next merge"))


# ----------------------------------------------------------------------------------- merge

def _gpu(fn):
    """ZeroGPU: run `fn` on a lent GPU when the `spaces` package is there (on a Space)."""
    try:
        import spaces  # type: ignore
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


@_gpu
def _run_merge(ws, config: dict, progress, cancel):
    return ws.merge(config, progress=progress, cancel=cancel)


def _params_text(cfg: MergeConfig) -> str:
    m = cfg.models[0]
    parts = []
    if cfg.prune != "none":
        parts.append(f"density {m.density:g}")
    if cfg.lambda_ != 1.0:
        parts.append(f"λ {cfg.lambda_:g}")
    if any(x.weight != 1.0 for x in cfg.models):
        parts.append("w " + ",".join(f"{x.weight:g}" for x in cfg.models))
    if cfg.prune == "dp":
        parts.append(f"DP λ {cfg.dp_lambda:g}, M {cfg.dp_outlier_m:g}")
    if cfg.amplify == "dpa":
        parts.append(f"bands {[round(p, 4) for p in m.partitions]} α {m.amplification}")
    if cfg.combine == "pcb":
        parts.append(f"ratio {cfg.pcb_ratio:g}")
    if cfg.prune == "random":
        parts.append(f"seed {cfg.seed}")
    return "; ".join(parts)


def merge(state: AppState, *method_values, progress=gr.Progress()):
    """Merge in memory (kept for chat and score). Outputs: summary md, leaderboard, status."""
    try:
        ws = _ws(state)
        cfg = _cfg_for_ws(state, method_values)
        if any(isinstance(m.amplification, str) for m in cfg.models):
            raise UserError("α is 'auto': run 'auto α' first")
    except _USER_ERRORS as e:
        return gr.update(), gr.update(), warn(_message(e))
    state.cancel.clear()
    t0 = time.perf_counter()

    def tick(done: int, total: int):
        el = time.perf_counter() - t0
        left = el / max(done, 1) * (total - done)
        progress((done, total), desc=f"merging: {done}/{total} tensors, ~{left:.1f} s left", unit="tensors")

    try:
        res = _run_merge(ws, cfg.to_dict(), tick, state.cancel.is_set)
        if ws.merged is not res:   # under ZeroGPU the merge ran in a forked worker: adopt its result
            ws.adopt(res)
    except InterruptedError:
        return gr.update(), gr.update(), warn("merge cancelled; the previous merge (if any) is still loaded")
    except (*_USER_ERRORS, RuntimeError) as e:    # session.MergeRefused (memory, busy) is a RuntimeError
        return gr.update(), gr.update(), warn(f"merge refused: {_message(e)}")
    state.saved = None
    run = {"run": len(state.runs) + 1, "method": cfg.method_name, "params": _params_text(cfg),
           "config": cfg.to_dict(), "scores": None, "objective": None,
           "models": [m.model for m in cfg.models]}
    state.runs.append(run)
    kept_s = ", ".join(f"`{m.model}` {k:.1%}" for m, k in zip(cfg.models, res.kept_fraction))
    summary = (f"**Run {run['run']}: {cfg.method_name}** merged in **{res.seconds:.2f} s** on **{res.device}**.  \n"
               f"Kept of each delta: {kept_s}.  \nThe merged model is loaded: chat with it (5) or score it (6).")
    return summary, leaderboard(state), ok(f"merged in {res.seconds:.2f} s")


def cancel_merge(state: AppState):
    """The cancel button: the merge stops at the next tensor (and the event is cancelled)."""
    if state is not None:
        state.cancel.set()
    return "⏹ cancel requested: the merge stops at the next tensor"


def save_model(state: AppState):
    """Write the merged model folder (weights, config, tokenizer, card, YAML) in the session's temp
    dir and offer it as a zip for small models. Outputs: file, status."""
    try:
        ws = _ws(state)
        if ws.merged is None:
            raise UserError("nothing to save yet: merge first (section 4)")
        out, zpath = ws.save_archive(max_bytes=SAVE_DOWNLOAD_LIMIT)
    except (*_USER_ERRORS, OSError) as e:
        return gr.update(), warn(f"save failed: {_message(e)}")
    state.saved = out
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if zpath is None:
        return gr.update(value=None, visible=False), ok(f"saved ({size / 1e6:.0f} MB): too large to download here; push it to the hub instead")
    return gr.update(value=str(zpath), visible=True), ok(f"saved {out.name} ({size / 1e6:.1f} MB): download the zip below")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def push_to_hub(state: AppState, repo_id: str, token_text: str, private: bool,
                oauth_token: gr.OAuthToken | None = None):
    """Upload the saved (or a freshly saved) merged model to the user's hub repo. The token is
    the Space login's or the one typed here; it is used for this call only, never stored."""
    if hub_offline():
        return warn("pushing is off: this app runs offline (HF_HUB_OFFLINE=1)")
    token = (oauth_token.token if oauth_token is not None else None) or (token_text or "").strip() or None
    if not token:
        return warn("sign in with Hugging Face (on a Space) or paste a write token first")
    if not repo_id or "/" not in repo_id:
        return warn("give the target repo as user/name")
    try:
        if state.saved is None or not state.saved.is_dir():
            _, msg = save_model(state)
            if state.saved is None:
                return msg
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(state.saved), repo_id=repo_id, repo_type="model")
    except Exception as e:   # noqa: BLE001 - auth, network, permissions: all shown to the user
        return warn(f"push failed: {type(e).__name__}: {e}")
    return ok(f"pushed to https://huggingface.co/{repo_id}")


# ----------------------------------------------------------------------------------- chat

def _plain(history) -> list[dict]:
    """The chatbot's user and assistant turns as {"role", "content": text}."""
    return [m for m in to_messages(history) if m["role"] != "system"]


def chat(state: AppState, message: str, history: list, history_cmp: list, compare: str, system: str,
         temperature: float, top_p: float, max_new_tokens: float):
    """Stream the merged model's reply, then (if asked) the compared model's to the same message.
    Outputs (yielded): merged chat, compared chat, message box, status."""
    message = (message or "").strip()
    hist, hist_c = _plain(history), _plain(history_cmp)
    try:
        ws = _ws(state)
        if not message:
            raise UserError("type a message first")
        if getattr(ws, "merged", None) is None:
            raise UserError("merge first (section 4): the chat talks to the merged model")
        kw = dict(system_prompt=(system or "").strip() or None, temperature=float(temperature),
                  top_p=float(top_p), max_new_tokens=int(max_new_tokens))   # chat_stream caps it
        model, tok = ws.model_for("merged")
        other = ws.model_for(compare) if compare and compare != "none" else None
    except _USER_ERRORS as e:
        yield gr.update(), gr.update(), gr.update(), warn(_message(e))
        return
    out = hist + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    out_c = hist_c + ([{"role": "user", "content": message}, {"role": "assistant", "content": ""}] if other else [])
    yield out, out_c, "", ""
    try:
        for part in chat_stream(model, tok, hist, message, **kw):
            out[-1]["content"] = part
            yield out, out_c, "", ""
        if other is not None:
            for part in chat_stream(other[0], other[1], hist_c, message, **kw):
                out_c[-1]["content"] = part
                yield out, out_c, "", ""
    except (*_USER_ERRORS, RuntimeError) as e:    # chat_stream's "generation failed" is a RuntimeError
        yield out, out_c, "", warn(f"chat failed: {_message(e)}")
        return
    yield out, out_c, "", ""


def clear_chat():
    return [], [], ""


# ----------------------------------------------------------------------------------- score

def _suite(state: AppState, choice: str, upload) -> tuple[list[dict], str, str]:
    """(items, cache key, label) of the chosen suite; an uploaded JSONL is validated line by line."""
    from .. import evaluation
    if choice == UPLOAD_SUITE:
        path = upload if isinstance(upload, str) else getattr(upload, "name", None) or (
            upload.get("path") if isinstance(upload, dict) else None)
        if not path:
            raise UserError("upload a .jsonl file of {\"prompt\", \"answer\", \"domain\"} lines, or pick the demo suite")
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        local = state.tempdir() / f"suite-{digest}.jsonl"   # a private copy under the session's dir
        local.write_bytes(data)
        try:
            items = evaluation.load_suite(local)
        except UnicodeDecodeError:
            raise UserError("the uploaded file is not UTF-8 text: upload a .jsonl file") from None
        if len(items) > MAX_UPLOAD_ITEMS:
            raise UserError(f"the uploaded suite has {len(items)} items; this app scores at most {MAX_UPLOAD_ITEMS} "
                            f"(use `python -m dppa_ui score` for bigger suites)")
        return items, f"upload:{digest}", Path(path).name
    return demo_items(), f"zoo:test:{SCORE_PER_DOMAIN}", f"demo suite (first {SCORE_PER_DOMAIN} test items per domain)"


@functools.lru_cache(maxsize=2)
def _zoo_test_items(zoo_dir: Path) -> tuple[dict, ...]:
    """The demo family's test split, read once per zoo folder (the items are never modified)."""
    from .. import evaluation
    return tuple(evaluation.load_suite(zoo_dir, "test"))


def demo_items(per_domain: int | None = None) -> list[dict]:
    """The first `per_domain` test items of each demo domain (all when None or <= 0)."""
    from .. import evaluation
    n = SCORE_PER_DOMAIN if per_domain is None else per_domain
    items = _zoo_test_items(zoo.ZOO_DIR)
    if n <= 0:
        return list(items)
    return [it for its in evaluation.by_domain(items).values() for it in its[:n]]


def _score_one(state: AppState, which: str, items, key: str) -> dict:
    """Scores of one model (merged / base / a fine-tune ref), cached per session; demo models'
    scores are shared by all sessions (the same weights give the same numbers)."""
    ref = state.ws.base_ref if which == "base" else which
    # Keyed by what was scored: the model's ref, or the merge's run number, so a newly loaded base or
    # a new merge is never answered from an older one's entry.
    ck = (("merged", state.ws.merged.run) if which == "merged" else ref, key)
    if ck in state.scores:
        return state.scores[ck]
    shared = (ref, key) if which != "merged" and str(ref).startswith("demo:") else None
    if shared is not None:
        with _SHARED_LOCK:
            hit = _SHARED_SCORES.get(shared)
        if hit is not None:
            state.scores[ck] = hit
            return hit
    from .. import evaluation
    model, tok = state.ws.model_for(which)
    scores = evaluation.score_model(model, tok, items)
    state.scores[ck] = scores
    if shared is not None:
        with _SHARED_LOCK:
            _SHARED_SCORES[shared] = scores
    return scores


def objective_of(merged: dict, per_ft: dict[str, dict]) -> float | None:
    """Geometric mean over domains of merged / best fine-tune on that domain (smooth score)."""
    from .. import evaluation
    ref = {}
    for d in merged:
        vals = [s[d] for s in per_ft.values() if d in s and s[d].get("smooth") is not None]
        if vals:
            ref[d] = max(vals, key=lambda x: x["smooth"])
    if not ref:
        return None
    try:
        return evaluation.geometric_objective(merged, ref, "smooth", list(ref))
    except ValueError:
        return None


def score(state: AppState, suite_choice: str, upload, progress=gr.Progress()):
    """Score merged, base and fine-tunes on the suite. Outputs: plot, objective md, leaderboard,
    scores table (json), status."""
    try:
        ws = _ws(state)
        if getattr(ws, "merged", None) is None:
            raise UserError("merge first (section 4): scoring compares the merged model with base and fine-tunes")
        items, key, label = _suite(state, suite_choice, upload)
        whos = ["merged", "base", *ws.ft_refs]
        results = {}
        for i, who in enumerate(whos):
            progress((i, len(whos)), desc=f"scoring {who}")
            results[who] = _score_one(state, who, items, key)
    except _USER_ERRORS as e:
        return gr.update(), gr.update(), gr.update(), gr.update(), warn(_message(e))
    obj = objective_of(results["merged"], {r: results[r] for r in ws.ft_refs})
    if state.runs:
        run = state.runs[-1]
        run["scores"] = {d: s for d, s in results["merged"].items()}
        run["objective"] = obj
        run["suite"] = label
    from .. import analysis
    fig = analysis.scores_figure(score_rows(results, obj))
    obj_md = (f"**Objective** (geometric mean over domains of merged ÷ best fine-tune, smooth score): "
              f"**{obj:.3f}**" if obj is not None else "**Objective**: n/a (no fine-tune scored on these domains)")
    return fig, obj_md, leaderboard(state), results, ok(f"scored {len(whos)} models on {label} ({len(items)} items)")


def score_rows(results: dict[str, dict], objective: float | None) -> list[dict]:
    """Rows for analysis.scores_figure: merged (with the objective), base, then the fine-tunes."""
    return [{"model": who if who in ("merged", "base") else who.removeprefix("demo:"), "scores": per,
             "objective": objective if who == "merged" else None} for who, per in results.items()]


LEADERBOARD_HEADERS = ["run", "method", "parameters", "objective", "EM per domain"]


def leaderboard(state: AppState):
    rows = []
    for r in state.runs:
        sc = r.get("scores")
        em = " · ".join(f"{d} {s['em']:.2f}" for d, s in sc.items() if s.get("em") is not None) if sc else "not scored"
        rows.append([r["run"], r["method"], r["params"],
                     None if r.get("objective") is None else round(r["objective"], 4), em])
    return rows


def reload_run(state: AppState, run_number: float):
    """Put a leaderboard row's config back into the controls. Outputs: base, fts, *METHOD_KEYS, status."""
    n = 2 + len(METHOD_KEYS)
    try:
        k = int(run_number or 0)
        run = next((r for r in state.runs if r["run"] == k), None)
        if run is None:
            raise UserError(f"there is no run {k} in this session's leaderboard")
        v = controls_from_config(run["config"])
    except _USER_ERRORS as e:
        return (*_keep(n), warn(_message(e)))
    vals = control_values(v)
    choices = all_choices(state)
    return (gr.update(choices=choices, value=vals[0]), gr.update(choices=choices, value=vals[1]), *vals[2:],
            ok(f"run {k}'s config is back in the controls"))


def export_yaml(state: AppState, base, fts, *method_values):
    """The current controls as YAML the CLI runs (`python -m dppa_ui merge FILE --out DIR`).
    Outputs: code, file, status."""
    try:
        cfg = config_from_controls(base, fts, *method_values)
    except _USER_ERRORS as e:
        return gr.update(), gr.update(), warn(_message(e))
    text = cfg.to_yaml()
    path = state.tempdir() / "dppa_merge.yaml"
    path.write_text(text)
    return text, gr.update(value=str(path), visible=True), ok("YAML ready: run it with `python -m dppa_ui merge dppa_merge.yaml --out merged/`")

