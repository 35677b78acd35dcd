"""PCB's official whole-model semantics (`scope: model`, the default) computed in streaming passes:
the exact order statistics the passes rest on (StreamedSelect), the statistics themselves against
the whole flattened matrix, and the engine's streamed merge against the official flattening."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import dppa_ui
from dppa_ui import load_config, merge_in_memory, zoo
from dppa_ui.config import ConfigError
from dppa_ui.methods.pcb import PCBStats, clip_positions, cut_position, pcb_combine, pcb_global_stats
from dppa_ui.methods.select import StreamedSelect

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- references

def official_pcb(flat: torch.Tensor, weights, ratio: float, clip: float = 0.0001,
                 with_scale: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """pcb-merging.py's PCB_merge on the (n, d) matrix of flattened task vectors, transcribed with
    torch.sort (clamp ratios = clip; a zero min-max range gives 0), per-task weights in the
    numerator only. Returns the merged vector (and the balancing weights `scale`)."""
    n, d = flat.shape

    def clamp(x, lo_r, hi_r):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * lo_r)].unsqueeze(1), s[:, int(d * (1 - hi_r) - 1)].unsqueeze(1))

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return torch.nan_to_num((x - lo) / (hi - lo), nan=0.0)

    a = clamp(flat.abs(), clip, clip)
    score = torch.exp(n * normalize(a) ** 2) * torch.tanh(flat * flat.sum(dim=0))
    scale = normalize(clamp(score, 1 - ratio, 0))
    w = torch.tensor(weights, dtype=flat.dtype).view(-1, 1)
    merged = (w * torch.sign(flat) * a * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return (merged, scale) if with_scale else merged


def whole_stats(flat: torch.Tensor, ratio: float, clip: float) -> PCBStats:
    """The four per-row numbers on the whole matrix, with a full sort."""
    n, d = flat.shape
    s = torch.sort(flat.abs(), dim=1).values
    lo_at, hi_at = clip_positions(d, clip)
    lo, hi = s[:, lo_at:lo_at + 1], s[:, hi_at:hi_at + 1]
    a = flat.abs().clamp(lo, hi)
    span = hi - lo
    x = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, 1.0), 0.0)
    score = torch.exp(n * x ** 2) * torch.tanh(flat * flat.sum(dim=0))
    ss = torch.sort(score, dim=1).values
    at = cut_position(d, ratio)
    return PCBStats(lo, hi, ss[:, at:at + 1], ss[:, -1:])


def split_columns(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [b.contiguous() for b in torch.split(flat, sizes, dim=1)]


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
        want = sorted(set(list(range(0, d, max(1, d // 97))) + [0, d - 1, d // 2, *clip_positions(d, 1e-4),
                                                                 cut_position(d, 0.1)]))
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


# ------------------------------------------------------------------ whole-model statistics in passes

def heavy_tailed_tensors(seed: int, levels: int | None) -> tuple[torch.Tensor, list[int]]:
    """(3, d) task vectors over 7 tensors of very different sizes, Student-t(2) deltas whose scale
    differs 30x between tensors (the per-tensor statistics then differ from the model's); with
    `levels`, rounded to a few multiples of the scale so that |delta| and the scores are full of
    ties (every tied column scores alike, exact zeros score 0 and -0)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 64, 300, 1024, 2000, 4096]
    parts = []
    for j, m in enumerate(sizes):
        t = torch.randn((3, m), generator=g) / torch.randn((2, 3, m), generator=g).pow(2).mean(0).sqrt().clamp_min(1e-3)
        s = 0.01 * (30.0 ** (j / (len(sizes) - 1)))
        if levels:
            t = t.round().clamp(-levels, levels)
        parts.append(t * s)
    return torch.cat(parts, dim=1), sizes


