"""Tokenizer surgery: mergekit 0.1.5's `tokenizer: {source, tokens, pad_to_multiple_of}` and
`tokenizer_source` (mergekit/tokenizer/build.py and embed.py), with our own code.

The output vocabulary comes from `source`:
  base      the base model's tokenizer, with tokens at ids >= its config's vocab_size removed
  union     the base's tokenizer plus, in model order, every other model's tokens it lacks (regular
            tokens first, then added/special tokens), ids >= a model's vocab_size ignored
  <model>   that model's tokenizer
then every key of `tokens:` that is not in it yet is added.

Each input's embedding rows (and lm_head rows: every vocabulary tensor) are then re-ordered to the
output vocabulary by token text before the merge. A token an input lacks gets a default row:
  - `tokens.<tok>.source` when given: a model's own row for that token, {kind: model_token, model,
    token | token_id} (that model's row for another token), or {kind: zero};
  - otherwise the row of the only input that has it; the base's row when the base has it; the mean
    of the rows of the inputs that have it; zeros when none has it.
`force: true` replaces the token's row in every input by that default. With pad_to_multiple_of the
vocabulary is padded with rows equal to the mean of the real rows. config.json's vocab_size
becomes the output vocabulary's size.

When `source` is `base` or a model whose tokenizer files cannot be loaded (no tokenizer.json /
vocabulary), the rows are left as they are and the source's tokenizer files are copied (a notice
says so); `union` needs every input's tokenizer and is refused without them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError, MergeConfig
from .io import is_vocab_tensor
from .refs import resolve_model


def _load_tokenizer(path: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _vocab_size(path: Path) -> int | None:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(v) if v else None


def _stripped(tok, size: int | None):
    """The tokenizer without tokens at ids >= size (a fresh copy; only needed when there are some)."""
    if size is None or all(i < size for i in tok.get_vocab().values()):
        return tok
    if not getattr(tok, "is_fast", False):
        raise ConfigError("the base tokenizer has tokens beyond the model's vocab_size and is not a fast "
                          "tokenizer; it cannot be stripped for the merge")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE" and data["model"]["type"] != "WordLevel":
        raise ConfigError(f"the base tokenizer ({data['model']['type']}) has tokens beyond vocab_size; only BPE "
                          f"and WordLevel tokenizers can be stripped")
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    if "merges" in data["model"]:
        def keep(m):
            parts = m.split(" ") if isinstance(m, str) else m
            return not any(p in unused for p in parts)
        data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    import tokenizers
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        out = _load_tokenizer(Path(d))
    out._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return out


def _union(base_tok, toks: dict[str, object], sizes: dict[str, int | None]):
    """The base tokenizer plus every other tokenizer's missing tokens (module doc)."""
    added: dict[str, object] = {}
    regular: dict[str, None] = {}
    for ref, tok in toks.items():
        size = sizes.get(ref) or tok.vocab_size
        dec = tok.added_tokens_decoder
        added_text = {a.content for a in dec.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_text:
                regular.setdefault(t, None)
        for i, info in dec.items():
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d)
        out = _load_tokenizer(Path(d))
    have = base_tok.get_vocab()
    for t in regular:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


