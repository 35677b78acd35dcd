"""What every section shares: the per-session state, the page's component registry, user-facing
messages, the app's temp folder (removed at shutdown, swept at the next start when the process was
killed), and the control <-> MethodControls mapping.
"""
from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from .. import params as P
from .. import lifecycle
from ..controls import MethodControls, extra_params, picker_methods
from ..figures import fmt  # noqa: F401  (the one way numbers are written for people, figures and text alike)
from ..refs import RefPolicy
from ..workspace import MergeRefused
from ..zoo import ZOO_DIR

# ----------------------------------------------------------------------------------- settings

def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


MAX_MERGES = max(1, int(_env_float("DPPA_UI_MAX_MERGES", 1)))
CONCURRENCY = max(1, int(_env_float("DPPA_UI_CONCURRENCY", 2)))
SESSION_TTL = _env_float("DPPA_UI_SESSION_TTL", 4 * 3600)      # seconds since the session's last event
# Set once any session's first histogram is drawn: the chat warm-up waits for it (up to a while), so
# the first view after a start does not share the CPU with transformers' imports.
FIRST_VIEW = threading.Event()
SCORE_PER_DOMAIN = int(_env_float("DPPA_UI_SCORE_PER_DOMAIN", 50))
MAX_UPLOAD_ITEMS = int(_env_float("DPPA_UI_MAX_UPLOAD_ITEMS", 2000))
DOWNLOAD_LIMIT = int(_env_float("DPPA_UI_MAX_DOWNLOAD_BYTES", 200e6))


def model_roots() -> tuple[Path, ...]:
    """Folders the model box may reach: DPPA_UI_MODEL_ROOTS (os.pathsep-separated), else the demo
    family and ./models."""
    env = os.environ.get("DPPA_UI_MODEL_ROOTS")
    if env:
        return tuple(Path(p).expanduser().resolve() for p in env.split(os.pathsep) if p.strip())
    return (Path(ZOO_DIR).resolve(), Path("models").resolve())


def policy() -> RefPolicy:
    """What the app lets a ref reach: the model roots, hub downloads unless DPPA_UI_ALLOW_DOWNLOADS
    is off, at most DPPA_UI_MAX_DOWNLOAD_GB (default 4) per model."""
    allow = os.environ.get("DPPA_UI_ALLOW_DOWNLOADS", "1").strip().lower() not in ("0", "false", "no", "off")
    return RefPolicy(roots=model_roots(), allow_downloads=allow,
                     max_download_bytes=int(_env_float("DPPA_UI_MAX_DOWNLOAD_GB", 4.0) * (1 << 30)))


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------------- temp files

TEMP_PREFIX = "dppa-ui-"


class _TempRoot:
    """One private folder for every session's files, made on first use in the system temp dir and
    owned by this process (lifecycle.make_dir). It is removed when the server ends (normal exit,
    Ctrl-C, SIGTERM: see `stop_on_signals`), running merges first stopped at their next tensor;
    when the process is killed outright, the next start's `sweep_temp` removes it."""

    def __init__(self):
        self.path: Path | None = None
        self._lock = threading.Lock()

    def get(self) -> Path:
        with self._lock:
            if self.path is None or not self.path.is_dir():
                self.path = lifecycle.make_dir(tempfile.gettempdir(), TEMP_PREFIX, private=True)
                atexit.register(self.remove)
            return self.path

    def remove(self) -> int:
        """Stop the running merges (each removes its own temp folder), then remove the folder.
        Returns the bytes freed."""
        lifecycle.STOP.set()
        lifecycle.wait_idle(timeout=30)
        if self.path is None or not self.path.is_dir():
            return 0
        size = lifecycle.disk_bytes(self.path)
        for _ in range(3):         # a thread still writing (chat offload, a zip) may add a file meanwhile
            shutil.rmtree(self.path, ignore_errors=True)
            if not self.path.exists():
                break
            time.sleep(0.2)
        return size


TEMP = _TempRoot()


def _log(line: str) -> None:
    print(f"dppa-ui: {line}", file=sys.stderr, flush=True)


def sweep_temp() -> list:
    """Remove the temp folders of app processes that were killed outright (no live owner: see
    lifecycle.sweep), logging what and how much; every start of the app runs it."""
    return lifecycle.sweep(tempfile.gettempdir(), lambda name: name.startswith(TEMP_PREFIX), _log)


