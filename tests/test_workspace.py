"""The app's core (dppa_ui.workspace, modelbuild, gpu): lazy per-tensor access, statistics on
demand / in the background / cached on disk, merges through the CLI's engine, accelerate-built
chat models (offloaded = plain), and the spaces.GPU-decorated steps running locally."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from dppa_ui import analysis, gpu, modelbuild
from dppa_ui.controls import MethodControls
from dppa_ui.runner import merge as cli_merge
from dppa_ui.stats import collect_stats
from dppa_ui.workspace import DiskCache, Workspace, runs as runs_mod

pytestmark = pytest.mark.slow


@pytest.fixture()
def cache(tmp_path):
    return DiskCache(tmp_path / "stats-cache")


@pytest.fixture()
def fam(tiny_llama):
    return tiny_llama("ws", n_ft=3)


def open_ws(fam, cache, tmp_path, **kw):
    return Workspace(temp_root=tmp_path, stats_cache=cache).load(str(fam.base), [str(f) for f in fam.fts], **kw)


def test_a_tensor_not_on_screen_is_never_read(fam, cache, tmp_path):
    ws = open_ws(fam, cache, tmp_path, start_stats=False)
    assert not ws.access.reads                                   # loading reads headers only
    cfg = ws.config(MethodControls(preset="ties", density=0.3))
    name = ws.access.tensor_name(1, "mlp.down_proj")
    analysis.thresholds(ws, cfg, name)
    analysis.histogram(ws, cfg, name)
    analysis.mask_data(ws, cfg, name)
    assert set(ws.access.reads) == {name}
    # the threshold is the exact k-th largest |delta| of what the files hold
    d = ws.access.delta(name, 1).abs().reshape(-1)
    k = int(0.3 * d.numel())
    assert analysis.thresholds(ws, cfg, name)[1]["threshold"] == float(d.sort(descending=True).values[k - 1])
    ws.close()


def test_rank_look_ups_are_exact_before_and_after_the_background_sort(fam, cache, tmp_path):
    """The first look-up on a tensor is a selection and starts its sort in the background; every
    answer, before the sort is there and after (a look-up), is the exact k-th largest |δ|."""
    ws = open_ws(fam, cache, tmp_path, start_stats=False)
    acc = ws.access
    name = acc.tensor_name(1, "mlp.down_proj")
    ref = acc.delta(name, 2).abs().reshape(-1).sort(descending=True).values
    ks = [1, 7, acc.numel[name] // 3, acc.numel[name]]
    first = [acc.value_at_rank(name, 2, k) for k in ks]
    for _ in range(200):
        if acc.cached(("sorted", name, 2)) is not None:
            break
        time.sleep(0.01)
    assert acc.cached(("sorted", name, 2)) is not None            # sorted in the background
    assert first == [acc.value_at_rank(name, 2, k) for k in ks] == [float(ref[k - 1]) for k in ks]
    ws.close()


def test_background_statistics_match_collect_stats_and_hit_the_disk_cache(fam, cache, tmp_path):
    ws = open_ws(fam, cache, tmp_path)
    full = ws.stats.wait(5.0, timeout=60)
    base, fts = fam.base_sd, fam.ft_sds
    names = [n for n in base if base[n].is_floating_point()]
    ref = collect_stats(names, lambda n: (base[n].float(), [sd[n].float() for sd in fts]),
                        [str(f) for f in fam.fts], 5.0)
    for got, want in zip(full, ref):
        assert got.block_pct == pytest.approx(want.block_pct)
        for n in names:
            assert got.tensors[n].pct_outlier == pytest.approx(want.tensors[n].pct_outlier)
            assert got.tensors[n].mean_abs == pytest.approx(want.tensors[n].mean_abs)
    assert cache.writes == 3 and ws.stats_progress().state == "done"
    norm0 = float(sum((fts[0][n].float() - base[n].float()).pow(2).sum() for n in names) ** 0.5
                  / sum(base[n].float().pow(2).sum() for n in names) ** 0.5)
    assert ws.stats.norms()[0] == pytest.approx(norm0, rel=1e-5)
    ws.close()
    # a second load of the same models, in another workspace: read back, nothing computed
    calls = []
    real = gpu.pair_statistics
    gpu.pair_statistics = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        ws2 = open_ws(fam, cache, tmp_path)
        assert ws2.stats.full(5.0) is not None and not calls and cache.hits == 3
        assert ws2.stats.full(5.0)[1].tensors == full[1].tensors
        ws2.close()
    finally:
        gpu.pair_statistics = real


def test_statistics_cache_is_invalidated_when_a_checkpoint_changes(tiny_llama, cache, tmp_path):
    import shutil
    src = tiny_llama("inval", n_ft=1)
    base = tmp_path / "base"
    ft = tmp_path / "ft"
    shutil.copytree(src.base, base)
    shutil.copytree(src.fts[0], ft)
    ws = Workspace(temp_root=tmp_path, stats_cache=cache).load(str(base), [str(ft)])
    before = ws.stats.wait(timeout=60)[0]
    ws.close()
    # the fine-tune is rewritten in place with a different delta
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ft / "model.safetensors"))
    sd = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    ws = Workspace(temp_root=tmp_path, stats_cache=cache).load(str(base), [str(ft)])
    after = ws.stats.wait(timeout=60)[0]
    assert cache.writes == 2                               # computed again, not read back
    name = next(n for n, t in after.tensors.items() if t.dp_target)
    assert after.tensors[name].mean_abs != pytest.approx(before.tensors[name].mean_abs)
    ws.close()


def test_background_statistics_report_progress_and_cancel(fam, cache, tmp_path, monkeypatch):
    release = threading.Event()

    def slow(base_dir, ft_dirs, refs, outlier_m, progress=None, cancel=None):
        for _ in range(1000):
            if cancel():
                raise InterruptedError("statistics cancelled")
            progress(1)
            release.wait(0.01)
        raise AssertionError("not cancelled")

    monkeypatch.setattr(gpu, "pair_statistics", slow)
    ws = open_ws(fam, cache, tmp_path)
    deadline = time.time() + 10
    while ws.stats_progress().done < 5 and time.time() < deadline:
        time.sleep(0.01)
    p = ws.stats_progress()
    assert p.state == "running" and 0 < p.fraction < 1 and "computing…" in p.text()
    # a DP view meanwhile uses the target density and says it is pending
    cfg = ws.config(MethodControls(preset="dp", density=0.3))
    rows = analysis.thresholds(ws, cfg, ws.access.tensor_name(0, "mlp.up_proj"))
    assert all(r["pending"] and r["density"] == 0.3 for r in rows)
    assert ws.kept_fraction(cfg) is None and analysis.heatmap_values(ws, cfg, "mean_abs")[2] is None
    ws.stats.cancel()
    assert ws.stats_progress().state == "idle"             # the cancelled job is gone
    monkeypatch.undo()
    assert ws.stats.wait(timeout=60) is not None           # a later start computes them
    rows = analysis.thresholds(ws, cfg, ws.access.tensor_name(0, "mlp.up_proj"))
    assert not rows[0]["pending"] and {r["density"] for r in rows} != {0.3}
    ws.close()


@pytest.mark.parametrize("controls", [MethodControls(preset="dppa", density=0.3, alphas=(1.6, 1.0)),
                                      MethodControls(preset="dare_ties", density=0.4, seed=3),
                                      MethodControls(preset="pcb", pcb_ratio=0.2)])
def test_app_merge_is_the_cli_merge(fam, cache, tmp_path, read_weights, controls):
    ws = open_ws(fam, cache, tmp_path)
    run = ws.merge(controls, controls=controls)
    cli = cli_merge(ws.config(controls).to_dict(), tmp_path / "cli", device="cpu")
    a, b = read_weights(run.folder), read_weights(cli.out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert run.kept_fraction == pytest.approx(cli.kept_fraction)
    assert (run.folder / "dppa_merge.yaml").is_file() and (run.folder / "config.json").is_file()
    ws.close()


def test_runs_keep_the_newest_folders_and_archive(fam, cache, tmp_path):
    ws = open_ws(fam, cache, tmp_path)
    made = [ws.merge(MethodControls(preset="task_arithmetic", lambda_=0.5 + 0.1 * i)) for i in range(runs_mod.KEEP_FOLDERS + 1)]
    assert [r.on_disk for r in made] == [False] + [True] * runs_mod.KEEP_FOLDERS
    with pytest.raises(ValueError, match="removed to save disk"):
        ws.model_dir("run 1")
    z = ws.runs.archive(made[-1])
    import zipfile
    with zipfile.ZipFile(z) as f:
        assert any(n.endswith("model.safetensors") for n in f.namelist())
    assert ws.runs.archive(made[-1], max_bytes=10) is None
    folder = ws.temp_dir
    ws.close()
    assert not folder.exists()


def test_merge_refused_when_the_working_set_does_not_fit(fam, cache, tmp_path, monkeypatch):
    from dppa_ui.workspace import MergeRefused
    ws = open_ws(fam, cache, tmp_path)
    monkeypatch.setattr(modelbuild, "free_memory", lambda: {"cpu": 1000})
    with pytest.raises(MergeRefused, match="working memory but only"):
        ws.merge(MethodControls(preset="ties"))
    assert ws.runs.last is None
    ws.close()


def test_offloaded_model_answers_as_the_plain_one(fam, tmp_path):
    from dppa_ui.chat import generate_reply
    plan = modelbuild.placement(fam.base, max_memory={"cpu": 20_000})
    assert plan.offload
    plain, tok = modelbuild.load(fam.base)
    off, _ = modelbuild.load(fam.base, max_memory={"cpu": 20_000}, offload_dir=tmp_path / "off")
    assert any(v == "disk" for v in off.hf_device_map.values())
    for prompt in ("abc", "hello world"):
        assert generate_reply(off, tok, [], prompt, temperature=0, max_new_tokens=12) == \
            generate_reply(plain, tok, [], prompt, temperature=0, max_new_tokens=12)
    with pytest.raises(MemoryError, match="offloaded to disk"):
        modelbuild.load(fam.base, max_memory={"cpu": 20_000})
    # the estimate comes from the same skeleton: every parameter and buffer of the built model
    n = sum(t.numel() for t in [*plain.parameters(), *plain.buffers()])
    assert modelbuild.model_bytes(fam.base, torch.float32) == 4 * n


def test_a_bf16_checkpoint_planned_in_float32_counts_four_bytes_a_weight(fam, tmp_path):
    """accelerate's size count takes the smaller of the planned and the stored dtype: a bf16 model
    planned in float32 was said (and placed) at half its size."""
    model, _ = modelbuild.load(fam.base, placed=False)
    n = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert modelbuild.stored_dtype(tmp_path / "bf16") == torch.bfloat16
    assert modelbuild.model_bytes(tmp_path / "bf16") == 2 * n
    assert modelbuild.model_bytes(tmp_path / "bf16", torch.float32) == 4 * n
    roomy = modelbuild.placement(tmp_path / "bf16", max_memory={"cpu": 1 << 34})
    assert roomy.dtype == torch.float32 and roomy.bytes == 4 * n
    # room for bf16 but not for float32: the model stays in its stored dtype
    tight = modelbuild.placement(tmp_path / "bf16", max_memory={"cpu": 3 * n})
    assert tight.dtype == torch.bfloat16 and tight.bytes == 2 * n and not tight.offload


def test_gpu_decorated_steps_run_locally(fam, tmp_path):
    import spaces  # noqa: F401  the decorator is a no-op off Spaces
    assert not os.environ.get("SPACES_ZERO_GPU")
    for fn in (gpu.merge, gpu.pair_statistics, gpu.score, gpu.chat):
        assert callable(fn)
    cfg = {"merge_method": "ties", "base_model": str(fam.base), "models": [{"model": str(f)} for f in fam.fts],
           "parameters": {"density": 0.5}}
    res = gpu.merge(cfg, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and res.device == "cpu"
    stats = gpu.pair_statistics(fam.base, fam.fts[:1], ["ft0"], 5.0)
    assert stats[0]["delta_norm"] > 0 and stats[0]["stats"]["tensors"]
    items = [{"prompt": "ab", "answer": "cd", "domain": "x"}]
    s = gpu.score(tmp_path / "m", items)
    assert 0 <= s["x"]["smooth"] <= 1
    reply = list(gpu.chat(tmp_path / "m", [], "abc", temperature=0, max_new_tokens=5))
    assert reply and isinstance(reply[-1], str)
    assert 15 <= gpu.duration("merge", [fam.base, *fam.fts]) <= 600


# ------------------------------------------------------------------------------ APL and SMILE (issue 9)

def _apl_setup(fam, tmp_path, monkeypatch):
    from dppa_ui import apl
    monkeypatch.setenv(apl.CACHE_ENV, str(tmp_path / "apl-cache"))
    monkeypatch.setattr(apl, "_MEMORY", {})
    data = tmp_path / "uploads" / "task.jsonl"
    data.parent.mkdir()
    data.write_text("".join(f'{{"prompt": "abc{i}", "answer": "cba{i}"}}\n' for i in range(3)))
    cfg = {"prune": "apl", "combine": "sum", "base_model": str(fam.base), "parameters": {"apl_examples": 3},
           "models": [{"model": str(f), "parameters": {"density": 0.3, "apl_data": str(data)}} for f in fam.fts[:2]]}
    return data, cfg


def test_apl_config_reads_only_registered_data_and_merges_like_the_cli(fam, cache, tmp_path, read_weights,
                                                                       monkeypatch):
    from dppa_ui import apl
    from dppa_ui.config import ConfigError, load_config
    data, raw = _apl_setup(fam, tmp_path, monkeypatch)
    ws = open_ws(fam, cache, tmp_path, start_stats=False)
    bare = ws.config({**raw, "models": [{"model": str(f), "parameters": {"density": 0.3}} for f in fam.fts[:2]]})
    with pytest.raises(ConfigError, match="APL needs a few examples of .*apl_data"):
        ws.dp_maps(bare)                                                # no task data: refused before compute
    cfg = ws.config(raw)
    with pytest.raises(ConfigError, match="'task.jsonl' was not uploaded in this session") as e:
        ws.dp_maps(cfg)
    assert str(data.parent) not in str(e.value)                        # no server path in the message
    ws.allow_data(data)
    plan = ws.apl.wait(cfg, ws.align(cfg), timeout=120)
    assert ws.apl_progress(cfg).state == "done" and ws.dp_maps(cfg) is plan.maps     # computed once, cached
    want = apl.merge_inputs(load_config(raw))
    assert all(plan.maps[i][n].density == want.maps[i][n].density for i in range(2) for n in want.maps[i])
    n = "model.layers.1.self_attn.q_proj.weight"
    assert {round(plan.maps[i][n].density, 6) for i in range(2)} != {0.3}  # importance moved the densities
    run = ws.merge(cfg)
    cli = cli_merge(raw, tmp_path / "cli", device="cpu", log=lambda s: None)
    a, b = read_weights(run.folder), read_weights(cli.out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert run.kept_fraction == pytest.approx(ws.kept_fraction(cfg)) and "APL module exact" in runs_mod.params_text(cfg)
    ws.close()


def test_smile_run_counts_its_parameters_and_loads_in_the_pool(fam, cache, tmp_path):
    from dppa_ui import smile_model
    from dppa_ui.config import ConfigError
    ws = open_ws(fam, cache, tmp_path, start_stats=False)
    with pytest.raises(ConfigError, match="rank_of_expert"):
        ws.merge(ws.smile_config(rank_of_expert=1000))
    assert not ws.runs.items and not any(ws.temp_dir.glob("run-*"))      # refused before anything was written
    cfg = ws.smile_config(rank_of_expert=4, rank_of_router=2, num_experts_per_tok=2)
    run = ws.merge(cfg)
    plain = sum(t.numel() for t in fam.base_sd.values())
    extra = sum(3 * (4 * (o + i) + 2 * i) for k, (o, i) in
                ((k, tuple(t.shape)) for k, t in fam.base_sd.items() if ".layers." in k and t.dim() == 2))
    assert run.is_smile and run.parameters["total"] == plain + extra and run.parameters["plain"] == plain
    assert ws.smile_parameters(cfg) == plain + extra
    assert runs_mod.size_text(run.parameters).endswith(f"a plain merge's {plain:,})")
    model, tok = ws.model("merged")
    assert smile_model.smile_layers(model) and model.placement.device_map == {"": "cpu"}
    ref, _ = smile_model.load(run.folder)
    ids = torch.tensor([[1, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert ws.model("merged")[0] is model                                 # loaded once into the pool
    ws.close()


def test_a_skeleton_being_built_leaves_other_threads_real_weights(fam, monkeypatch):
    """modelbuild.skeleton's meta device holds for its own thread: a model built meanwhile in
    another thread (a chat while the warm-up plans) gets real weights, not meta ones."""
    from transformers import AutoModelForCausalLM
    inside, leave = threading.Event(), threading.Event()
    real = AutoModelForCausalLM.from_config

    def slow(*a, **k):
        inside.set()
        leave.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", slow)
    t = threading.Thread(target=modelbuild.skeleton, args=(fam.base,))
    t.start()
    try:
        assert inside.wait(30)
        assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    finally:
        leave.set()
        t.join(30)
