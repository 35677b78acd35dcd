"""PCB's official whole-model semantics (`scope: model`, the default) computed in streaming passes:
the exact order statistics the passes rest on (StreamedSelect), the statistics themselves against
the whole flattened matrix, and the engine's streamed merge against the official flattening."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dppa_ui.methods.select import StreamedSelect

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- exact selection in passes

def adversarial_rows(rng: np.random.Generator) -> list[np.ndarray]:
    """(n, d) float32 matrices that break a careless selection: ties and long runs of duplicates,
    -0.0 beside +0.0, subnormals of both signs, infinities, bf16-like coarse values, one entry."""
    f = np.float32
    mixed = np.concatenate([
        rng.standard_normal((3, 700)).astype(f),
        np.full((3, 250), -0.0, f), np.zeros((3, 250), f),
        np.full((3, 40), f(1e-45)), np.full((3, 40), f(-1e-45)),                  # smallest subnormals
        (rng.standard_normal((3, 120)) * 1e-39).astype(f),                          # more subnormals
        np.full((3, 90), f(0.5)), np.full((3, 90), f(-0.5)),
        np.full((3, 7), f(np.inf)), np.full((3, 7), f(-np.inf)),
        np.full((3, 3), np.finfo(f).max), np.full((3, 3), -np.finfo(f).max),
    ], axis=1)
    coarse = rng.standard_normal((2, 5000)).astype(f).round(1)                      # few distinct values
    bf16ish = (torch.from_numpy(rng.standard_normal((2, 4000)).astype(f)) * 1e-3).bfloat16().float().numpy()
    return [mixed, coarse, bf16ish, np.full((2, 300), -0.0, f), np.array([[f(-3.0)], [f(2.0)]]),
            np.array([[0.0, -0.0, 1e-45, -1e-45]], f)]


@pytest.mark.parametrize("absolute", [False, True])
def test_streamed_select_is_exact_on_adversarial_rows(absolute):
    rng = np.random.default_rng(0)
    for x in adversarial_rows(rng):
        n, d = x.shape
        perm = rng.permutation(d)                               # any column order, any block sizes
        cuts = np.sort(rng.choice(np.arange(1, d), size=min(6, d - 1), replace=False)) if d > 1 else []
        blocks = [torch.from_numpy(np.ascontiguousarray(x[:, perm[p]])) for p in np.split(np.arange(d), cuts)]
        want = sorted(set(list(range(0, d, max(1, d // 97))) + [0, d - 1, d // 2, int(d * 1e-4), int(d * 0.9)]))
        sel = StreamedSelect(absolute)
        for b in blocks:
            sel.count(b)
        assert sel.total == d
        sel.locate(want)
        for b in blocks:
            sel.refine(b)
        got = sel.values().numpy()
        ref = np.sort(np.abs(x) if absolute else x, axis=1)[:, want]
        assert got.dtype == np.float32 and got.shape == (n, len(want))
        assert np.array_equal(got, ref)                         # == : -0.0 and +0.0 are one value
        nz = ref != 0
        assert np.array_equal(got.view(np.int32)[nz], ref.view(np.int32)[nz])    # bit for bit elsewhere


def test_streamed_select_refuses_misuse():
    sel = StreamedSelect()
    with pytest.raises(ValueError, match="pass 1"):
        sel.locate([0])
    sel.count(torch.ones(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        sel.locate([5])
    with pytest.raises(ValueError, match="locate"):
        sel.refine(torch.ones(2, 5))
    with pytest.raises(ValueError, match="rows"):
        sel.count(torch.ones(3, 5))
    with pytest.raises(ValueError, match="float32"):
        sel.count(torch.ones(2, 5, dtype=torch.float64))
