"""Every mergekit-style example in assets/examples/mergekit runs on the demo family (each is a
small, complete YAML a user can start from), and the result loads in transformers."""
from __future__ import annotations

from pathlib import Path

import pytest

import dppa_ui

EXAMPLES = sorted((Path(__file__).parents[1] / "assets" / "examples" / "mergekit").glob("*.yaml"))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_the_demo_family(path, tmp_path):
    res = dppa_ui.merge(path, tmp_path / "out")
    assert res.tensors > 0 and (tmp_path / "out" / "config.json").is_file()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    if path.stem == "passthrough":
        assert len(model.model.layers) == 5


def test_examples_cover_the_new_families():
    names = {p.stem for p in EXAMPLES}
    assert {"slerp_gradient", "della", "passthrough", "two_stages"} <= names
