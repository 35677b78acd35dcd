"""Scoring: how much of each skill a model (or a merge) keeps.

Per domain of a suite of {"prompt", "answer", "domain"} items:
  em       exact match of the greedy answer (batched, left-padded, stops at <eos>)
  smooth   teacher-forced answer token accuracy: the share of answer tokens (and the closing
           <eos>) the model predicts correctly given the true prefix. Degrades gracefully where EM
           falls off a cliff, so it is what the alpha search maximises.
  loglik   mean log-likelihood per answer token (raw, nats)
Derived:
  relative_gain(s, s_base, s_ft) = (s - s_base) / (s_ft - s_base): share of the fine-tune's gain kept
  geometric_objective(scores, ft_scores) = geometric mean over domains of s / s_ft (smooth score):
           DPPA's alpha-search objective.

Prompts are rendered with the tokenizer's chat template when it has one (the demo family's
`<bos><|user|>{q}<|assistant|>`), else fed raw. No gradio, no disk writes.
"""
from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .io import untied_missing
from .modelbuild import input_device, load
from .refs import resolve_model

SPLITS = ("test", "dev")


# ----------------------------------------------------------------------------------------- suites

# Named suites (folders of data/<domain>/<split>.jsonl), their domain order, and model-domain
# look-ups, registered by whoever ships them (the demo family registers "zoo"), so the scorer
# itself knows no model family.
_SUITES: dict[str, Path] = {}
_DOMAIN_ORDERS: list[Callable[[Path], list[str] | None]] = []
_DOMAIN_LOOKUPS: list[Callable[[Path], str | None]] = []


def register_suite(name: str, folder: Path) -> None:
    _SUITES[name] = Path(folder)


def register_domain_order(order: Callable[[Path], list[str] | None]) -> None:
    """`order(folder)`: the domains of a suite folder in display order, None if it does not know."""
    _DOMAIN_ORDERS.append(order)


def register_domain_lookup(lookup: Callable[[Path], str | None]) -> None:
    _DOMAIN_LOOKUPS.append(lookup)


def model_domain(path: str | Path) -> str | None:
    """The domain a model was fine-tuned on, when a registered look-up knows it (demo models do)."""
    for lookup in _DOMAIN_LOOKUPS:
        d = lookup(Path(path))
        if d:
            return d
    return None


def _read_jsonl(path: Path, default_domain: str | None = None, label: str | None = None) -> list[dict]:
    """Validated items of one JSONL file; a bad line is a ValueError naming the file (as `label`,
    default its path), the line and the problem."""
    label = label or str(path)
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{label}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                 f'each line must be an object like {{"prompt": "...", "answer": "...", '
                                 f'"domain": "..."}}') from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"answer\", "
                                 f"got {type(obj).__name__}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r} (keys present: {sorted(obj)})")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' is empty")
            domain = obj.get("domain", default_domain)
            if not isinstance(domain, str) or not domain:
                raise ValueError(f"{where}: 'domain' must be a non-empty string, got {domain!r}")
            items.append({"prompt": obj["prompt"], "answer": obj["answer"], "domain": domain})
    if not items:
        raise ValueError(f"{label}: no items (expected JSONL lines with \"prompt\" and \"answer\")")
    return items


def suite_domains(root: Path) -> list[str]:
    """Domains of a suite folder: in a registered order, else its data/ folders sorted."""
    for order in _DOMAIN_ORDERS:
        domains = order(Path(root))
        if domains:
            return list(domains)
    return sorted(p.name for p in (root / "data").iterdir() if p.is_dir())