class VocabRebuild:
    """The output vocabulary and, per input model, where each output row comes from."""

    def __init__(self, cfg: MergeConfig, tokenizer, vocab: dict[str, int], rows: int, perms: dict[str, list[int]],
                 original: dict[str, dict[str, int]], base_ref: str | None):
        self.cfg, self.tokenizer, self.vocab, self.rows = cfg, tokenizer, vocab, rows
        self.perms, self.original, self.base_ref = perms, original, base_ref
        self.tokens = cfg.vocab.tokens

    def covers(self, name: str) -> bool:
        return is_vocab_tensor(name)

    def apply_to_plan(self, plan) -> None:
        for j in plan.jobs:
            if self.covers(j.name):
                j.shape = (self.rows, *j.shape[1:])
                j.rows = None

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        return folder

    def rebuild(self, refs: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs' rows re-ordered to the output vocabulary, missing rows filled (module doc)."""
        tensors = [t.float() for t in tensors]
        n = len(self.vocab)
        shape = tensors[0].shape[1:]
        perms = [self.perms[r] for r in refs]
        defaults: dict[int, torch.Tensor] = {}
        for tok, tid in self.vocab.items():
            tc = self.tokens.get(tok)
            has = [p[tid] >= 0 for p in perms]
            if all(has) and not (tc and tc["force"]):
                continue
            defaults[tid] = self._default(tok, tid, tc, refs, tensors, perms, has, shape)
        forced = {self.vocab[t] for t, tc in self.tokens.items() if tc["force"] and t in self.vocab}
        out = []
        for t, p in zip(tensors, perms):
            new = torch.zeros((self.rows, *shape), dtype=t.dtype)
            idx = torch.tensor(p, dtype=torch.long)
            ok = idx >= 0
            new[:n][ok] = t[idx[ok]]
            for tid, row in defaults.items():
                if p[tid] < 0 or tid in forced:
                    new[tid] = row
            if self.rows > n:
                new[n:] = new[:n].mean(dim=0)
            out.append(new)
        return out

    def _default(self, tok, tid, tc, refs, tensors, perms, has, shape) -> torch.Tensor:
        src = tc["source"] if tc else None
        if src is None:
            if sum(has) == 1:
                src = refs[has.index(True)]
            elif sum(has) == 0:
                return torch.zeros(shape)
            elif self.base_ref in refs and has[refs.index(self.base_ref)]:
                src = self.base_ref
            else:
                rows = [t[p[tid]] for t, p, h in zip(tensors, perms, has) if h]
                return sum(rows) / len(rows)
        if isinstance(src, dict) and src.get("kind") == "zero":
            return torch.zeros(shape)
        model = src["model"] if isinstance(src, dict) else src
        if model not in refs:
            raise ConfigError(f"tokenizer.tokens[{tok!r}] takes its row from {model}, which is not an input of "
                              f"this tensor")
        k = refs.index(model)
        if isinstance(src, dict):
            row = src.get("token_id")
            if row is None:
                if src["token"] not in self.original[model]:
                    raise ConfigError(f"tokenizer.tokens[{tok!r}]: token {src['token']!r} is not in {model}'s vocabulary")
                row = self.original[model][src["token"]]
            if not 0 <= row < tensors[k].shape[0]:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: token id {row} is out of range for {model}")
            return tensors[k][row]
        if perms[k][tid] < 0:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: {model} does not have the token {tok!r}")
        return tensors[k][perms[k][tid]]


def build_vocab(cfg: MergeConfig, refs: list[str], dirs: list[Path], readers, log: Callable[[str], None] | None = None):
    """The VocabRebuild for a config with `tokenizer:` / `tokenizer_source:` (None when the rows are
    left as they are; see the module doc)."""
    spec = cfg.vocab
    by_ref = dict(zip(refs, dirs))
    base_ref = cfg.base_model or refs[0]
    toks: dict[str, object] = {}
    failed: dict[str, str] = {}
    for r in refs:
        try:
            toks[r] = _load_tokenizer(by_ref[r])
        except Exception as e:  # no tokenizer files, or unreadable ones
            failed[r] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    sizes = {r: _vocab_size(by_ref[r]) for r in refs}
    if spec.source == "union":
        if failed:
            r, why = next(iter(failed.items()))
            raise ConfigError(f"tokenizer source `union` needs every model's tokenizer; {r} has none that loads "
                              f"({why}); use `source: base` or give that model its tokenizer files")
    src_ref = base_ref if spec.source in ("base", "union") else spec.source
    if src_ref not in refs:
        try:
            toks[src_ref] = _load_tokenizer(resolve_model(src_ref))
        except Exception as e:
            failed[src_ref] = f"{type(e).__name__}"
    if src_ref in failed or base_ref in failed:
        cfg.notices.append(f"the tokenizer of {src_ref} does not load ({failed.get(src_ref)}); its tokenizer files are "
                           f"copied and the embedding rows are left as they are")
        if log:
            log(f"notice: {cfg.notices[-1]}")
        return None
    base_tok = _stripped(toks[base_ref], sizes.get(base_ref))
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, {r: t for r, t in toks.items() if r != base_ref}, sizes)
    else:
        out = toks[spec.source]
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    n = len(vocab)
    rows = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        rows = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    perms, original = {}, {}
    for r in refs:
        mv = (toks.get(r) or toks[base_ref]).get_vocab()
        if r in failed and log:
            log(f"notice: no tokenizer for {r}; assuming the base's")
        size = sizes.get(r) or len(mv)
        p = [-1] * n
        for tok, new in vocab.items():
            old = mv.get(tok)
            if old is not None and old < size:
                p[new] = old
        perms[r] = p
        original[r] = mv
    return VocabRebuild(cfg, out, vocab, rows, perms, original, cfg.base_model)
