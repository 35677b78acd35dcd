"""The heavy steps as `@spaces.GPU` functions: on a ZeroGPU Space each call gets a GPU for about
the duration estimated from the model size; anywhere else the decorator does nothing and the
function runs here (on the local GPU when there is one).

Arguments and results are plain data (folders, config dicts, items, statistics as JSON), since on
ZeroGPU the call runs in a worker process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import spaces
import torch

from . import apl, harness, io, runner, smile
from .chat import chat_stream
from .config import load_config, load_stages
from .evaluation import score_model
from .modelbuild import POOL
from .refs import resolve_model, weight_files
from .stats import collect_stats

# Seconds per GB of weights read (measured orders of magnitude on one GPU, with headroom), plus
# the worker's start; ZeroGPU refuses calls that ask for more than the quota left.
_PER_GB = {"merge": 6.0, "stats": 3.0, "score": 4.0, "chat": 2.0,
           "smile": 30.0,         # an SVD of every projection's delta per fine-tune
           "apl": 40.0}           # one forward pass (of a few examples) per partition, per level
_FLOOR, _CAP = 15, 600


def weights_bytes(refs: Sequence[str | Path]) -> int:
    total = 0
    for r in refs:
        try:
            total += sum(f.stat().st_size for f in weight_files(resolve_model(r)))
        except (OSError, ValueError):
            pass
    return total


def duration(kind: str, refs: Sequence[str | Path], extra: float = 0.0) -> int:
    """The GPU seconds to ask for: weights read x the step's rate, within [15, 600]."""
    return int(min(_CAP, max(_FLOOR, weights_bytes(refs) / 1e9 * _PER_GB[kind] + extra)))


def _merge_duration(config) -> int:
    cfg = load_config(config)
    return duration("smile" if cfg.upscale == "smile" else "merge", cfg.parents)


def _stages_duration(config) -> int:
    """Every stage reads its inputs once; an earlier stage's output is about the size of one input."""
    stages = load_stages(config)
    produced = {s.name for s in stages if s.name is not None}
    refs = [r for s in stages for r in s.config.parents if r.partition("+")[0] not in produced]
    per_stage = [r for r in stages[0].config.parents if r.partition("+")[0] not in produced][:1]
    return duration("merge", refs + per_stage * (len(stages) - 1))


@spaces.GPU(duration=lambda config, out, **kw: _merge_duration(config))
def merge(config, out: str | Path, **kwargs):
    """runner.merge on the best device: the streaming merge of `config` into the folder `out`
    (for `merge_method: smile`, the SMILE folder)."""
    return runner.merge(config, out, device="auto", **kwargs)


@spaces.GPU(duration=lambda config, out, **kw: _stages_duration(config))
def merge_stages(config, out: str | Path, **kwargs):
    """runner.merge_stages on the best device: a multi-stage config, the final stage into `out`."""
    return runner.merge_stages(config, out, device="auto", **kwargs)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@spaces.GPU(duration=lambda base_dir, ft_dir, data, *a, **kw: duration("apl", [ft_dir]))
def apl_importance(base_dir: str | Path, ft_dir: str | Path, data, level: str, kind: str, gradient_at: str):
    """apl.importance of one fine-tune (cached in memory and on disk by the apl module)."""
    return apl.importance(base_dir, ft_dir, data, level, kind, gradient_at, device=_device())


@spaces.GPU(duration=lambda base_dir, ft_dir, **kw: duration("apl", [ft_dir], extra=10))
def apl_table(base_dir: str | Path, ft_dir: str | Path, **kwargs) -> dict:
    """apl.importance_table of one fine-tune: the block x module map, exact and gradient."""
    return apl.importance_table(base_dir, ft_dir, device=_device(), **kwargs)


