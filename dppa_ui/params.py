"""Per-tensor parameter settings: gradient lists and `filter` entries, resolved exactly as mergekit
0.1.5 resolves them (mergekit/config.py `evaluate_setting`, parameter_resolver.py, plan.py).

A setting is one of
  a scalar                       0.5, true, "keep"
  a gradient                     [0, 0.5, 1]: interpolated linearly over the layers
  filter entries                 [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.3}, {value: 0.5}]
                                 the first entry whose `filter` is a substring of the tensor name
                                 (or is missing or "*") gives the value.

Gradients: a layer tensor gets t = i / (L - 1) for layer i of L (t = 1 when L = 1); tensors outside
the layers (embeddings, final norm, lm_head) get t = 0. With `slices`, i and L count the layers of
that output slice. A gradient of n anchors is read at x = t (n - 1): (1 - f) v[i0] + f v[i1] with
i0 = int(x), i1 = min(n - 1, i0 + 1), f = x - i0. Gradients of booleans or strings pick
v[int(t (n - 1))].

Precedence (highest first): the model's own `parameters`, the slice's, the config's; then the
method's default. A filter list that matches nothing falls through to the next scope, so the scopes
fold into one setting (`fold`). Empty lists are refused (mergekit reads them as "not set").
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from .registry import Param

_LAYER = re.compile(r"\.(\d+)\.")


class SettingError(ValueError):
    """A setting that does not fit its parameter (the config re-raises it as a ConfigError)."""


def layer_of(name: str) -> int | None:
    """The layer index of a tensor name: the first ".N." number (model.layers.N. ...), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, index: int) -> str:
    """`name` with its layer number (the first ".N.") replaced by `index`."""
    return _LAYER.sub(f".{index}.", name, count=1)


def layer_t(index: int | None, n_layers: int) -> float:
    """mergekit's gradient position: i / (L - 1) inside the layers, 1 for a single layer, 0 outside."""
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0


# ----------------------------------------------------------------------------- validation

def check_scalar(value, p: Param, where: str):
    """One scalar value of parameter `p`, validated (numbers: type and bounds)."""
    if p.kind in ("float", "int"):
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot, no exponent sign) as text; mergekit's pydantic takes it as a number.
            try:
                value = float(value.strip())
            except ValueError:
                raise SettingError(f"`{where}` must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"`{where}` must be a number, got {value!r}")
        if not math.isfinite(value):      # NaN, inf, and YAML's 1e400 (which reads as inf)
            raise SettingError(f"`{where}` must be a finite number, got {value!r}")
        if p.kind == "int" and int(value) != value:
            raise SettingError(f"`{where}` must be an integer, got {value!r}")
        if p.lo is not None and (value <= p.lo if p.lo_open else value < p.lo):
            raise SettingError(f"`{where}` = {value} is out of range: it must be {p.bounds_text()}")
        if p.hi is not None and (value >= p.hi if p.hi_open else value > p.hi):
            raise SettingError(f"`{where}` = {value} is out of range: it must be {p.bounds_text()}")
        return int(value) if p.kind == "int" else float(value)
    if p.kind == "rank":            # a whole number, or "full"
        if value == "full":
            return value
        return check_scalar(value, replace(p, kind="int"), where)
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise SettingError(f"`{where}` must be true or false, got {value!r}")
        return value
    if p.kind == "choice":
        if value not in p.choices:
            raise SettingError(f"`{where}` = {value!r} is not one of {', '.join(p.choices)}")
        return value
    return value


def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float, str))


