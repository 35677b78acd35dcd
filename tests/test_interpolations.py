"""The interpolation family (dppa_ui/interpolations) against hand-made tensors with known answers
(slerp of orthogonal vectors, Karcher mean of known points, Model Stock's angle formula, ...), and
every method end to end on the tiny Llama family: disk == memory, the result loads."""
from __future__ import annotations

import math

import pytest
import torch

import dppa_ui
from dppa_ui import ConfigError, load_config, merge_in_memory
from dppa_ui.interpolations import (arcee_fusion, karcher, linear, model_stock, model_stock_cosine, model_stock_ratio,
                                    multislerp, nearswap, nuslerp, nuslerp_t, slerp, slerp_coefficients, slerp_dot)

S = math.sqrt(0.5)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# --------------------------------------------------------------------------- slerp

def test_slerp_orthogonal_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(slerp(0.5, a, b), [S, S])                 # the midpoint of the quarter circle
    t = 0.25                                                # sin((1-t) pi/2), sin(t pi/2)
    assert close(slerp(t, a, b), [math.sin(0.75 * math.pi / 2), math.sin(0.25 * math.pi / 2)])
    assert close(slerp(0.5, 2 * a, b), [2 * S, S])          # norms interpolate along (unnormalized inputs)
    assert close(slerp(0.0, a, b), a) and close(slerp(1.0, a, b), b)


def test_slerp_colinear_and_antipodal_fall_back_to_linear():
    a = torch.tensor([1.0, 2.0, 3.0])
    for b in (3 * a, -a):
        assert close(slerp(0.3, a, b), 0.7 * a + 0.3 * b)
        assert slerp_coefficients(0.3, slerp_dot(a, b))[2] is True
    # just below the 0.9995 threshold it is still spherical
    b = torch.tensor([1.0, 0.0]) * math.cos(0.04) + torch.tensor([0.0, 1.0]) * math.sin(0.04)
    assert slerp_coefficients(0.5, slerp_dot(torch.tensor([1.0, 0.0]), b))[2] is False


def test_slerp_shapes_and_zero_vector():
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert slerp(0.5, a, torch.zeros(3, 4)).shape == (3, 4)           # zero norm counts as 1: no nan
    assert torch.isfinite(slerp(0.5, a, torch.zeros(3, 4))).all()


# --------------------------------------------------------------------------- nuslerp / multislerp

def test_nuslerp_t_from_weights_and_rows():
    assert nuslerp_t([1.0, 3.0]) == 0.75 and nuslerp_t([1.0, -1.0]) == 0.5
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # row vectors (flatten off): each row is a quarter turn -> midpoints
    assert close(nuslerp(0.5, a, b, flatten=False), [[S, S], [2 * S, 2 * S]])
    # columns (row_wise): column 0 = (1, 0) -> (0, 2), column 1 = (0, 2) -> (1, 0)
    out = nuslerp(0.5, a, b, row_wise=True, flatten=False)
    assert close(out[:, 0], slerp(0.5, a[:, 0], b[:, 0]))