def stop_on_signals(signals=(signal.SIGTERM,)) -> None:
    """In the main thread: end the server on these signals as on Ctrl-C, files included. Running
    merges stop at their next tensor and remove their temp folders, the app's temp folder goes,
    one line in the log says so, and the process exits with 128 + the signal's number. A second
    signal does not cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        previous = signal.getsignal(sig)
        if getattr(previous, "_dppa_ui", False):
            continue

        def handler(signum, frame, previous=previous):
            signal.signal(signum, signal.SIG_IGN)
            merges = lifecycle.running()
            freed = TEMP.remove()
            _log(f"stopped by {signal.Signals(signum).name}: "
                 + (f"{merges} running merge(s) cancelled, " if merges else "")
                 + f"server files removed ({lifecycle.bytes_text(freed)})")
            if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler):
                previous(signum, frame)     # e.g. gradio's: stop its Node server
            # Out at once, the clean-up done: the interpreter's own exit would wait on, or destroy
            # under, threads still inside torch (a view, the chat warm-up), and abort the process.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)

        handler._dppa_ui = True
        signal.signal(sig, handler)


# ----------------------------------------------------------------------------------- messages

class UserError(ValueError):
    """Bad input the user can fix; shown as a message, never as a traceback."""


def expected() -> tuple[type, ...]:
    return (ValueError, KeyError, FileNotFoundError, InterruptedError, MemoryError, TimeoutError, MergeRefused)


def message(e: BaseException) -> str:
    """The text a user sees for an expected error (never a server path or a traceback)."""
    text = str(e).strip() or type(e).__name__
    return without_paths(text.strip("'\"") if isinstance(e, KeyError) else text)


# An absolute path of the server's: a "/" not after a word character, ":" or "/" (so not in a URL,
# nor in "0.5/1"), then at least two path parts.
_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@+~-]+/)+[\w.@+~-]*")


def roots_text() -> str:
    """The model roots as a user may read them: never their absolute paths on this server."""
    if os.environ.get("DPPA_UI_MODEL_ROOTS"):
        return "the folders in DPPA_UI_MODEL_ROOTS"
    return "assets/zoo (the demo family) and models/ (or DPPA_UI_MODEL_ROOTS)"


def without_paths(text: str) -> str:
    """`text` with the server's folders named as a user knows them: the model roots by what
    roots_text says, the app's own files relative to the project, any other absolute path by its
    last part (an uploaded file's name)."""
    roots = [str(r) for r in model_roots()]
    text = text.replace(f": {', '.join(roots)}.", f": {roots_text()}.")      # refs.check_path_allowed's list
    project = str(Path(__file__).resolve().parents[2])

    def short_path(m: re.Match) -> str:
        p = m.group(0)
        if p.startswith(project + "/"):
            return p[len(project) + 1:]
        if any(p == r or p.startswith(r + "/") for r in roots):
            return "(a folder under the model roots)/" + Path(p).name
        return Path(p.rstrip("/")).name or p
    return _PATH.sub(short_path, text)


def sig(x, digits: int = 3):
    """A number for a table cell, rounded to `digits` significant digits (None stays None)."""
    if x is None:
        return None
    v = float(x)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else v


def ok(msg: str) -> str:
    return f"✓ {msg}"


def warn(msg: str) -> str:
    """The text of a problem for the section's status line (one line where it happened; no toast:
    a toast per event repeats the same problem once per view)."""
    return f"⚠ {msg}"


def lenient(component):
    """A slider or number box whose out-of-range values reach the handlers, which name them
    (gradio's own check answers with a bare red "Error" on every output of the event, and the
    slider then shows its clamped value while the views keep the old one). Patched on the
    instance, as suites.upload_only does."""
    component.preprocess = lambda payload: payload
    return component


def keep():
    return gr.update()


# ----------------------------------------------------------------------------------- state

class AppState:
    """What one browser (or API client) session owns: gr.State gives each session its own copy
    (through __deepcopy__). A plain class: gradio would serialise a dataclass's fields."""

    def __init__(self):
        self.ws = None                              # workspace.Workspace once models are loaded
        self.added: list[str] = []                  # refs added through the model box
        self.uploads: set[str] = set()              # suite files this session uploaded
        self.cancel = threading.Event()
        self.expected: tuple[str, str] | None = None    # (prompt, answer) of the clicked chat example
        self.shown_tensor: str | None = None        # the tensor the histogram shows
        self.running: str | None = None             # what a Cancel / Stop would stop ("merge", ...)

    def __deepcopy__(self, memo):
        return AppState()

    def workspace(self):
        if self.ws is None or not self.ws.loaded:
            raise UserError("load the models first (1 · Models, 'Load models')")
        return self.ws

    def close(self) -> None:
        self.cancel.set()
        if self.ws is not None:
            self.ws.close()
        self.ws = None


def close_state(state) -> None:
    """gr.State's delete_callback: the tab closed or the session expired."""
    if isinstance(state, AppState):
        state.close()


# ----------------------------------------------------------------------------------- method controls

# The registry parameters the generic controls show ("x_KEY" components), one per key over every
# method of the picker (the first method's spec sets the component; each method sets its default).
def _extra_specs() -> dict:
    specs = {}
    for name in picker_methods():
        for p in extra_params(name):
            specs.setdefault(p.key, p)
    return specs


EXTRA_SPECS = _extra_specs()
# The method controls in the order every handler that needs a config takes them (the API's order).
CONTROL_KEYS = ("preset", "density", "lambda_", "weights", "dp_lambda", "dp_outlier_m", "n_bands", "band1",
                "band2", "alpha1", "alpha2", "alpha3", "alpha_per_model", "pcb_ratio", "seed",
                *[f"x_{k}" for k in EXTRA_SPECS], "gradients")
GRADIENT_HEADERS = ["parameter", "filter", "values over the layers"]
DEFAULT_CONTROLS = MethodControls()


def parse_numbers(text: str, what: str) -> list[float]:
    """'1, 0.5' -> [1.0, 0.5]; every number finite, else a UserError naming `what`."""
    out = []
    for t in (text or "").replace(";", ",").split(","):
        if not t.strip():
            continue
        try:
            v = float(t)
        except ValueError:
            raise UserError(f"{what} {text!r}: give numbers separated by commas") from None
        if not math.isfinite(v):
            raise UserError(f"{what} {text!r}: {t.strip()} is not a finite number")
        out.append(v)
    return out


def parse_alpha_per_model(text: str) -> dict[str, list[float]]:
    """'demo:reverse=1.9,1.0; demo:sort=2.1,1.0' -> {ref: [α, ...]} (what auto α writes)."""
    out = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        ref, eq, vals = part.partition("=")
        if not eq:
            raise UserError(f"per-model α {part.strip()!r}: write MODEL=α1,α2 separated by ';'")
        out[ref.strip()] = parse_numbers(vals, f"per-model α for {ref.strip()}")
    return out


def finite(v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise UserError(f"{what} must be a finite number, got {v!r}")
    return f


def bounded(v, what: str, lo: float, hi: float, integer: bool = False) -> float | int:
    """A lenient slider's value, checked against the slider's range (a typed value may lie outside
    it): UserError naming the control and the range, never a silent clamp."""
    f = finite(v, what)
    if not lo <= f <= hi:
        raise UserError(f"{what} {fmt(f)} is outside its range {fmt(lo)} to {fmt(hi)}: type a value in it "
                        f"or move the slider")
    if integer and f != round(f):
        raise UserError(f"{what} must be a whole number, got {fmt(f)}")
    return int(round(f)) if integer else f


def _extra_value(p, raw, what: str):
    """One generic control's value, typed and checked as its parameter's kind."""
    if p.kind in ("float", "int", "rank"):
        if p.kind == "rank" and raw == "full":
            return raw
        v = finite(raw, what)
        return int(v) if p.kind in ("int", "rank") else v
    if p.kind == "bool":
        return bool(raw)
    return raw


def gradient_rows(table) -> list[list[str]]:
    """The gradient editor's non-empty rows as [parameter, filter, values] strings."""
    rows = table.get("data", table) if isinstance(table, dict) else (
        table.values.tolist() if hasattr(table, "values") else (table or []))
    out = []
    for r in rows:
        r = ["" if x is None else str(x).strip() for x in (list(r) + ["", "", ""])[:3]]
        if any(r):
            out.append(r)
    return out


def gradient_settings(table, method: str) -> dict:
    """{key: setting} from the editor's rows: a parameter's rows become its gradient list (one row
    without a filter) or `filter` entries (rows with a filter first; a row without one is the value for
    every other tensor), as the YAML writes them."""
    per_tensor = {p.key: p for p in extra_params(method) if p.per_tensor}
    by_key: dict[str, list] = {}
    for key, filt, vals in gradient_rows(table):
        if key not in per_tensor:
            raise UserError(f"per-layer values: {method} has no per-layer parameter {key!r}"
                            + (f" (it has: {', '.join(per_tensor)})" if per_tensor else ""))
        nums = parse_numbers(vals, f"per-layer values of {key}")
        if not nums:
            raise UserError(f"per-layer values of {key}: give one or more numbers, comma-separated")
        by_key.setdefault(key, []).append((filt or None, nums if len(nums) > 1 else nums[0]))
    out = {}
    for key, rows in by_key.items():
        if len(rows) == 1 and rows[0][0] is None:
            out[key] = rows[0][1]
        else:
            rows.sort(key=lambda r: r[0] is None)            # filtered rows first, the catch-all last
            out[key] = [{"filter": f, "value": v} if f else {"value": v} for f, v in rows]
    return out


def controls_from(values: dict) -> MethodControls:
    """The MethodControls the method components show ({key: value} by CONTROL_KEYS)."""
    v = {k: values.get(k) for k in CONTROL_KEYS}
    if v["preset"] not in picker_methods():
        raise UserError(f"unknown method {v['preset']!r}; pick one of {', '.join(picker_methods())}")
    n = int(finite(v["n_bands"] or 1, "DPA bands"))
    shares = [finite(v["band1"], "band edge 1"), finite(v["band2"], "band edge 2")][: n - 1]
    alphas = [finite(v[f"alpha{k}"], f"α{k}") for k in (1, 2, 3)][:n]
    extra = {}
    for p in extra_params(v["preset"]):
        raw = v.get(f"x_{p.key}")
        if raw is None or raw == "":
            continue
        val = _extra_value(p, raw, p.key)
        if p.required or val != p.default:
            extra[p.key] = val
    extra.update(gradient_settings(v.get("gradients"), v["preset"]))
    return MethodControls(
        preset=v["preset"], density=finite(v["density"], "density"), lambda_=finite(v["lambda_"], "λ"),
        weights=tuple(parse_numbers(v["weights"], "weights")), dp_lambda=finite(v["dp_lambda"], "DP λ"),
        dp_outlier_m=finite(v["dp_outlier_m"], "DP M"), band_shares=tuple(shares), alphas=tuple(alphas),
        alpha_per_model=parse_alpha_per_model(v["alpha_per_model"]), pcb_ratio=finite(v["pcb_ratio"], "PCB ratio"),
        seed=int(finite(v["seed"] or 0, "seed")), params=extra)


_PAD_SHARES = (0.5, 0.75)          # what the band-edge sliders a config does not use show


def extra_default(p):
    """What a generic control shows when its method sets nothing (a required value: a middle one)."""
    if p.required:
        return 0.5 if p.kind == "float" else None
    return p.default


def values_of(c: MethodControls) -> dict:
    """The component values (by CONTROL_KEYS) that show `c`: the method's own parameters at their
    values (a per-layer setting in the gradient editor), the others at their first spec's default."""
    shares = list(c.band_shares) + list(_PAD_SHARES)[len(c.band_shares):]
    alphas = list(c.alphas) + [1.0] * (3 - len(c.alphas))
    out = {"preset": c.preset, "density": c.density, "lambda_": c.lambda_,
           "weights": ", ".join(f"{w:g}" for w in c.weights), "dp_lambda": c.dp_lambda,
           "dp_outlier_m": c.dp_outlier_m, "n_bands": len(c.band_shares) + 1, "band1": shares[0], "band2": shares[1],
           "alpha1": alphas[0], "alpha2": alphas[1], "alpha3": alphas[2],
           "alpha_per_model": "; ".join(f"{r}=" + ",".join(f"{a:g}" for a in al) for r, al in c.alpha_per_model.items()),
           "pcb_ratio": c.pcb_ratio, "seed": c.seed}
    own = {p.key: p for p in extra_params(c.preset)}
    rows = []
    for key, spec in EXTRA_SPECS.items():
        p = own.get(key, spec)
        val = c.params.get(key, extra_default(p)) if key in own else extra_default(spec)
        if key in own and not P.is_constant(val):
            for entry in (val if isinstance(val[0], dict) else [{"value": val}]):
                vals = entry["value"] if isinstance(entry["value"], list) else [entry["value"]]
                rows.append([key, entry.get("filter") or "", ", ".join(f"{x:g}" for x in vals)])
            val = extra_default(p)
        out[f"x_{key}"] = val
    out["gradients"] = rows or [["", "", ""]]
    return out


DEFAULT_UI = values_of(DEFAULT_CONTROLS)


def ui_values(**over) -> dict:
    """What the method components hold after picking `over["preset"]` (default: dppa) on the page:
    that method's defaults, as the picker sets them, then `over`."""
    preset = over.get("preset", DEFAULT_CONTROLS.preset)
    return {**values_of(MethodControls(preset=preset)), **over}


def api_controls(**over) -> list:
    """The method controls as a gradio_client caller passes them (CONTROL_KEYS order; the per-layer
    table as the {"headers", "data"} a Dataframe takes over the API), from ui_values(**over)."""
    v = ui_values(**over)
    v["gradients"] = {"headers": GRADIENT_HEADERS, "data": v["gradients"]}
    return [v[k] for k in CONTROL_KEYS]
