"""Faults leave nothing behind: a merge killed outright (kill -9) or stopped (SIGTERM), in the CLI
and in the app, and the next start; inputs named in their errors; a full disk named; the output's
permissions those of the user's umask.

The merges that must be caught mid-write run in real subprocesses with each tensor's merge slowed
down (a sleep before `merge_tensor`), so the signal lands while the temp folder is being written."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dppa_ui import io, lifecycle, runner
from test_cli import assert_one_line_error, run_main, write_cfg

ROOT = Path(__file__).resolve().parents[1]

# A CLI run whose every tensor takes `argv[1]` seconds more, so a test can signal it mid-write.
SLOW_CLI = """
import sys, time
import dppa_ui.engine as engine
merge_tensor = engine.merge_tensor
def slow(*a, **k):
    time.sleep(float(sys.argv[1]))
    return merge_tensor(*a, **k)
engine.merge_tensor = slow
from dppa_ui.cli import main
raise SystemExit(main(sys.argv[2:]))
"""

# app.py as a Space runs it, with every tensor of a merge 0.1 s slower.
SLOW_APP = """
import runpy, sys, time
import dppa_ui.engine as engine
merge_tensor = engine.merge_tensor
def slow(*a, **k):
    time.sleep(0.1)
    return merge_tensor(*a, **k)
engine.merge_tensor = slow
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for(pred, timeout: float = 120.0, what: str = "condition", proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def slow_cli(tmp_path, cfg, out, delay=0.3) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    return subprocess.Popen([sys.executable, str(script), str(delay), "merge", str(cfg), "--out", str(out), "--quiet"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def writing(parent: Path, prefix: str):
    """The temp folder being written beside an output (a shard already created in it), or None."""
    for p in parent.glob(f"{prefix}*"):
        if any(p.glob("*.safetensors")):
            return p
    return None


# ----------------------------------------------------------------------------------- the CLI

def test_cli_killed_mid_write_then_rerun_leaves_no_hidden_folder(tiny_family, tmp_path, capsys):
    """kill -9 mid-write leaves `.out.tmp-…` (nothing can remove it then); the next merge beside
    the same target removes it, says what and how much, and writes its output."""
    cfg = write_cfg(tmp_path, tiny_family, "ties")
    work = tmp_path / "work"
    work.mkdir()
    proc = slow_cli(tmp_path, cfg, work / "out")
    try:
        tmp = wait_for(lambda: writing(work, ".out.tmp-"), what="the merge to write", proc=proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert tmp.is_dir() and not (work / "out").exists()       # what a kill -9 leaves
    rc, _, err = run_main(capsys, cfg, "--out", work / "out", "--quiet")
    assert rc == 0, err
    assert f"removed {tmp.name} (" in err and f"process {proc.pid}, which no longer runs" in err
    assert hidden(work) == []
    assert (work / "out" / "model.safetensors").is_file()
    assert not (work / "out" / lifecycle.OWNER_FILE).exists()


def test_the_sweep_never_touches_a_live_process_folder_or_anything_it_did_not_make(tiny_family, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    live = lifecycle.make_dir(work, ".out.tmp-")                      # this process: alive
    (live / "model.safetensors").write_bytes(b"x" * 100)
    foreign = work / ".out.tmp-mine"                                  # the user's, no owner file
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    # a folder made by a process that has ended, and one renamed after it was made (an output)
    made = subprocess.run([sys.executable, "-c", "import sys; from dppa_ui import lifecycle; "
                           "print(lifecycle.make_dir(sys.argv[1], '.out.tmp-'))", str(work)],
                          env=env(), capture_output=True, text=True, check=True).stdout.strip()
    dead = Path(made)
    renamed = work / "finished"
    shutil.copytree(dead, renamed)
    other = work / "notes.tmp-1"                                       # not a hidden temp name
    shutil.copytree(dead, other)
    cfg = write_cfg(tmp_path, tiny_family, "task_arithmetic")
    rc, _, err = run_main(capsys, cfg, "--out", work / "out", "--quiet")
    assert rc == 0, err
    assert not dead.exists() and f"removed {dead.name}" in err
    assert live.is_dir() and (live / "model.safetensors").is_file()
    assert (foreign / "keep.txt").read_text() == "mine"
    assert renamed.is_dir() and other.is_dir()
    assert err.count("removed ") == 1


def test_cli_sigterm_stops_the_merge_removes_its_temp_folder_and_says_so(tiny_family, tmp_path):
    cfg = write_cfg(tmp_path, tiny_family, "ties")
    work = tmp_path / "work"
    work.mkdir()
    proc = slow_cli(tmp_path, cfg, work / "out")
    try:
        wait_for(lambda: writing(work, ".out.tmp-"), what="the merge to write", proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: stopped by SIGTERM") and "temp files were removed" in lines[-1]
    assert "Traceback" not in err
    assert hidden(work) == [] and not (work / "out").exists()


def test_a_truncated_safetensors_is_named_with_its_path(tiny_family, tmp_path, capsys):
    damaged = tmp_path / "ft-damaged"
    shutil.copytree(tiny_family.fts[1], damaged)
    f = damaged / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    models = [{"model": str(tiny_family.fts[0]), "parameters": {"density": 0.5}},
              {"model": str(damaged), "parameters": {"density": 0.5}}]
    cfg = write_cfg(tmp_path, tiny_family, "ties", {}, [{"density": 0.5}] * 2)
    import yaml
    d = yaml.safe_load(cfg.read_text())
    d["models"] = models
    cfg.write_text(yaml.safe_dump(d))
    rc, _, err = run_main(capsys, cfg, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, str(f), "damaged or incomplete")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_a_damaged_input_in_the_app_is_named_by_its_ref_and_file_without_server_paths(tiny_family, tmp_path):
    from dppa_ui.workspace import ModelAccess
    damaged = tmp_path / "ft-damaged"
    shutil.copytree(tiny_family.fts[0], damaged)
    f = damaged / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        ModelAccess("models/base", tiny_family.base, ["models/ft-damaged"], [damaged])
    assert "model models/ft-damaged: model.safetensors is damaged or incomplete" in str(e.value)
    assert str(tmp_path) not in str(e.value)


def test_a_full_disk_names_the_folder_and_the_space_needed(tiny_family, tmp_path, monkeypatch):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.ShardedWriter, "write", full)
    cfg = write_cfg(tmp_path, tiny_family, "task_arithmetic")
    with pytest.raises(io.NotEnoughDiskSpace) as e:
        runner.merge(str(cfg), tmp_path / "disk" / "out", log=lambda s: None)
    msg = str(e.value)
    assert str(tmp_path / "disk") in msg and "needs about" in msg and " GB" in msg
    assert hidden(tmp_path / "disk") == [] and not (tmp_path / "disk" / "out").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775)])
def test_the_output_gets_the_permissions_of_the_users_umask(tiny_family, tmp_path, umask, mode):
    cfg = write_cfg(tmp_path, tiny_family, "task_arithmetic")
    old = os.umask(umask)
    try:
        runner.merge(str(cfg), tmp_path / "out", log=lambda s: None)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == mode & 0o666
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == mode & 0o666


# ----------------------------------------------------------------------------------- the app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp_path: Path, temp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    script = tmp_path / "slow_app.py"
    script.write_text(SLOW_APP)
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT / "app.py")], cwd=tmp_path,
                            env=env(TMPDIR=str(temp), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                                    BROWSER="true", DPPA_UI_CACHE_DIR=str(tmp_path / "cache")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, what="the app to listen", proc=proc)
    return proc, f"http://127.0.0.1:{port}/"