@pytest.mark.parametrize("clip", [0.0, 0.0001, 0.01])
@pytest.mark.parametrize("ratio,levels", [(0.1, None), (0.2, 2), (0.5, 1), (0.9, 3)])
def test_streamed_statistics_equal_the_whole_matrix(clip, ratio, levels):
    flat, sizes = heavy_tailed_tensors(7, levels)
    blocks = split_columns(flat, sizes)
    calls = []

    def passes():
        calls.append(1)
        return iter(blocks)
    got = pcb_global_stats(passes, ratio, clip)
    ref = whole_stats(flat, ratio, clip)
    assert len(calls) == (4 if clip > 0 else 3)
    for name in ("lo", "hi", "floor", "top"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    if levels:      # the case is adversarial: the cut falls inside a run of equal scores
        assert any(int((row == f).sum()) > 1 for row, f in zip(_scores(flat, ref), ref.floor))
    # merged tensor by tensor with them = the official code on the whole flattened matrix
    merged = torch.cat([pcb_combine(b, [1.0, 0.6, 1.3], ratio, clip, stats=got) for b in blocks])
    official = official_pcb(flat, [1.0, 0.6, 1.3], ratio, clip)
    assert torch.allclose(merged, official, rtol=1e-6, atol=1e-7 * float(flat.abs().max()))
    assert torch.equal(merged, pcb_combine(flat, [1.0, 0.6, 1.3], ratio, clip))      # in-memory scope model


def _scores(flat: torch.Tensor, st: PCBStats) -> torch.Tensor:
    a = flat.abs().clamp(st.lo, st.hi)
    span = st.hi - st.lo
    x = torch.where(span > 0, (a - st.lo) / torch.where(span > 0, span, 1.0), 0.0)
    return torch.exp(flat.shape[0] * x ** 2) * torch.tanh(flat * flat.sum(dim=0))


def test_per_tensor_and_whole_model_statistics_differ_on_heavy_tails():
    # why the default matters: per tensor, each tensor's own tails set its clip and cut
    flat, sizes = heavy_tailed_tensors(3, None)
    blocks = split_columns(flat, sizes)
    whole = torch.cat([pcb_combine(b, [1.0] * 3, 0.1, stats=pcb_global_stats(lambda: iter(blocks), 0.1))
                       for b in blocks])
    per_tensor = torch.cat([pcb_combine(b, [1.0] * 3, 0.1) for b in blocks])
    assert float((whole - per_tensor).abs().max()) > float(flat.abs().mean())


# ---------------------------------------------------------------------------- the merge: engine, app

DEMO_FTS = ["reverse", "cipher", "sort", "brackets"]


@pytest.fixture(scope="module")
def demo_family():
    from safetensors.torch import load_file
    return (load_file(str(zoo.demo_path("base") / "model.safetensors")),
            [load_file(str(zoo.demo_path(n) / "model.safetensors")) for n in DEMO_FTS])


def demo_config(**params) -> dict:
    return {"merge_method": "pcb", "base_model": "demo:base", "models": [{"model": f"demo:{n}"} for n in DEMO_FTS],
            "parameters": {"pcb_ratio": 0.2, **params}, "dtype": "float32"}


def flattened_official(base, fts, names, ratio, clip=0.0001, weights=None):
    flat = torch.stack([torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in names]) for ft in fts])
    merged, out, pos = official_pcb(flat, weights or [1.0] * len(fts), ratio, clip), {}, 0
    for k in names:
        n = base[k].numel()
        out[k] = base[k].float() + merged[pos:pos + n].view(base[k].shape)
        pos += n
    return out, float(flat.abs().mean())


def test_engine_default_pcb_is_the_official_whole_model_flattening(demo_family, read_weights, tmp_path):
    base, fts = demo_family
    assert load_config(demo_config()).get("pcb_scope") == "model"
    dppa_ui.merge(demo_config(), tmp_path / "out")
    got = read_weights(tmp_path / "out")
    ref, scale = flattened_official(base, fts, list(base), 0.2)
    for k in base:
        assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-6 * scale), k
    mem = merge_in_memory(base, fts, demo_config())
    assert all(torch.equal(mem[k], got[k]) for k in base)
    per_tensor = merge_in_memory(base, fts, demo_config(scope="tensor"))      # still an option, and it differs
    assert max(float((per_tensor[k] - got[k]).abs().max()) for k in base) > scale


def test_engine_streamed_pcb_with_a_prune_and_weights(demo_family, read_weights, tmp_path):
    # a magnitude prune before PCB, per-model weights and clip 0.01: the passes see the pruned deltas
    base, fts = demo_family
    c = demo_config(clip_ratio=0.01, **{"lambda": 0.9})
    c.update(merge_method=None, prune="magnitude", combine="pcb",
             models=[{"model": f"demo:{n}", "parameters": {"density": 0.5, "weight": w}}
                     for n, w in zip(DEMO_FTS, [1.0, 0.7, 1.2, 0.9])])
    del c["merge_method"]
    dppa_ui.merge(c, tmp_path / "out")
    got = read_weights(tmp_path / "out")
    from dppa_ui.methods import magnitude_prune
    pruned = [{k: base[k] + magnitude_prune(ft[k] - base[k], 0.5) for k in base} for ft in fts]
    ref, scale = flattened_official(base, pruned, list(base), 0.2, clip=0.01, weights=[1.0, 0.7, 1.2, 0.9])
    for k in base:
        assert torch.allclose(got[k], base[k] + 0.9 * (ref[k] - base[k]), rtol=1e-6, atol=1e-6 * scale), k


