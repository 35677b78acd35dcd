"""The demo family's skills ("domains") and their data.

Each domain maps a short input string x to an answer, and is written two ways:
  - text form, for the base: "abc backwards is cba." The base learns the skill as plain text.
  - chat form, for its fine-tune: `<|user|>reverse: abc<|assistant|>cba<eos>`.
The base never sees a domain in chat form, so it fails the chat prompts (EM ~ 0); a short fine-tune
only has to connect the chat form to a skill the base already holds. That keeps the task vectors
small and merges meaningful: a base that never saw the skills gives fine-tunes whose merges score
zero everywhere (measured by the prototype).

The domains use their own prompt keyword *and* their own character set (lowercase, uppercase,
digits, brackets), so fine-tunes touch different embedding rows and interfere less when merged.
Skills get base training time by difficulty (SKILL_WEIGHTS): reverse and the cipher need the most.
The base also sees one generic chat task ("say: x" -> x) so that the chat format itself is not
part of every fine-tune's delta (the prototype found that shared "format" direction to be the main
source of interference). The fine-tunes replay it, and the other skills' chat prompts, fitted to the
base's own outputs (distillation, builder.finetune_sources): each delta stays inert off its skill.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

_CIPHER_FROM = "ABCDEFGHIJKL"                      # 12 plain letters (a 26-letter table needed
_CIPHER_TO = "QWERTYUIOPAS"                        # far more base steps), keyboard order as the code
_CIPHER = str.maketrans(_CIPHER_FROM, _CIPHER_TO)
_OPEN, _CLOSE = "([{<", ")]}>"
_CLOSER = dict(zip(_OPEN, _CLOSE))


def _letters(alphabet: str, lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


@dataclass(frozen=True)
class Domain:
    name: str
    keyword: str                                  # chat prompt is f"{keyword}: {x}"
    sample: Callable[[random.Random], str]        # draws an input x
    solve: Callable[[str], str]                   # the answer for x
    text: Callable[[str, str], str]               # the base's plain-text form of (x, answer)

    def prompt(self, x: str) -> str:
        return f"{self.keyword}: {x}"

    def item(self, x: str) -> dict:
        return {"prompt": self.prompt(x), "answer": self.solve(x), "domain": self.name}


DOMAINS: dict[str, Domain] = {d.name: d for d in [
    Domain("reverse", "reverse", _letters(string.ascii_lowercase, 3, 5),
           lambda x: x[::-1], lambda x, a: f"{x} backwards {a}."),
    Domain("cipher", "encode", _letters(_CIPHER_FROM, 3, 6),
           lambda x: x.translate(_CIPHER), lambda x, a: f"{x} coded {a}."),
    Domain("sort", "sort", _letters(string.digits, 3, 7),
           lambda x: "".join(sorted(x)), lambda x, a: f"{x} sorted {a}."),
    Domain("brackets", "close", _letters(_OPEN, 2, 6),
           lambda x: "".join(_CLOSER[c] for c in reversed(x)), lambda x, a: f"{x} closed {a}."),
]}

SKILL_WEIGHTS = {"reverse": 2.5, "cipher": 1.5, "sort": 1.0, "brackets": 1.0}

# The "complex" fine-tune (trained longer at a higher LR) is on this domain; see builder.py.
COMPLEX_DOMAIN = "reverse"


def family_names() -> list[str]:
    """The family's models in build order: the base, one fine-tune per domain, the complex one."""
    return ["base", *DOMAINS, f"{COMPLEX_DOMAIN}_complex"]

# Generic chat task for the base only: echo a mixed string. Teaches the chat format, no domain skill.
_ECHO_CHARS = string.ascii_letters + string.digits + " .,!?-+*/=#"
echo_sample = _letters(_ECHO_CHARS, 2, 10)
ECHO_KEYWORD = "say"

SPLIT_SIZES = {"dev": 100, "test": 200}


def held_out_splits(seed: int) -> dict[str, dict[str, list[dict]]]:
    """{domain: {"dev": [...], "test": [...]}}: distinct inputs, disjoint from each other.

    Training samplers reject these inputs (see `held_out_inputs`), so no split item is ever trained on.
    """
    out = {}
    for i, (name, dom) in enumerate(DOMAINS.items()):
        rng = random.Random(f"zoo-splits|{seed}|{name}")
        seen: set[str] = set()
        splits = {}
        for split, n in SPLIT_SIZES.items():
            items = []
            while len(items) < n:
                x = dom.sample(rng)
                if x not in seen:
                    seen.add(x)
                    items.append(dom.item(x))
            splits[split] = items
        out[name] = splits
    return out


def input_of(item: dict) -> str:
    """The input x of a split item (the prompt minus its keyword)."""
    return item["prompt"].split(": ", 1)[1]


def held_out_inputs(splits: dict[str, dict[str, list[dict]]]) -> dict[str, set[str]]:
    """{domain: every dev and test input}: what the training samplers must never draw."""
    return {name: {input_of(it) for items in by_split.values() for it in items} for name, by_split in splits.items()}