def load_suite(suite: str | Path = "zoo", split: str = "test", domains: Sequence[str] | None = None,
               label: str | None = None) -> list[dict]:
    """Items to score. `suite`: a registered suite's name ("zoo": the demo family's splits), a suite
    folder, or a JSONL file of {"prompt", "answer", "domain"} lines (domain defaults to the file's
    stem). `split` picks the folder's split ("test" for every reported number, "dev" for
    searches); `domains` filters. `label` names a JSONL file in error messages (default: its path)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if str(suite) in _SUITES:
        suite = _SUITES[str(suite)]
    path = Path(suite)
    if path.is_dir():
        if not (path / "data").is_dir():
            raise ValueError(f"{path} has no data/ folder: not a demo zoo (pass a JSONL file instead)")
        items = []
        for d in suite_domains(path):
            if domains is None or d in domains:
                items += _read_jsonl(path / "data" / d / f"{split}.jsonl", d)
    elif path.is_file():
        items = _read_jsonl(path, path.stem, label)
        if domains is not None:
            items = [it for it in items if it["domain"] in domains]
    else:
        raise ValueError(f"suite {str(suite)!r} not found: use 'zoo' or a .jsonl file of "
                         f'{{"prompt", "answer", "domain"}} lines')
    if domains is not None:
        missing = set(domains) - {it["domain"] for it in items}
        if missing:
            raise ValueError(f"suite has no items for domain(s) {sorted(missing)}")
    return items


def by_domain(items: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for it in items:
        out.setdefault(it["domain"], []).append(it)
    return out


# ----------------------------------------------------------------------------------- tokenization

_ENC_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def encode_item(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids). With a chat template the prompt ids are the rendered user turn plus
    the generation prompt, and the answer ids are what the template adds for the assistant turn
    (for the demo family: the answer and <eos>). Without one: raw prompt, answer + eos. Cached."""
    try:
        cache = _ENC_CACHE.setdefault(tokenizer, {})
    except TypeError:
        cache = {}
    key = (prompt, answer)
    if key in cache:
        return cache[key]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        p = tokenizer(head, add_special_tokens=False)["input_ids"]
        if full.startswith(head):
            a = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        else:        # templates that re-render earlier turns differently: fall back to the plain answer
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            a = a + ([_eos_id(tokenizer)] if _eos_id(tokenizer) is not None else [])
    else:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        a = a + ([_eos_id(tokenizer)] if _eos_id(tokenizer) is not None else [])
    if not a:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    cache[key] = (list(p), list(a))
    return cache[key]


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def _device(model) -> torch.device:
    return input_device(model)


# ---------------------------------------------------------------------------------------- scoring

@torch.inference_mode()
def teacher_forced(model, tokenizer, items: Sequence[dict], batch_size: int = 256) -> tuple[list[float], list[float]]:
    """Per item: (answer token accuracy, mean answer-token log-likelihood), one forward per batch.

    Right padding: with causal attention no real token attends to the pads after it."""
    acc, ll = [], []
    for i in range(0, len(items), batch_size):
        logits, targets, tm = answer_logits(model, tokenizer, items[i:i + batch_size])
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        hit = (logits.argmax(-1) == targets) & tm
        counts = tm.sum(1).clamp(min=1)
        acc += (hit.sum(1) / counts).tolist()
        ll += ((logp * tm).sum(1) / counts).tolist()
    return acc, ll


