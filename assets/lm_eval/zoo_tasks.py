"""Data of the demo family's lm-eval tasks: the held-out splits under assets/zoo/data, read as they
are (`validation` = dev, `test` = test), so lm-eval scores exactly the items `python -m dppa_ui
score` scores. Found by lm-eval through `--include-path assets/lm_eval`; needs no hub and no
dppa_ui import, so lm-eval's own CLI runs these tasks too."""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "zoo" / "data"
DISTRACTORS = 3


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _with_choices(items: list[dict]) -> list[dict]:
    """Each item with `choices`: its answer among DISTRACTORS other answers of the same split (the
    next ones of the same length, else the next ones), at position `label` = item index mod
    (DISTRACTORS + 1), so no position is always right."""
    out = []
    for i, it in enumerate(items):
        others = [items[(i + k) % len(items)]["answer"] for k in range(1, len(items))]
        others = [a for a in dict.fromkeys(others) if a != it["answer"]]
        same = [a for a in others if len(a) == len(it["answer"])]
        wrong = (same + [a for a in others if a not in same])[:DISTRACTORS]
        label = i % (len(wrong) + 1)
        choices = wrong[:label] + [it["answer"]] + wrong[label:]
        out.append({**it, "choices": choices, "label": label})
    return out


def load(domain: str, **_):
    """The dev and test items of one demo domain as a DatasetDict (validation, test)."""
    import datasets
    splits = {"validation": "dev", "test": "test"}
    return datasets.DatasetDict({name: datasets.Dataset.from_list(_with_choices(_read(DATA / domain / f"{s}.jsonl")))
                                 for name, s in splits.items()})