def parse_setting(value, p: Param, where: str):
    """Validate a raw YAML setting of `p`: a scalar, a gradient list, or filter entries.

    Returns the canonical form: a scalar, a list of scalars, or a list of {"filter", "value"}
    dicts (filter None = every tensor)."""
    if p.kind == "floats":           # a list is the value itself (alpha_start), not a gradient
        if not isinstance(value, list) or not value:
            raise SettingError(f"`{where}` must be a non-empty list of numbers, got {value!r}")
        return [check_scalar(v, replace(p, kind="float"), f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) or (isinstance(value, list) and value and any(isinstance(v, dict) for v in value)):
        if not p.per_tensor:
            raise SettingError(f"`{where}`: `{p.key}` is one value for the whole merge; per-tensor `filter` "
                               f"entries are not possible for it")
        entries = [value] if isinstance(value, dict) else value
        out = []
        for i, e in enumerate(entries):
            w = f"{where}[{i}]"
            if not isinstance(e, dict):
                raise SettingError(f"`{w}`: mix of filter entries and plain values; write every entry as "
                                   f"{{filter: NAME_PART, value: V}} (the last one may omit `filter`)")
            extra = set(e) - {"filter", "value"}
            if extra:
                raise SettingError(f"`{w}` has unknown key(s) {', '.join(sorted(extra))}; a filter entry has "
                                   f"`filter` and `value`")
            if "value" not in e:
                raise SettingError(f"`{w}` needs a `value`")
            f = e.get("filter")
            if f is not None and not isinstance(f, str):
                raise SettingError(f"`{w}.filter` must be a part of a tensor name (text), got {f!r}")
            v = e["value"]
            if isinstance(v, dict) or (isinstance(v, list) and any(not _is_scalar(x) for x in v)):
                raise SettingError(f"`{w}.value` must be a value or a gradient list, not nested filters")
            out.append({"filter": f, "value": _gradient_or_scalar(v, p, f"{w}.value")})
        return out
    return _gradient_or_scalar(value, p, where)


def _gradient_or_scalar(value, p: Param, where: str):
    if isinstance(value, list):
        if not p.per_tensor:
            raise SettingError(f"`{where}`: `{p.key}` is one value for the whole merge; a gradient list "
                               f"({value!r}) is not possible for it")
        if not value:
            raise SettingError(f"`{where}` is an empty list; give a value or a gradient of at least one value")
        return [check_scalar(v, p, f"{where}[{i}]") for i, v in enumerate(value)]
    return check_scalar(value, p, where)


def is_constant(setting) -> bool:
    return not isinstance(setting, list)


def fold(*scopes):
    """One setting equivalent to the given scopes in precedence order (None = not set in that scope).

    A scalar or gradient in a scope hides every lower scope; filter entries are followed by the
    lower scopes' entries, so an unmatched tensor falls through as mergekit's resolver does."""
    entries: list[dict] = []
    for s in scopes:
        if s is None:
            continue
        if isinstance(s, list) and s and isinstance(s[0], dict):
            entries.extend(s)
            continue
        if not entries:
            return s
        entries.append({"filter": None, "value": s})
        break
    if not entries:
        return None
    # A catch-all entry ends the list; a single catch-all is the plain value itself.
    for i, e in enumerate(entries):
        if e["filter"] in (None, "*"):
            entries = entries[: i + 1]
            break
    if len(entries) == 1 and entries[0]["filter"] in (None, "*"):
        return entries[0]["value"]
    return entries


def anchors(setting) -> list:
    """Every scalar a setting can take at a gradient anchor (bounds checks of sums use these)."""
    if not isinstance(setting, list):
        return [setting]
    if setting and isinstance(setting[0], dict):
        return [a for e in setting for a in anchors(e["value"])]
    return list(setting)


# ----------------------------------------------------------------------------- resolution

def evaluate(setting, tensor_name: str, t: float):
    """The value of a folded setting for one tensor at gradient position t; None when no filter
    entry matches (the caller falls back to the default)."""
    if not isinstance(setting, list):
        return setting
    if setting and isinstance(setting[0], dict):
        for e in setting:
            f = e.get("filter")       # a YAML entry without `filter` matches every tensor
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate(e["value"], tensor_name, t)
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    x = t * (len(setting) - 1)
    i0 = int(x)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = x - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def gradient_curve(setting, tensor_name: str, n_layers: int) -> list[Any]:
    """The value per layer (0 .. n_layers - 1) of a setting for tensors like `tensor_name` (a name
    or name part that the filters see): what a gradient editor plots."""
    return [evaluate(setting, tensor_name, layer_t(i, n_layers)) for i in range(n_layers)]