def test_multislerp_two_unit_vectors_is_the_slerp_midpoint():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert close(multislerp([a, b], [1.0, 1.0]), [S, S, 0.0], tol=1e-5)
    base = torch.tensor([1.0, 1.0, 1.0])
    assert close(multislerp([a + base, b + base], [2.0, 2.0], base=base), base + torch.tensor([S, S, 0.0]), tol=1e-5)
    assert close(multislerp([a], [1.0]), a)
    # antipodal pair with equal weights: the weighted sum (here 0)
    assert close(multislerp([a, -a], [1.0, 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="antipodal"):
        multislerp([a, -a, torch.zeros(3)], [1.0, 1.0, 0.0])


# --------------------------------------------------------------------------- karcher

def test_karcher_of_known_points():
    e = torch.eye(3)
    # three orthonormal vectors: the mean direction is (1, 1, 1)/sqrt 3 and the scale their mean norm 1
    assert close(karcher([e[0], e[1], e[2]], max_iter=50, tol=1e-9), torch.ones(3) / math.sqrt(3), tol=1e-5)
    # two vectors at 60 degrees with norms 1 and 3: the bisector direction, scaled by the mean norm 2
    b = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3), 0.0]) * 3
    out = karcher([e[0], b], max_iter=50, tol=1e-9)
    assert close(out, 2 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0]), tol=1e-5)
    assert close(karcher([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


# --------------------------------------------------------------------------- model stock

def test_model_stock_angle_formula():
    base = torch.zeros(2)
    w1 = torch.tensor([1.0, 0.0])
    w2 = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    cos = model_stock_cosine(base, [w1, w2])
    assert cos.item() == pytest.approx(0.5)
    t = 2 * 0.5 / (1 + 0.5)                                # N cos / (1 + (N - 1) cos), N = 2
    assert model_stock_ratio(cos, 2).item() == pytest.approx(t)
    assert close(model_stock(base, [w1, w2]), t * (w1 + w2) / 2)
    # opposite offsets (cos = -1, N = 2): 1 + (N-1) cos = 0 -> keep the base
    assert close(model_stock(base + 1, [base + 1 + w1, base + 1 - w1]), base + 1)


def test_model_stock_filter_wise_per_row():
    base = torch.zeros(2, 2)
    w1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])             # row 0 orthogonal (t = 0), row 1 identical (t = 1)
    out = model_stock(base, [w1, w2], filter_wise=True)
    assert close(out[0], [0.0, 0.0]) and close(out[1], [1.0, 0.0])


# --------------------------------------------------------------------------- nearswap, linear, arcee fusion

def test_nearswap_by_hand():
    a = torch.zeros(3)
    b = torch.tensor([0.001, 0.5, -2.0])
    w = torch.tensor([1.0, 0.02, 0.005])                    # clamp(0.01 / |a - b|, 0, 1)
    assert close(nearswap(a, b, 0.01), w * b)


def test_linear():
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    assert close(linear(xs, [1.0, 3.0], True), [2.5, -1.0])
    assert close(linear(xs, [1.0, 3.0], False), [10.0, -4.0])


def test_arcee_fusion_keeps_only_upper_outliers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=g)
    other = base + 0.01 * torch.randn(8, 16, generator=g)
    other[3, 5] += 4.0                                      # one salient change
    out = arcee_fusion(base, other)
    p = torch.softmax(other, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    imp = (other - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    assert torch.allclose(out, torch.where(keep, other, base), atol=1e-6) and bool(keep[3, 5])
    assert torch.equal(out != base, keep & (other != base))
    assert int(keep.sum()) < n // 4


# --------------------------------------------------------------------------- configs and end to end

@pytest.mark.parametrize("method,models,params", [
    ("linear", 2, {"weight": 0.5}),
    ("slerp", 1, {"t": [0.0, 1.0]}),
    ("nuslerp", 2, {"weight": [1.0, 2.0]}),
    ("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 2, {}),
    ("karcher", 2, {"max_iter": 5}),
    ("model_stock", 2, {"filter_wise": True}),
    ("nearswap", 1, {"t": 0.001}),
    ("arcee_fusion", 1, {}),
])
def test_every_interpolation_end_to_end(tiny_family, read_weights, tmp_path, method, models, params):
    fam = tiny_family
    c = {"merge_method": method, "base_model": str(fam.base), "parameters": params,
         "models": [str(p) for p in fam.fts[:models]]}
    res = dppa_ui.merge(c, tmp_path / "out")
    on_disk = read_weights(tmp_path / "out")
    mem = merge_in_memory(fam.base_sd, fam.ft_sds[:models], c)
    assert set(on_disk) == set(fam.base_sd) and res.config.family == "interpolation"
    for k in mem:
        assert torch.equal(on_disk[k], mem[k]), k
    moved = sum(int((on_disk[k] != fam.base_sd[k]).sum()) for k in on_disk)
    assert moved > 0
    from test_engine import load_and_generate
    load_and_generate(tmp_path / "out")


def test_slerp_gradient_end_to_end_matches_reference(tiny_family):
    fam = tiny_family
    c = {"merge_method": "slerp", "base_model": "b", "models": ["a"],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]}}
    out = merge_in_memory(fam.base_sd, fam.ft_sds[:1], c)
    for k, base in fam.base_sd.items():
        layer = None if ".layers." not in k else int(k.split(".layers.")[1].split(".")[0])
        t = (float(layer) if "self_attn" in k else 0.3) if layer is not None else 0.3
        v0, v1 = base.reshape(-1).double(), fam.ft_sds[0][k].reshape(-1).double()
        dot = float((v0 / v0.norm()) @ (v1 / v1.norm()))
        if abs(dot) > 0.9995:
            ref = (1 - t) * v0 + t * v1
        else:
            th = math.acos(dot)
            ref = math.sin((1 - t) * th) / math.sin(th) * v0 + math.sin(t * th) / math.sin(th) * v1
        assert torch.allclose(out[k].reshape(-1).double(), ref, rtol=1e-5, atol=1e-6), k


def test_linear_with_base_counts_it_as_an_input(tiny_family):
    fam = tiny_family
    c = load_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 3}}],
                     "parameters": {"weight": 1.0}})
    assert [m.model for m in c.models] == ["a", "b"] and any("one more input" in n for n in c.notices)
    out = merge_in_memory(fam.base_sd, fam.ft_sds[:1], c)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[k], (3 * fam.ft_sds[0][k] + fam.base_sd[k]) / 4, atol=1e-6)


@pytest.mark.parametrize("d,needles", [
    ({"merge_method": "slerp", "models": ["a", "c"], "parameters": {"t": 0.5}}, ["slerp", "exactly 1", "got 2"]),
    ({"merge_method": "slerp", "models": ["a"], "parameters": {"t": 0.5}, "base_model": None}, ["base_model"]),
    ({"merge_method": "nearswap", "models": ["a"], "parameters": {"t": 0.0}}, ["t", "> 0"]),
    ({"merge_method": "nearswap", "models": ["a"]}, ["nearswap", "parameters.t"]),
    ({"merge_method": "model_stock", "models": ["a"]}, ["model_stock", "at least 2"]),
    ({"merge_method": "nuslerp", "models": ["a", "c", "d"]}, ["nuslerp", "exactly 2"]),
    ({"merge_method": "karcher", "models": ["a"], "parameters": {"max_iter": 0}}, ["max_iter"]),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                           {"model": "c", "parameters": {"weight": -1}}], "base_model": None},
     ["sums to 0", "normalize"]),
    ({"merge_method": "passthrough", "models": ["a"]}, ["passthrough", "base_model"]),
    ({"merge_method": "slerp", "models": ["a"], "parameters": {"t": 0.5}, "prune": "magnitude"}, ["prune", "slerp"]),
])
def test_interpolation_refusals(d, needles):
    full = {"base_model": "b", **d}
    if full.get("base_model") is None:
        full.pop("base_model")
    with pytest.raises(ConfigError) as e:
        load_config(full)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_slerp_t_outside_unit_interval_is_a_notice():
    c = load_config({"merge_method": "slerp", "base_model": "b", "models": ["a"], "parameters": {"t": 1.2}})
    assert any("extrapolates" in n for n in c.notices)