def test_engine_leaves_a_tied_copy_out_of_the_flattening(tmp_path, read_weights):
    # lm_head stored as a copy of embed_tokens in the base and every fine-tune: the official
    # remove_keys treatment (counted once, merged as its primary)
    from conftest import heavy_tailed, write_tiny_llama
    base = write_tiny_llama(tmp_path / "base", seed=3)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    write_tiny_llama(tmp_path / "base", dict(base), seed=3)
    fts = []
    for i in range(2):
        g = torch.Generator().manual_seed(40 + i)
        sd = {k: v + heavy_tailed(v.shape, g) for k, v in base.items()}
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        fts.append(write_tiny_llama(tmp_path / f"ft{i}", sd, seed=3))
    c = {"merge_method": "pcb", "base_model": str(tmp_path / "base"), "parameters": {"pcb_ratio": 0.3},
         "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)]}
    dppa_ui.merge(c, tmp_path / "out")
    got = read_weights(tmp_path / "out")
    keys = [k for k in base if k != "lm_head.weight"]
    ref, scale = flattened_official(base, fts, keys, 0.3)
    for k in keys:
        assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-6 * scale), k
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_inspect_pcb_weights_are_the_merge_s_whole_model_weights(tiny_llama, tmp_path):
    from dppa_ui import analysis
    from dppa_ui.controls import MethodControls
    from dppa_ui.workspace import DiskCache, Workspace
    fam = tiny_llama("pcb-inspect", n_ft=3)
    ws = Workspace(temp_root=tmp_path, stats_cache=DiskCache(tmp_path / "cache")).load(
        str(fam.base), [str(f) for f in fam.fts], start_stats=False)
    try:
        c = ws.config(MethodControls(preset="pcb", pcb_ratio=0.2))
        assert c.get("pcb_scope") == "model"
        names = [k for k in fam.base_sd if fam.base_sd[k].is_floating_point()]
        flat = torch.stack([torch.cat([(ft[k] - fam.base_sd[k]).reshape(-1) for k in names]) for ft in fam.ft_sds])
        _, scale = official_pcb(flat, [1.0] * 3, 0.2, with_scale=True)
        name = "model.layers.1.mlp.up_proj.weight"
        pos = sum(fam.base_sd[k].numel() for k in names[:names.index(name)])
        want = scale[:, pos:pos + fam.base_sd[name].numel()]
        shown = analysis.combine_maps(ws, c, name)["pcb_scale"].reshape(3, -1)
        assert torch.allclose(shown, want, rtol=1e-5, atol=1e-6)
        per_tensor = analysis.combine_maps(ws, c.with_settings({"pcb_scope": "tensor"}), name)["pcb_scale"]
        per_tensor = per_tensor.reshape(3, -1)
        assert not torch.allclose(per_tensor, want, rtol=1e-3, atol=1e-3)       # what the view showed before
        assert ws.pcb_stats(c) is ws.pcb_stats(c)                                 # computed once
    finally:
        ws.close()


def test_a_cancel_during_the_statistics_passes_leaves_nothing(demo_family, tmp_path):
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 60          # inside the second pass (39 tensors a pass)
    progress = []
    with pytest.raises(InterruptedError):
        dppa_ui.merge(demo_config(), tmp_path / "out", cancel=cancel, progress=lambda a, b: progress.append(a))
    assert len(seen) == 61 and progress[-1] == 60 and not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------ config

def test_scope_model_is_the_default_and_tensor_an_option():
    c = {"merge_method": "pcb", "base_model": "b", "models": [{"model": "m1"}, {"model": "m2"}]}
    assert load_config(c).get("pcb_scope") == "model"
    assert load_config({**c, "parameters": {"scope": "tensor"}}).get("pcb_scope") == "tensor"
    # one cut over the whole model needs one ratio; per tensor it may vary
    grad = {**c, "parameters": {"pcb_ratio": [0.1, 0.3]}}
    with pytest.raises(ConfigError, match="scope: tensor"):
        load_config(grad)
    assert load_config({**grad, "parameters": {"pcb_ratio": [0.1, 0.3], "scope": "tensor"}}).get("pcb_scope") == "tensor"


def test_slices_run_pcb_per_tensor_unless_model_scope_is_asked_for():
    src = [{"model": "m1", "layer_range": [0, 2]}, {"model": "m2", "layer_range": [0, 2]},
           {"model": "b", "layer_range": [0, 2]}]
    c = {"merge_method": "pcb", "base_model": "b", "slices": [{"sources": src}]}
    cfg = load_config(c)
    assert cfg.get("pcb_scope") == "tensor" and any("scope tensor" in n for n in cfg.notices)
    with pytest.raises(ConfigError, match="slices"):
        load_config({**c, "parameters": {"scope": "model"}})
    with pytest.raises(ConfigError, match="slices"):
        load_config({**c, "slices": [{"sources": src, "parameters": {"scope": "model"}}]})
