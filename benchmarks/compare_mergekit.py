"""Cross-check: the same merge YAML through mergekit 0.1.5 and through dppa_ui, tensor for tensor.

    python benchmarks/compare_mergekit.py                    # every case, float32, 4 layers, hidden 64
    python benchmarks/compare_mergekit.py --cases slerp_gradient,lora
    python benchmarks/compare_mergekit.py --dtype bfloat16

Every mergekit method, plus gradient / filter / slices / passthrough / LoRA / tokenizer-union
configs, runs through `mergekit-yaml` and through `python -m dppa_ui merge`, and the outputs are
compared:
  - deterministic methods: max |diff| over every tensor; in float32 both tools do float32
    arithmetic, so the difference should be rounding only (PASS below 1e-6);
  - random methods (dare_*, della*): the masks come from different generators, so they are
    compared by what they must share: the share of delta entries kept, the L1 norm of the
    rescaled delta relative to the original (single-model cases: 1 for `rescale: true`), and for
    della how the kept share rises with |delta| (bottom vs top fifth).
Vocabulary tensors of the tokenizer-union case are compared row by row through each output's own
tokenizer (added tokens may get different ids in the two tools). The vocab_trim cases merge models
whose vocabularies differ in size (mergekit `--unsafe-truncate-embeddings`, dppa_ui
`--allow-vocab-trim`), the base the smallest, the largest or in between. The chat_* cases set a
named `chat_template` and, besides the tensors, render both outputs' tokenizers on the
conversations of tests/data/mergekit_chat_templates.json (generation prompt off and on); the
strings must be equal, and equal to the ones that file holds.

Needs mergekit: mk-venv/bin/mergekit-yaml (see merge_speed.py) or --mergekit PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dppa_ui.io import read_state_dict  # noqa: E402
from _models import LlamaShape, build_models  # noqa: E402
from merge_speed import CHILD_ENV, find_mergekit  # noqa: E402

M3 = "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.3}}\n" \
     "  - model: {ft2}\n    parameters: {{weight: 0.6, density: 0.5}}\n" \
     "  - model: {ft3}\n    parameters: {{weight: 0.8, density: 0.4}}\n"
W3 = "  - model: {ft1}\n    parameters: {{weight: 1.0}}\n" \
     "  - model: {ft2}\n    parameters: {{weight: 0.5}}\n" \
     "  - model: {ft3}\n    parameters: {{weight: -0.3}}\n"
HEAD = "base_model: {base}\ndtype: {dtype}\n"

# name -> (kind, yaml). kind: "exact" (max |diff|), "random1" (one model: kept share + L1),
# "random" (several models: kept share + mean |delta|), "vocab" (rows compared by token).
CASES: dict[str, tuple[str, str]] = {
    "task_arithmetic": ("exact", "merge_method: task_arithmetic\n" + HEAD + "models:\n" + W3),
    "task_arithmetic_norm": ("exact", "merge_method: task_arithmetic\n" + HEAD + "models:\n" + W3
                             + "parameters: {{normalize: true, lambda: 0.7}}\n"),
    "ties": ("exact", "merge_method: ties\n" + HEAD + "models:\n" + M3),
    "ties_rescale": ("exact", "merge_method: ties\n" + HEAD + "models:\n" + M3
                     + "parameters: {{normalize: false, rescale: true, lambda: 0.9}}\n"),
    "breadcrumbs": ("exact", "merge_method: breadcrumbs\n" + HEAD + "models:\n" + M3
                    + "parameters: {{gamma: 0.05}}\n"),
    "breadcrumbs_ties": ("exact", "merge_method: breadcrumbs_ties\n" + HEAD + "models:\n" + M3
                         + "parameters: {{gamma: 0.02, normalize: true}}\n"),
    "sce": ("exact", "merge_method: sce\n" + HEAD + "models:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n"
            "parameters: {{select_topk: 0.5}}\n"),
    "ram": ("exact", "merge_method: ram\n" + HEAD + "models:\n  - model: {ft1}\n  - model: {ft2}\n"
            "parameters: {{epsilon: 0.001}}\n"),
    "ramplus_tl": ("exact", "merge_method: ramplus_tl\n" + HEAD + "models:\n  - model: {ft1}\n  - model: {ft2}\n"
                   "  - model: {ft3}\nparameters: {{epsilon: 0.001, r: 0.5, alpha: 0.5}}\n"),
    "linear": ("exact", "merge_method: linear\ndtype: {dtype}\nmodels:\n" + W3.replace("-0.3", "0.3")),
    "slerp": ("exact", "merge_method: slerp\n" + HEAD + "models:\n  - model: {base}\n  - model: {ft1}\n"
              "parameters: {{t: 0.3}}\n"),
    "slerp_gradient_filter": ("exact", "merge_method: slerp\n" + HEAD + "models:\n  - model: {ft1}\n"
                              "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                              "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"),
    "nuslerp": ("exact", "merge_method: nuslerp\n" + HEAD + "models:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n"
                "  - model: {ft2}\n    parameters: {{weight: 3.0}}\n"),
    "nuslerp_rows": ("exact", "merge_method: nuslerp\ndtype: {dtype}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 2.0}}\n"
                     "  - model: {ft2}\n    parameters: {{weight: 1.0}}\n"
                     "parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n"),
    "multislerp": ("exact", "merge_method: multislerp\n" + HEAD + "models:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n"
                   "  - model: {ft2}\n    parameters: {{weight: 0.5}}\n  - model: {ft3}\n    parameters: {{weight: 0.8}}\n"),
    "karcher": ("exact", "merge_method: karcher\ndtype: {dtype}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n"
                "parameters: {{max_iter: 20, tol: 1.0e-7}}\n"),
    "model_stock": ("exact", "merge_method: model_stock\n" + HEAD + "models:\n  - model: {ft1}\n  - model: {ft2}\n"
                    "  - model: {ft3}\n"),
    "model_stock_filter_wise": ("exact", "merge_method: model_stock\n" + HEAD + "models:\n  - model: {ft1}\n"
                                "  - model: {ft2}\nparameters: {{filter_wise: true}}\n"),
    "nearswap": ("exact", "merge_method: nearswap\n" + HEAD + "models:\n  - model: {ft1}\nparameters: {{t: 0.0005}}\n"),
    "arcee_fusion": ("exact", "merge_method: arcee_fusion\n" + HEAD + "models:\n  - model: {ft1}\n"),
    "gradient_ties": ("exact", "merge_method: ties\n" + HEAD + "models:\n"
                      "  - model: {ft1}\n    parameters:\n      density: [0.2, 0.8]\n      weight:\n"
                      "        - filter: mlp\n          value: [1.0, 0.2]\n        - value: 0.7\n"
                      "  - model: {ft2}\n    parameters: {{density: 0.5, weight: 0.5}}\n"
                      "parameters:\n  lambda: [{{filter: self_attn, value: [1.0, 0.5]}}, {{value: 1.0}}]\n"),
    "passthrough_slices": ("exact", "merge_method: passthrough\ndtype: {dtype}\nslices:\n"
                           "  - sources: [{{model: {ft1}, layer_range: [0, 3]}}]\n"
                           "  - sources: [{{model: {ft2}, layer_range: [1, 4], parameters: {{scale: 0.5}}}}]\n"),
    "ties_slices": ("exact", "merge_method: ties\n" + HEAD + "slices:\n"
                    "  - sources:\n      - {{model: {base}, layer_range: [0, 2]}}\n"
                    "      - {{model: {ft1}, layer_range: [0, 2], parameters: {{density: 0.3}}}}\n"
                    "      - {{model: {ft2}, layer_range: [2, 4], parameters: {{density: 0.5}}}}\n"
                    "  - sources:\n      - {{model: {base}, layer_range: [2, 4]}}\n"
                    "      - {{model: {ft1}, layer_range: [2, 4], parameters: {{density: [0.2, 0.6]}}}}\n"
                    "      - {{model: {ft2}, layer_range: [0, 2], parameters: {{density: 0.4}}}}\n"
                    "    parameters: {{weight: 0.5}}\nparameters: {{weight: 1.0}}\n"),
    "lora": ("exact", "merge_method: task_arithmetic\n" + HEAD + "models:\n  - model: {base}+{lora}\n"
             "    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n"),
    "tokenizer_union": ("vocab", "merge_method: task_arithmetic\nbase_model: {tok_base}\ndtype: {dtype}\n"
                        "models:\n  - model: {tok_ft}\n    parameters: {{weight: 0.7}}\n"
                        "tokenizer: {{source: union}}\n"),
    "vocab_trim_base_smallest": ("exact", "merge_method: ties\nbase_model: {base}\ndtype: {dtype}\nmodels:\n"
                                 "  - model: {ft1_v260}\n    parameters: {{weight: 1.0, density: 0.3}}\n"),
    "vocab_trim_base_largest": ("exact", "merge_method: ties\nbase_model: {base_v260}\ndtype: {dtype}\nmodels:\n"
                                "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.3}}\n"),
    "vocab_trim_three": ("exact", "merge_method: ties\nbase_model: {base_v258}\ndtype: {dtype}\nmodels:\n"
                         "  - model: {ft1_v260}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                         "  - model: {ft2}\n    parameters: {{weight: 0.6, density: 0.5}}\n"),
    **{f"chat_{name}": ("chat", "merge_method: task_arithmetic\nbase_model: {chat_base}\ndtype: {dtype}\n"
                        "models:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                        f"chat_template: {name}\n") for name in ("chatml", "llama3", "alpaca", "mistral", "exaone")},
    "dare_linear_1": ("random1", "merge_method: dare_linear\n" + HEAD + "models:\n"
                      "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.3}}\n"),
    "della_linear_1": ("random1", "merge_method: della_linear\n" + HEAD + "models:\n"
                       "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.4, epsilon: 0.2}}\n"),
    "dare_ties": ("random", "merge_method: dare_ties\n" + HEAD + "models:\n" + M3),
    "della": ("random", "merge_method: della\n" + HEAD + "models:\n" + M3 + "parameters: {{epsilon: 0.1}}\n"),
    "dare_linear": ("random", "merge_method: dare_linear\n" + HEAD + "models:\n" + M3),
    "della_linear": ("random", "merge_method: della_linear\n" + HEAD + "models:\n" + M3 + "parameters: {{epsilon: 0.1}}\n"),
}

# extra command-line flags per case: (mergekit's, dppa_ui's)
FLAGS = {c: (["--unsafe-truncate-embeddings"], ["--allow-vocab-trim"]) for c in CASES if c.startswith("vocab_trim")}
CHAT = json.loads((REPO / "tests" / "data" / "mergekit_chat_templates.json").read_text())


def run(cmd: list[str]) -> str | None:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if p.returncode != 0:
        return (p.stdout + p.stderr).strip()[-2000:]
    return None


def make_lora(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)).save_pretrained(str(out))
    return out


def with_tokenizer(src: Path, out: Path, vocab: int, seed: int, extra: int) -> Path:
    """A copy of a model with a WordLevel tokenizer over its `vocab` rows: `extra` tokens of
    its own, the rest shared, in a seed-dependent order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    shutil.copytree(src, out)
    words = [f"t{i}" for i in range(1, vocab - extra)] + [f"own{seed}_{i}" for i in range(extra)]
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = {"<unk>": 0, **{words[j]: i + 1 for i, j in enumerate(order)}}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(out))
    return out


