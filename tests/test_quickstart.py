"""What the README promises a newcomer, checked against the code: the Python version and torch pin
it names are the project's, `python app.py` listens where GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
say and opens a browser tab only where there is a display; the DP bullet's deviations from the
official code are what DP does."""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README section under `## title`, up to the next `## `."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, title
    return m.group(1)


# ------------------------------------------------------------------------------ set-up (issue 17, 8-9)

def test_quick_start_names_the_python_and_the_cpu_torch_of_the_pins():
    quick = section("Quick start")
    needs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert needs == ">=3.11" and "Python ≥ 3.11" in quick
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    # pip's default Linux wheel of the pin is the CUDA build: the README says so and gives the one
    # extra command that puts the CPU build of the same version in the same venv first
    assert f"pins `torch=={pin}`" in quick and "CUDA build" in quick
    cpu = f"python3 -m venv .venv && .venv/bin/pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in quick
    # the two set-up commands stay as they are
    assert "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python app.py" in quick
    assert ("python3 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt && .venv/bin/python -m "
            "pytest -q") in quick
    assert "GRADIO_SERVER_NAME" in quick and "GRADIO_SERVER_PORT" in quick and "only where there is a display" in quick


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("display", [False, True])
def test_app_listens_on_the_env_port_and_opens_a_tab_only_with_a_display(tmp_path, display):
    # BROWSER is what Python's webbrowser runs to open a tab: here a script that leaves a file, so
    # a tab "opened" is a file written. Without a display none may be opened (on a headless server
    # it would start a console browser in the terminal).
    opened = tmp_path / "opened"
    fake = tmp_path / "browser.sh"
    fake.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SPACE_ID")}
    env.update(BROWSER=str(fake), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if display:
        env["DISPLAY"] = ":99"
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, up = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert up, "the app did not answer on GRADIO_SERVER_PORT"
        end = time.time() + 10
        while display and not opened.exists() and time.time() < end:
            time.sleep(0.2)
        if not display:
            time.sleep(3)
        assert opened.exists() == display
        if display:
            assert opened.read_text().strip().startswith(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ DP (issue 17, 6)

def test_dp_deviations_from_the_official_code_are_stated_and_done():
    from dppa_ui.methods import dp_densities, dp_prune, keep_count
    # (1) a module density below 0 is clamped to 0 (the official code fails there), with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = dp_densities({"model.layers.0": 1.0, "model.layers.1": 9.0},
                         {"model.layers.0.mlp.up_proj.weight": 1.0, "model.layers.1.mlp.up_proj.weight": 30.0,
                          "model.layers.0.mlp.down_proj.weight": 40.0, "model.layers.1.mlp.down_proj.weight": 2.0},
                         {f"model.layers.{b}.mlp.{m}.weight": 100 for b in (0, 1) for m in ("up_proj", "down_proj")},
                         density=0.05, dp_lambda=0.2)
    low = [v for v in d.values() if v.clamped and v.density == 0.0]
    assert low and all(v.offset + 0.05 < 0 for v in low)
    assert any("density 0" in str(w.message) for w in caught)
    delta = torch.randn(10, 10)
    assert torch.count_nonzero(dp_prune(delta, 0.0)) == 0
    # (2) exactly int(n*d) entries kept, ties at the threshold broken by the lowest flat index; the
    # official rule (drop every entry <= sort(|delta|)[int(n*s)]) keeps fewer here
    tied = torch.tensor([0.5, -0.1, 0.3, 0.3, -0.3, 0.2, 0.3, 0.9, -0.05, 0.3])
    kept = dp_prune(tied, 0.4)
    assert torch.count_nonzero(kept) == keep_count(0.4, 10) == 4
    assert kept.nonzero().squeeze(1).tolist() == [0, 2, 3, 7]
    threshold = tied.abs().sort().values[int(10 * (1 - 0.4))]
    assert int((tied.abs() > threshold).sum()) == 2
    bullet = section("Methods")
    dp = bullet[bullet.index("- **DP**"):bullet.index("- **DPA**")]
    for needle in ("below 0", "clamped to 0", "sort(|δ|)[int(n·s)]", "one entry fewer", "tied",
                   "exactly int(n·d)"):
        assert needle in dp, needle
