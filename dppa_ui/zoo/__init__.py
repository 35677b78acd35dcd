"""The demo model family: one tiny Llama base and fine-tunes on distinct skills, shipped under
assets/zoo so the app and tests work with no model hub. `demo:NAME` refs resolve through here.

  demo_names()       -> ["base", "reverse", "cipher", "sort", "brackets", "reverse_complex"]
  demo_path(name)    -> Path of that model's HF directory
  model_info(x)      -> {"role": "base"|"finetune"|"complex", "domain": str|None, ...}
  build_zoo(...)     -> rebuilds the family (see builder.py)
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import evaluation, refs
from .builder import build_zoo
from .domains import DOMAINS, family_names
from .paths import INFO_FILE, MANIFEST, ZOO_DIR

_NAMES = family_names()


def demo_names() -> list[str]:
    """Names of the shipped demo models (usable as `demo:NAME`)."""
    return list(_NAMES)


def domain_names() -> list[str]:
    """The skills of the family, one fine-tune each."""
    return list(DOMAINS)


def demo_path(name: str) -> Path:
    """Directory of demo model `name` (a leading "demo:" is accepted)."""
    key = name[5:] if name.startswith("demo:") else name
    if key not in _NAMES:
        raise ValueError(f"unknown demo model {name!r}; valid names: {', '.join(_NAMES)}")
    path = ZOO_DIR / key
    if not (path / "config.json").is_file():
        raise ValueError(f"demo model {key!r} is not built at {path}; run `python -m dppa_ui zoo build`")
    return path


def model_info(path_or_name: str | Path) -> dict:
    """What a demo model (or any copy of one) is: role and domain, from its dppa_zoo.json.

    A directory without that file (any other model) gives {"role": None, "domain": None}.
    """
    s = str(path_or_name)
    path = demo_path(s) if (s.startswith("demo:") or s in _NAMES) and not Path(s).is_dir() else Path(s)
    f = path / INFO_FILE
    if not f.is_file():
        return {"role": None, "domain": None}
    return json.loads(f.read_text())


def _domain_order(folder: Path) -> list[str] | None:
    """The domain order of a family folder (this one or any built by build_zoo): its manifest's."""
    manifest = Path(folder) / MANIFEST
    return list(json.loads(manifest.read_text())["domains"]) if manifest.is_file() else None


def _register() -> None:
    """Make the family reachable from the core without the core importing it: `demo:NAME` model
    refs, the `zoo` score suite (its dev/test splits) and each demo model's domain."""
    refs.register_scheme("demo", demo_path)
    evaluation.register_suite("zoo", ZOO_DIR)
    evaluation.register_domain_order(_domain_order)
    evaluation.register_domain_lookup(lambda path: model_info(path).get("domain"))


__all__ = ["ZOO_DIR", "INFO_FILE", "MANIFEST", "demo_names", "domain_names", "demo_path", "model_info", "build_zoo"]

_register()
