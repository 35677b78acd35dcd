"""The models the pickers offer: the demo family, folders under the model roots, hub ids the user
added (checked under the app's policy)."""
from __future__ import annotations

from pathlib import Path

from .. import zoo
from ..refs import check_path_allowed, is_hub_id, resolve_model
from ..workspace import short
from .common import AppState, UserError, model_roots, policy


def demo_choices() -> tuple[list[str], str | None, list[str], str]:
    """(demo refs, default base, default fine-tunes, note). The note says how to build the family
    when it is missing, so the app still starts."""
    refs, missing = [], []
    for name in zoo.demo_names():
        try:
            zoo.demo_path(name)
            refs.append(f"demo:{name}")
        except ValueError:
            missing.append(name)
    if not refs:
        return [], None, [], ("The demo model family is not built. Run `python -m dppa_ui zoo build`, or add a "
                              "model folder under the model roots.")
    base = "demo:base" if "demo:base" in refs else refs[0]
    fts = [f"demo:{d}" for d in zoo.domain_names() if f"demo:{d}" in refs]
    return refs, base, fts, (f"Demo models missing: {', '.join(missing)}." if missing else "")


def all_choices(state: AppState | None) -> list[str]:
    refs = demo_choices()[0]
    return refs + [r for r in (state.added if state else []) if r not in refs]


def resolve_user_ref(text: str) -> str:
    """What the user typed in the model box, checked under the app's policy: the ref to keep
    (a demo ref, the resolved folder under the roots, or the hub id)."""
    text = (text or "").strip()
    if not text:
        raise UserError("type a model folder (under the model roots) or a hub id like org/name")
    path = resolve_model(text, policy=policy())
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{short(text)} is not a model folder: it has no config.json")
    if text.startswith("demo:") or is_hub_id(text, policy()):
        return text
    return str(check_path_allowed(path, model_roots()))