def with_rows(src: Path, out: Path, rows: int, seed: int) -> Path:
    """A copy of a model whose embedding and lm_head have `rows` rows: the first rows of the
    original, then random rows (a vocabulary of another size over the same first tokens)."""
    shutil.copytree(src, out)
    from safetensors.torch import save_file
    sd = read_state_dict(src)
    g = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = sd[name]
        extra = (torch.randn((max(rows - t.shape[0], 0), t.shape[1]), generator=g) * t.float().std()).to(t.dtype)
        sd[name] = torch.cat([t[:rows], extra]).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}, indent=2))
    return out


def with_chat_tokenizer(src: Path, out: Path, vocab: int) -> Path:
    """A copy of a model with a WordLevel tokenizer that has <bos> / <eos> tokens (the named chat
    templates use them) and no chat template of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    shutil.copytree(src, out)
    ids = {w: i for i, w in enumerate(["<unk>", "<bos>", "<eos>"] + [f"t{i}" for i in range(3, vocab)])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(str(out))
    return out


def compare_chat(mk_dir: Path, our_dir: Path, name: str) -> tuple[int, int, int]:
    """Render both outputs' chat templates on the shared conversations (generation prompt off and
    on): (renderings compared, equal between the tools, equal to the expected strings)."""
    from transformers import AutoTokenizer
    tm, to = AutoTokenizer.from_pretrained(str(mk_dir)), AutoTokenizer.from_pretrained(str(our_dir))
    n = same = expected = 0
    for conv, messages in CHAT["conversations"].items():
        for gen, want in zip((False, True), CHAT["rendered"][name][conv]):
            a = tm.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            b = to.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            n, same, expected = n + 1, same + (a == b), expected + (a == want)
    return n, same, expected


def compare_exact(mk: dict, ours: dict, base: dict, verbose: bool) -> tuple[float, str, int, int, float]:
    worst, worst_name, n_diff, n_all, n_moved = 0.0, "", 0, 0, 0
    for name in sorted(mk):
        a, b = mk[name].float(), ours[name].float()
        d = (a - b).abs()
        m = d.max().item() if d.numel() else 0.0
        n_diff += int((d > 0).sum())
        n_all += d.numel()
        if name in base and base[name].shape == b.shape:
            n_moved += int((b != base[name].float()).sum())
        if verbose:
            print(f"    {name:45s} max|diff| {m:.3g}  (max|x| {a.abs().max().item():.3g})")
        if m >= worst:
            worst, worst_name = m, name
    return worst, worst_name, n_diff, n_all, n_moved / max(n_all, 1)


def delta_stats(out: dict, base: dict, ft: dict | None) -> dict:
    """Kept share (entries moved off the base), mean |moved delta|, L1 vs the fine-tune's delta,
    kept share in the bottom and top fifth of |delta| (single-model cases)."""
    moved = total = 0
    l1_out = l1_ft = 0.0
    abs_sum = 0.0
    lo_k = lo_n = hi_k = hi_n = 0
    for name, o in out.items():
        if not o.is_floating_point():
            continue
        d = o.float() - base[name].float()
        keep = d != 0
        moved += int(keep.sum())
        total += d.numel()
        abs_sum += float(d.abs().sum())
        if ft is not None:
            full = ft[name].float() - base[name].float()
            l1_out += float(d.abs().sum())
            l1_ft += float(full.abs().sum())
            if full.numel() >= 50:
                q = full.abs().reshape(-1).quantile(torch.tensor([0.2, 0.8]))
                lo, hi = full.abs().reshape(-1) <= q[0], full.abs().reshape(-1) >= q[1]
                k = keep.reshape(-1)
                lo_k, lo_n, hi_k, hi_n = lo_k + int(k[lo].sum()), lo_n + int(lo.sum()), hi_k + int(k[hi].sum()), hi_n + int(hi.sum())
    s = {"kept": moved / max(total, 1), "mean_abs": abs_sum / max(moved, 1)}
    if ft is not None:
        s.update(l1=l1_out / max(l1_ft, 1e-30), kept_low=lo_k / max(lo_n, 1), kept_high=hi_k / max(hi_n, 1))
    return s


def compare_vocab(mk_dir: Path, our_dir: Path, mk: dict, ours: dict) -> tuple[float, int]:
    """Max |diff| with vocabulary rows matched by token text; returns (max diff, tokens compared)."""
    from transformers import AutoTokenizer
    vm = AutoTokenizer.from_pretrained(str(mk_dir)).get_vocab()
    vo = AutoTokenizer.from_pretrained(str(our_dir)).get_vocab()
    if set(vm) != set(vo):
        raise AssertionError(f"vocabularies differ: {len(set(vm) ^ set(vo))} tokens in one only")
    worst = 0.0
    tokens = sorted(vm)
    im = torch.tensor([vm[t] for t in tokens])
    io_ = torch.tensor([vo[t] for t in tokens])
    for name in mk:
        a, b = mk[name].float(), ours[name].float()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            a, b = a[im], b[io_]
        worst = max(worst, (a - b).abs().max().item())
    return worst, len(tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mergekit", default=None)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--verbose", action="store_true", help="print every tensor")
    ap.add_argument("--json", default=None, help="save the results here")
    args = ap.parse_args(argv)

    mergekit = find_mergekit(args.mergekit)
    if not mergekit:
        print("mergekit not found: install it into mk-venv (see merge_speed.py)")
        return 2
    shape = LlamaShape(vocab=256, hidden=64, intermediate=192, layers=4, head_dim=16)
    work = Path(tempfile.mkdtemp(prefix="compare-mergekit-"))
    base, fts = build_models(shape, 3, args.dtype, work / "models", seed=1)
    paths = {"base": base, "dtype": args.dtype, **{f"ft{i + 1}": p for i, p in enumerate(fts)}}
    cases = [c for c in args.cases.split(",") if c]
    if "lora" in cases:
        paths["lora"] = make_lora(base, work / "lora")
    if any(c.startswith("vocab_trim") for c in cases):
        paths["ft1_v260"] = with_rows(fts[0], work / "ft1-v260", shape.vocab + 4, 1)
        paths["base_v260"] = with_rows(base, work / "base-v260", shape.vocab + 4, 2)
        paths["base_v258"] = with_rows(base, work / "base-v258", shape.vocab + 2, 3)
    if any(c.startswith("chat_") for c in cases):
        paths["chat_base"] = with_chat_tokenizer(base, work / "chat-base", shape.vocab)
    if "tokenizer_union" in cases:
        paths["tok_base"] = with_tokenizer(base, work / "tok-base", shape.vocab, 1, 0)
        paths["tok_ft"] = with_tokenizer(fts[0], work / "tok-ft", shape.vocab, 2, 8)
    tol = 1e-6 if args.dtype == "float32" else None
    failed, results = False, []
    try:
        base_t = read_state_dict(base)
        for case in cases:
            kind, template = CASES[case]
            cfg = work / f"{case}.yaml"
            cfg.write_text(template.format(**paths))
            mk_out, our_out = work / f"mk-{case}", work / f"ours-{case}"
            mk_flags, our_flags = FLAGS.get(case, ([], []))
            err = run([*mergekit, str(cfg), str(mk_out), "--lora-merge-cache", str(work / "mk-lora"),
                       "--random-seed", "0", *mk_flags])
            if err:
                print(f"{case}: mergekit failed:\n{err}")
                failed = True
                continue
            err = run([args.python, "-m", "dppa_ui", "merge", str(cfg), "--out", str(our_out), "--quiet",
                       "--lora-merge-cache", str(work / "our-lora"), *our_flags])
            if err:
                print(f"{case}: dppa_ui failed:\n{err}")
                failed = True
                continue
            mk, ours = read_state_dict(mk_out), read_state_dict(our_out)
            if set(mk) != set(ours) or any(mk[k].shape != ours[k].shape for k in mk if k in ours and kind != "vocab"):
                print(f"{case}: tensors differ: only mergekit {sorted(set(mk) - set(ours))[:3]}, only ours "
                      f"{sorted(set(ours) - set(mk))[:3]}")
                failed = True
                continue
            row = {"case": case, "kind": kind}
            if kind in ("exact", "chat"):
                worst, where, n_diff, n_all, moved = compare_exact(mk, ours, base_t, args.verbose)
                ok = tol is None or worst <= tol
                row.update(max_diff=worst, at=where, entries_differ=n_diff, entries=n_all, moved=moved, ok=ok)
                chat = ""
                if kind == "chat":
                    n, same, expected = compare_chat(mk_out, our_out, case.removeprefix("chat_"))
                    ok &= same == n and expected == n
                    row.update(renderings=n, renderings_equal=same, renderings_as_expected=expected, ok=ok)
                    chat = f"; chat template: {same}/{n} renderings equal, {expected}/{n} as the test file expects"
                print(f"{case:24s} {args.dtype}: {len(mk)} tensors, max|diff| {worst:.3g} at {where}; "
                      f"{n_diff}/{n_all} entries differ; {100 * moved:.1f}% of entries moved off the base{chat}  "
                      f"{'PASS' if ok else f'FAIL (> {tol:g})' if tol is not None and worst > tol else 'FAIL'}")
            elif kind == "vocab":
                worst, n_tok = compare_vocab(mk_out, our_out, mk, ours)
                ok = tol is None or worst <= tol
                row.update(max_diff=worst, tokens=n_tok, ok=ok)
                print(f"{case:24s} {args.dtype}: {n_tok} tokens in both vocabularies, rows matched by token: "
                      f"max|diff| {worst:.3g}  {'PASS' if ok else 'FAIL'}")
            else:
                single = kind == "random1"
                ft = read_state_dict(fts[0]) if single else None
                a, b = delta_stats(mk, base_t, ft), delta_stats(ours, base_t, ft)
                ok = abs(a["kept"] - b["kept"]) < 0.01 and abs(a["mean_abs"] / b["mean_abs"] - 1) < 0.05
                if single:
                    ok &= abs(a["l1"] - b["l1"]) < 1e-3 and abs(a["kept_high"] - b["kept_high"]) < 0.03 \
                        and abs(a["kept_low"] - b["kept_low"]) < 0.03
                row.update(mergekit=a, ours=b, ok=ok)
                fmt = lambda s: (f"kept {s['kept']:.4f}, mean|d| {s['mean_abs']:.4g}"  # noqa: E731
                                 + (f", L1/L1(delta) {s['l1']:.5f}, kept in bottom/top fifth of |delta| "
                                    f"{s['kept_low']:.3f}/{s['kept_high']:.3f}" if single else ""))
                print(f"{case:24s} {args.dtype}: mergekit {fmt(a)}\n{'':24s} {'':{len(args.dtype)}}  dppa_ui  {fmt(b)}  "
                      f"{'PASS' if ok else 'FAIL'}")
            failed |= not row["ok"]
            results.append(row)
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(our_out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(r['ok'] for r in results)}/{len(cases)} cases agree")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
