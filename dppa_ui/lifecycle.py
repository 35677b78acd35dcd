"""What a process leaves behind when it ends: temp folders that name their owner, the sweep of
those whose owner died, and stop signals that end a merge cleanly.

Every temp folder the CLI and the app make (a merge's `.OUT.tmp-…` beside its target, a
multi-stage merge's `.OUT.stages-…`, the app's `dppa-ui-…` root in the system temp dir) holds an
owner file: the host, the pid and the process's start time (a pid alone is reused, the start time
tells a restarted process from the one that made the folder). A process killed with -9 or by the
OOM killer cannot remove its folder; the next run sweeps folders whose owner no longer runs. A
folder is swept only when all of these hold: its name still is the one it was made with (a temp
folder renamed into an output is never touched), it holds a readable owner file, the owner ran on
this host, and that process is gone (or a zombie, or another process now has its pid). Anything
else, a live process's folder, a folder without an owner file or a file of the user, stays.

SIGTERM (docker stop, systemd, a Space restart) and Ctrl-C end a merge the same way: `STOP` is
set, the engine's loop stops at the next tensor, its temp folder is removed, the process exits with
one line saying so.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

OWNER_FILE = ".dppa-ui-owner.json"

# Set when the process is asked to stop: every running merge stops at its next tensor.
STOP = threading.Event()
_busy = 0
_busy_cond = threading.Condition()


# --------------------------------------------------------------------------------- process identity

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """An identity of process `pid`'s start that no later process with the same pid shares; None
    when no such process runs (a zombie counts as gone). Linux: clock ticks since boot, with the
    boot id, exact and immune to clock changes; elsewhere psutil's create time."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        if fields[0] in ("Z", "X"):        # exited, not yet reaped: it will never remove its folder
            return None
        return f"linux:{_boot_id()}:{fields[19]}"
    import psutil
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"psutil:{p.create_time():.1f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:        # it runs, as another user
        return "unknown"


def owner_record(name: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": process_start(pid), "host": socket.gethostname(), "name": name,
            "made_by": "dppa-ui"}


def owner_alive(owner: dict) -> bool:
    """True unless the process that made a folder is certainly gone (another host: unknown, alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    now = process_start(int(owner["pid"]))
    if now is None:
        return False
    if now == "unknown" or owner.get("start") is None:
        return True
    if now.startswith("psutil:") and str(owner["start"]).startswith("psutil:"):
        return abs(float(now[7:]) - float(owner["start"][7:])) < 1.0
    return now == owner["start"]


# ----------------------------------------------------------------------------------- temp folders

def make_dir(parent: str | os.PathLike, prefix: str, *, private: bool = False) -> Path:
    """A new folder `parent/PREFIX<random>` owned by this process (see the module doc). Its mode is
    what `mkdir` gives under the user's umask, so a merged model written into a shared folder is
    readable as any file the user writes; `private` makes it 0700 (the app's server files)."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o700 if private else 0o777)
        except FileExistsError:
            continue
        try:
            (path / OWNER_FILE).write_text(json.dumps(owner_record(path.name)))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path
    raise FileExistsError(f"could not make a temp folder in {str(parent)!r}: every name tried exists")


def claim(path: str | os.PathLike) -> None:
    """Record this process as the owner of an existing folder it made (so a sweep may remove it
    once this process is gone)."""
    path = Path(path)
    (path / OWNER_FILE).write_text(json.dumps(owner_record(path.name)))


def release(path: str | os.PathLike) -> None:
    """Drop the owner file of a temp folder that became an output (it is the user's now)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(path) / OWNER_FILE).unlink()


def owner_of(path: str | os.PathLike) -> dict | None:
    try:
        owner = json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and owner.get("made_by") == "dppa-ui" and "pid" in owner else None


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes a folder takes on disk (allocated blocks: shards are sparse until written)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, f))
                total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def bytes_text(n: float) -> str:
    """Bytes for people: 3 significant digits in the unit that shows them (1.23 GB, 456 MB, 7.89 kB)."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            v = n / k
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} bytes"


def orphans(parent: str | os.PathLike, match: Callable[[str], bool]) -> list[tuple[Path, dict]]:
    """The folders in `parent` whose name `match`es that a dead process made (see the module doc)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    out = []
    for e in entries:
        if not match(e.name) or not e.is_dir(follow_symlinks=False):
            continue
        owner = owner_of(e.path)
        if owner is None or owner.get("name") != e.name or owner_alive(owner):
            continue
        out.append((Path(e.path), owner))
    return out


def sweep(parent: str | os.PathLike, match: Callable[[str], bool],
          log: Callable[[str], None] | None = None) -> list[tuple[Path, int]]:
    """Remove the folders `orphans` finds; log one line per folder (what, how much, whose).
    Returns [(folder, bytes freed)]."""
    removed = []
    for path, owner in orphans(parent, match):
        size = disk_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            continue
        removed.append((path, size))
        if log:
            log(f"removed {path.name} ({bytes_text(size)}) in {path.parent}: a temp folder left by process "
                f"{owner['pid']}, which no longer runs")
    return removed


def is_output_temp(name: str) -> bool:
    """Names of the temp folders the engine makes beside an output: .OUT.tmp-…, .OUT.stages-…,
    .OUT.old-…"""
    return name.startswith(".") and any(k in name for k in (".tmp-", ".stages-", ".old-"))


# ----------------------------------------------------------------------------------- stopping

@contextlib.contextmanager
def busy():
    """Count a running merge, so a stopping process can wait for it to clean up."""
    global _busy
    with _busy_cond:
        _busy += 1
    try:
        yield
    finally:
        with _busy_cond:
            _busy -= 1
            _busy_cond.notify_all()


def running() -> int:
    return _busy


def wait_idle(timeout: float) -> bool:
    """Wait until no merge runs (True), at most `timeout` seconds."""
    end = time.monotonic() + timeout
    with _busy_cond:
        while _busy:
            left = end - time.monotonic()
            if left <= 0:
                return False
            _busy_cond.wait(left)
    return True


def check_stop() -> None:
    if STOP.is_set():
        raise InterruptedError("stopped: the process was asked to end")


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is: every `finally` and clean-up runs."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt():
    """In the main thread, turn SIGTERM into `Stopped` (the CLI), so a merge stops where it is and
    removes its temp folder as on Ctrl-C; later signals wait for that clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        STOP.set()
        signal.signal(signum, signal.SIG_IGN)       # a second TERM must not cut the clean-up short
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