def answer_logits(model, tokenizer, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced forward over prompt + answer of each item (right-padded): (float32 logits
    (B, T-1, V), next-token targets (B, T-1), mask of the positions whose next token is an answer
    token). Differentiable: under inference_mode only where the caller asks for it."""
    pad, dev = pad_id(tokenizer), _device(model)
    enc = [encode_item(tokenizer, it["prompt"], it["answer"]) for it in items]
    n = max(len(p) + len(a) for p, a in enc)
    ids = torch.full((len(enc), n), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    tgt_mask = torch.zeros((len(enc), n), dtype=torch.bool)   # positions whose NEXT token is an answer token
    for j, (p, a) in enumerate(enc):
        seq = p + a
        ids[j, :len(seq)] = torch.tensor(seq)
        mask[j, :len(seq)] = 1
        tgt_mask[j, len(p) - 1:len(seq) - 1] = True
    ids, mask, tgt_mask = ids.to(dev), mask.to(dev), tgt_mask.to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return logits, ids[:, 1:], tgt_mask[:, :-1]


def answer_loss(model, tokenizer, items: Sequence[dict]) -> torch.Tensor:
    """Mean over items of the mean answer-token cross-entropy (= −mean `loglik`), as a scalar tensor
    that can be differentiated (APL's task loss)."""
    logits, targets, tm = answer_logits(model, tokenizer, items)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((nll * tm).sum(1) / tm.sum(1).clamp(min=1)).mean()


@torch.inference_mode()
def greedy_answers(model, tokenizer, items: Sequence[dict], batch_size: int = 256) -> list[str]:
    """Greedy answers, batched with left padding; max_new_tokens = longest answer (tokens) + 1."""
    pad, dev, eos = pad_id(tokenizer), _device(model), _eos_id(tokenizer)
    out = []
    for i in range(0, len(items), batch_size):
        enc = [encode_item(tokenizer, it["prompt"], it["answer"]) for it in items[i:i + batch_size]]
        n = max(len(p) for p, _ in enc)
        ids = torch.full((len(enc), n), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for j, (p, _) in enumerate(enc):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        new = max(len(a) for _, a in enc) + 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                             top_p=None, top_k=None, temperature=None)[:, n:].tolist()
        for row in gen:
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def score_model(model, tokenizer, items: Sequence[dict], batch_size: int = 256,
                generate: bool = True) -> dict[str, dict]:
    """{domain: {"em", "smooth", "loglik", "n"}}. `generate=False` skips greedy decoding (em = None):
    the cheap path for searches that only need the smooth score."""
    was_training = model.training
    model.eval()
    try:
        result = {}
        for domain, its in by_domain(items).items():
            acc, ll = teacher_forced(model, tokenizer, its, batch_size)
            em = None
            if generate:
                answers = greedy_answers(model, tokenizer, its, batch_size)
                em = sum(a.strip() == it["answer"].strip() for a, it in zip(answers, its)) / len(its)
            result[domain] = {"em": em, "smooth": sum(acc) / len(acc), "loglik": sum(ll) / len(ll), "n": len(its)}
        return result
    finally:
        model.train(was_training)


def relative_gain(s: float, s_base: float, s_ft: float) -> float | None:
    """(s - s_base) / (s_ft - s_base): the share of the fine-tune's gain kept (None if no gain)."""
    gain = s_ft - s_base
    if abs(gain) < 1e-9:
        return None
    return (s - s_base) / gain


def relative_scores(scores: dict, base_scores: dict, ft_scores: dict) -> dict[str, dict]:
    """Per domain present in all three: {"em_gain", "smooth_gain"} as relative_gain."""
    out = {}
    for d, s in scores.items():
        if d in base_scores and d in ft_scores:
            out[d] = {f"{k}_gain": relative_gain(s[k], base_scores[d][k], ft_scores[d][k])
                      if s[k] is not None and base_scores[d][k] is not None and ft_scores[d][k] is not None
                      else None for k in ("em", "smooth")}
    return out


def geometric_objective(scores: dict, ft_scores: dict, key: str = "smooth",
                        domains: Sequence[str] | None = None) -> float:
    """Geometric mean over domains of scores[d][key] / ft_scores[d][key] (DPPA's alpha objective).

    A zero ratio gives 0; a zero reference is skipped (nothing to keep)."""
    domains = list(domains) if domains is not None else [d for d in scores if d in ft_scores]
    logs = []
    for d in domains:
        ref = ft_scores[d][key]
        if not ref:
            continue
        r = scores[d][key] / ref
        if r <= 0:
            return 0.0
        logs.append(math.log(r))
    if not logs:
        raise ValueError("no domain with a non-zero reference score")
    return math.exp(sum(logs) / len(logs))


@torch.inference_mode()
def perplexity(model, tokenizer, text: str) -> float:
    """exp(mean next-token NLL) of `text` (bos prepended when the tokenizer has one), in windows of
    the model's context length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if len(ids) < 2:
        raise ValueError("text is too short to score (needs at least one token)")
    ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    x = torch.tensor(ids, device=_device(model))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx - 1):
        chunk = x[start:start + ctx].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


# ---------------------------------------------------------------------- scoring a bare state dict

_SKELETONS: dict = {}


def scoring_model(model_dir) -> tuple:
    """A cached private copy of the model at `model_dir` to load state dicts into."""
    key = str(resolve_model(model_dir).resolve())
    if key not in _SKELETONS:
        _SKELETONS[key] = load(model_dir, placed=False)
    return _SKELETONS[key]


def score_state_dict(model_dir, state_dict: dict, items: Sequence[dict], batch_size: int = 256,
                     generate: bool = True) -> dict[str, dict]:
    """Score weights held in memory: copy `state_dict` into a cached skeleton of the model at
    `model_dir` (a dir or demo:NAME of the same architecture; no disk I/O after the first call) and
    run `score_model`. The key sets must match (a tied lm_head may be absent). The skeleton holds
    the last state scored: never read it back."""
    model, tok = scoring_model(model_dir)
    load_weights(model, state_dict)
    return score_model(model, tok, items, batch_size=batch_size, generate=generate)


def load_weights(model, state_dict: dict) -> None:
    """Copy every tensor of `state_dict` into `model` in place; the key sets must match (a tied
    lm_head may be absent), so nothing of a previously scored state survives."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if extra or untied_missing(model.config, missing):
        raise ValueError(f"state dict does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, v in state_dict.items():
            if own[k].shape != v.shape:
                raise ValueError(f"state dict tensor {k} has shape {tuple(v.shape)}, "
                                 f"the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)


def alpha_objective(model_dir, domains: Sequence[str] | None = None, split: str = "dev",
                    suite: str | Path = "zoo") -> Callable[[dict], float]:
    """f(state_dict) -> geometric mean over the model's domains of smooth(state_dict) / smooth(the
    unpruned fine-tune at model_dir), on `split` of `suite`. Domains default to the model's own
    (demo models know theirs). The fine-tune is read from disk and scored once, here; each call
    then only copies the state dict into that private copy and runs one teacher-forced pass."""
    if domains is None:
        d = model_domain(resolve_model(model_dir))
        if not d:
            raise ValueError(f"{model_dir} does not say which domain it was fine-tuned on: "
                             f"give the model a `domain:` in the config")
        domains = [d]
    domains = [domains] if isinstance(domains, str) else list(domains)
    items = load_suite(suite, split, domains=domains)
    model, tok = load(model_dir, placed=False)
    ref = score_model(model, tok, items, generate=False)

    def objective(state_dict: dict) -> float:
        load_weights(model, state_dict)
        return geometric_objective(score_model(model, tok, items, generate=False), ref, "smooth", domains)

    objective.reference = ref          # for reports: the unpruned fine-tune's scores
    objective.domains = domains
    return objective


def format_scores(scores: dict, gains: dict | None = None) -> str:
    """A plain-text table of per-domain scores (and gains when given)."""
    head = f"{'domain':<12}{'n':>5}{'EM':>8}{'smooth':>8}{'loglik':>9}"
    if gains:
        head += f"{'EM gain':>9}{'sm gain':>9}"
    lines = [head]
    fmt = lambda v, w, p=3: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    for d, s in scores.items():
        line = f"{d:<12}{s['n']:>5}{fmt(s['em'], 8)}{fmt(s['smooth'], 8)}{fmt(s['loglik'], 9)}"
        if gains:
            g = gains.get(d, {})
            line += f"{fmt(g.get('em_gain'), 9, 2)}{fmt(g.get('smooth_gain'), 9, 2)}"
        lines.append(line)
    return "\n".join(lines)