def app_roots(temp: Path) -> list[Path]:
    return sorted(temp.glob("dppa-ui-*"))


def merge_mid_write(url: str, temp: Path, proc):
    """Load the demo base and one fine-tune, start a ties merge; return once it writes."""
    from gradio_client import Client

    from dppa_ui.ui.common import api_controls
    c = Client(url, verbose=False)
    assert c.predict("demo:base", ["demo:reverse"], api_name="/load_models")[1].startswith("✓")
    job = c.submit(*api_controls(preset="ties", density=0.5), api_name="/merge")
    wait_for(lambda: any(temp.glob("dppa-ui-*/session-*/.run-1.tmp-*/*.safetensors")), what="the merge to write",
             proc=proc)
    return job


def test_the_app_stopped_with_sigterm_mid_merge_leaves_no_temp_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc, url = start_app(tmp_path, temp)
    try:
        merge_mid_write(url, temp, proc)
        assert len(app_roots(temp)) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "dppa-ui: stopped by SIGTERM: 1 running merge(s) cancelled, server files removed" in err
    assert app_roots(temp) == []


def test_the_app_killed_mid_merge_is_swept_by_the_next_start(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc, url = start_app(tmp_path, temp)
    try:
        merge_mid_write(url, temp, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (root,) = app_roots(temp)                    # what a kill -9 leaves
    proc2, _ = start_app(tmp_path, temp)
    try:
        assert app_roots(temp) == []             # swept before the server listened
        proc2.send_signal(signal.SIGTERM)
        _, err = proc2.communicate(timeout=60)
    finally:
        proc2.kill()
    assert f"dppa-ui: removed {root.name} (" in err and f"process {proc.pid}, which no longer runs" in err
    assert app_roots(temp) == []