@spaces.GPU(duration=lambda base_dir, ft_dirs, *a, **kw: duration("stats", [base_dir, *ft_dirs]))
def pair_statistics(base_dir: str | Path, ft_dirs: Sequence[str | Path], refs: Sequence[str], outlier_m: float,
                    progress: Callable[[int], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> list[dict]:
    """Whole-model statistics of the base against each fine-tune: per fine-tune
    {"stats": DeltaStats JSON, "delta_norm": ‖δ‖ / ‖θ_base‖}. Both passes of stats.collect_stats
    (what DP needs), on the GPU when there is one."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = io.CheckpointReader(base_dir)
    fts = [io.CheckpointReader(d) for d in ft_dirs]
    try:
        names = [n for n in base.names if base.dtype(n).is_floating_point]
        sq = [[0.0, 0.0] for _ in fts]           # ||ft - base||², ||base||², on the first pass only
        seen: set[str] = set()

        def load(name):
            if cancel is not None and cancel():
                raise InterruptedError("statistics cancelled")
            b = base.view(name).to(dev).float()
            ts = [r.view(name).to(dev).float() for r in fts]
            if name not in seen:
                seen.add(name)
                b2 = float(torch.linalg.vector_norm(b)) ** 2
                for acc, t in zip(sq, ts):
                    acc[0] += float(torch.linalg.vector_norm(t - b)) ** 2
                    acc[1] += b2
            return b, ts

        stats = collect_stats(names, load, list(refs), outlier_m, progress=progress)
    finally:
        base.close()
        for r in fts:
            r.close()
    return [{"stats": s.to_json(), "delta_norm": (num / den) ** 0.5 if den > 0 else 0.0}
            for s, (num, den) in zip(stats, sq)]


@spaces.GPU(duration=lambda model_dir, items, **kw: duration("score", [model_dir], extra=0.05 * len(items)))
def score(model_dir: str | Path, items: Sequence[dict], **load_kwargs) -> dict:
    """evaluation.score_model of the model in `model_dir` (loaded once into the shared pool)."""
    model, tok = POOL.get(model_dir, **load_kwargs)
    return score_model(model, tok, list(items))


@spaces.GPU(duration=lambda model_dir, task, *a, **kw: duration("score", [model_dir], extra=60))
def lm_eval_task(model_dir: str | Path, task: str, include_path: str | Path | None, limit: int | None,
                 num_fewshot: int | None, **load_kwargs) -> dict:
    """One lm-eval task (a leaf: no group or tag) on the model in `model_dir` (loaded once into the
    shared pool), as `score --lm-eval` evaluates it: {"metrics": {metric: value}, "metric": the
    task's first metric, "documents": how many it scored}."""
    model, tok = POOL.get(model_dir, **load_kwargs)
    tasks = harness.loaded_task(task, include_path, num_fewshot)
    results = harness.score(harness.wrap(model, tok), tasks, limit=limit, num_fewshot=num_fewshot)
    return {"metrics": harness.metrics(results)[task], "metric": harness.first_metric(tasks.leaves[task]),
            "documents": int(results.get("n-samples", {}).get(task, {}).get("effective", 0))}


@spaces.GPU(duration=lambda model_dir, *a, **kw: duration("chat", [model_dir], extra=30))
def chat(model_dir: str | Path, history, message: str, *, load_kwargs: dict | None = None,
         **chat_kwargs) -> Iterator[str]:
    """chat.chat_stream with the model in `model_dir`: the reply as it grows."""
    model, tok = POOL.get(model_dir, **(load_kwargs or {}))
    yield from chat_stream(model, tok, history, message, **chat_kwargs)


@spaces.GPU(duration=lambda model_dir, *a, **kw: duration("chat", [model_dir]))
def reply_routing(model_dir: str | Path, history, message: str, reply: str, system_prompt: str | None = None,
                  load_kwargs: dict | None = None) -> list[dict]:
    """smile.reply_routing of a SMILE model: per token of the reply, the expert that produced it."""
    model, tok = POOL.get(model_dir, **(load_kwargs or {}))
    return smile.reply_routing(model, tok, history, message, reply, system_prompt)


@spaces.GPU(duration=lambda model_dir, items, **kw: duration("score", [model_dir], extra=0.05 * len(items)))
def routing_accuracy(model_dir: str | Path, items: Sequence[dict], **load_kwargs) -> dict:
    """smile.routing_accuracy of a SMILE model over all tokens and over the answer positions:
    {domain: {"all": {...}, "answer": {...}}}."""
    model, tok = POOL.get(model_dir, **load_kwargs)
    every = smile.routing_accuracy(model, tok, list(items), positions="all")
    answer = smile.routing_accuracy(model, tok, list(items), positions="answer")
    return {d: {"all": every[d], "answer": answer[d]} for d in every}
