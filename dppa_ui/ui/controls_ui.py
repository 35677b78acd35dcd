"""The method column as a value: which controls a method uses (preset_view, bands_view), the
controls read into a MethodControls (controls_of), and a MethodControls, with the models, put on
the page (show_controls; from a YAML config: yaml_into_controls). Every section that reads or sets
the controls goes through here."""
from __future__ import annotations

from dataclasses import replace

import gradio as gr

from ..config import load_config
from ..controls import MethodControls, extra_params, picker_methods
from ..registry import METHODS
from .choices import all_choices, resolve_user_ref
from .common import CONTROL_KEYS, DEFAULT_UI, EXTRA_SPECS, AppState, controls_from, extra_default, sig, values_of

FAMILY_LABELS = {"pipeline": "prune → combine", "interpolation": "interpolation", "stacking": "layer stacking"}


def preset_info(preset: str) -> str:
    m = METHODS.get(preset) or METHODS[DEFAULT_UI["preset"]]
    how = (f"prune **{m.stages[0]}** → amplify **{m.stages[1]}** → combine **{m.stages[2]}**" if m.stages
           else f"{FAMILY_LABELS[m.family]} of the weights")
    return f"{m.doc}  \n{how} · [paper]({m.paper})" if m.paper else f"{m.doc}  \n{how}"


def preset_view(v: dict) -> dict:
    """Only the controls the method uses (its other parameters at the method's defaults), and two
    lines on what it does with its paper."""
    preset = v["preset"] if v["preset"] in picker_methods() else DEFAULT_UI["preset"]
    m = METHODS[preset]
    prune, amplify, combine = m.stages or ("none", "none", "none")
    keys = {p.key for p in m.params}
    own = {p.key: p for p in extra_params(preset)}
    out = {"preset_info": preset_info(preset), "density": gr.update(visible=prune != "none"),
           "lambda_": gr.update(visible="lambda" in keys), "weights": gr.update(visible="weight" in keys),
           "dp_group": gr.update(visible=prune == "dp"), "dpa_group": gr.update(visible=amplify == "dpa"),
           "pcb_ratio": gr.update(visible=combine == "pcb"),
           # PCB's λ_i search: the methods that combine by PCB's balancing
           "auto_lambda_group": gr.update(visible=combine == "pcb"),
           "seed": gr.update(visible=prune in ("random", "della", "apl")),
           "extra_group": gr.update(visible=bool(own)),
           "gradient_acc": gr.update(visible=any(p.per_tensor for p in own.values()))}
    for key in EXTRA_SPECS:
        p = own.get(key)
        out[f"x_{key}"] = gr.update(visible=p is not None, **({"value": extra_default(p), "info": p.doc}
                                                             if p is not None else {}))
    return out


VIEW_OUT = ["preset_info", "density", "lambda_", "weights", "dp_group", "dpa_group", "pcb_ratio", "auto_lambda_group",
            "seed", "extra_group", "gradient_acc", *[f"x_{k}" for k in EXTRA_SPECS]]


def bands_view(v: dict) -> dict:
    n = int(v["n_bands"] or 1)
    return {"band1": gr.update(visible=n >= 2), "band2": gr.update(visible=n >= 3),
            "alpha2": gr.update(visible=n >= 2), "alpha3": gr.update(visible=n >= 3)}


def controls_of(v: dict) -> MethodControls:
    """The MethodControls the method column's components hold (v: {key: value} by CONTROL_KEYS)."""
    return controls_from({k: v[k] for k in CONTROL_KEYS})


def show_controls(c: MethodControls, base: str | None = None, fts: list[str] | None = None,
                  choices: list[str] | None = None) -> dict:
    """Outputs that put `c` (and optionally the model pickers) on the page, with the views that
    depend on the preset and band count."""
    out = dict(values_of(c))
    for k, upd in {**preset_view(out), **bands_view(out)}.items():
        out[k] = gr.update(value=out[k], visible=upd["visible"]) if k in out else upd
    if base is not None:
        out["base"] = gr.update(choices=choices, value=base)
        out["fts"] = gr.update(choices=choices, value=fts)
    return out


CONTROLS_OUT = [*CONTROL_KEYS, "preset_info", "dp_group", "dpa_group", "auto_lambda_group", "extra_group",
                "gradient_acc"]           # what show_controls sets without the models
SHOW_OUT = ["base", "fts", *CONTROLS_OUT]


def yaml_into_controls(state: AppState, text: str) -> dict:
    """show_controls of a YAML config, its models added to the pickers; a ConfigError (or a model
    the app may not reach) when it cannot be loaded, and then nothing changes."""
    cfg = load_config(text or "")
    c = MethodControls.from_config(cfg)
    refs = [ref if ref in all_choices(state) else resolve_user_ref(ref)
            for ref in [cfg.base_model, *[m.model for m in cfg.models]]]
    for ref in refs:
        if ref not in all_choices(state):
            state.added.append(ref)
    return show_controls(c, refs[0], refs[1:], all_choices(state))



def rounded(c: MethodControls, digits: int = 3) -> MethodControls:
    """`c` with every number at `digits` significant digits: what the controls show of a value an
    optimizer found (a slider would print 0.2916666666666667)."""
    r = lambda x: sig(x, digits) if isinstance(x, float) else x        # noqa: E731
    return replace(c, density=r(c.density), lambda_=r(c.lambda_), weights=tuple(r(w) for w in c.weights),
                   dp_lambda=r(c.dp_lambda), dp_outlier_m=r(c.dp_outlier_m),
                   band_shares=tuple(r(b) for b in c.band_shares), alphas=tuple(r(a) for a in c.alphas),
                   alpha_per_model={k: [r(a) for a in v] for k, v in c.alpha_per_model.items()},
                   pcb_ratio=r(c.pcb_ratio), params={k: r(v) for k, v in c.params.items()})
