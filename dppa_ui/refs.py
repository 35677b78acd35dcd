"""Model refs: the one resolver from what a user writes to a local checkpoint folder.

A ref is one of
  SCHEME:NAME         a registered scheme (the demo family registers `demo:`; the core knows none)
  a local folder      any path for the CLI; under the policy's roots for a hosted app
  org/name[@rev]      a Hugging Face hub id, downloaded (weights as safetensors) into the shared
                      hub cache, or read from it when offline

`RefPolicy` says what a ref may reach. The CLI uses the open default; the app passes its own (model
roots, downloads on or off, a size cap stated before any download). `files_identity` names a
checkpoint's exact bytes (file names, sizes, mtimes, hub revision) for caches that must notice a
changed model.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .lora import AdapterError, resolve_lora

GB = 1 << 30


class ModelRefError(ValueError):
    """A model ref that cannot be turned into a local checkpoint folder; the message says why."""


@dataclass(frozen=True)
class RefPolicy:
    """What a ref may reach. `roots=None`: any local folder (the CLI). With roots, a path must
    resolve (symlinks and `..` included) under one of them, and so must every file in it."""
    roots: tuple[Path, ...] | None = None
    allow_downloads: bool = True
    max_download_bytes: int | None = None
    allow_pickle: bool = False


OPEN = RefPolicy()
_SCHEMES: dict[str, Callable[[str], Path]] = {}
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")   # org/name[@rev]


def register_scheme(scheme: str, resolve: Callable[[str], Path]) -> None:
    """Make `scheme:NAME` refs resolve through `resolve(NAME)` (which raises ValueError for an
    unknown name). The demo family registers `demo`."""
    _SCHEMES[scheme] = resolve


def scheme_of(ref: str) -> str | None:
    head, sep, _ = str(ref).partition(":")
    return head if sep and head in _SCHEMES else None


def _looks_like_path(ref: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a separator is meant as a path.
    return (ref.startswith(("/", "./", "../", "~", ".\\")) or ref.count("/") > 1
            or "\\" in ref or ref in (".", ".."))


def check_path_allowed(path: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> Path:
    """The resolved path if it lies under one of `roots`; else ModelRefError naming the roots.

    Symlinks and `..` are resolved first, so neither steps outside a root. A relative path is
    looked up under each root (the first that exists), then under the working directory."""
    roots = [Path(r).expanduser().resolve() for r in roots]
    raw = Path(str(path).strip()).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:
        candidates = [r / raw for r in roots] + [Path.cwd() / raw]
        candidates = [c for c in candidates if c.exists()] or candidates
    for c in candidates:
        resolved = c.resolve()
        if any(resolved == r or resolved.is_relative_to(r) for r in roots):
            return resolved
    where = ", ".join(str(r) for r in roots) or "(none configured)"
    raise ModelRefError(f"{str(path)!r} is outside the allowed model folders: {where}. Put the model in "
                        f"one of them, or set DPPA_UI_MODEL_ROOTS to add a folder")


def _local(ref: str, policy: RefPolicy) -> Path | None:
    """The local folder `ref` names, None when it names none (then it may be a hub id)."""
    raw = Path(ref).expanduser()
    if policy.roots is None:
        if raw.is_dir():
            return raw
        if raw.exists():
            raise ModelRefError(f"model {ref!r} is a file; give the folder that holds config.json and the "
                                "*.safetensors weights")
        if _looks_like_path(ref):
            raise ModelRefError(f"model folder {ref!r} does not exist")
        return None
    exists = raw.exists() or any((Path(r) / raw).exists() for r in policy.roots)
    if not exists and _HUB_ID.match(ref) and not raw.is_absolute():
        return None
    path = check_path_allowed(ref, policy.roots)
    if not path.is_dir():
        raise ModelRefError(f"model folder {ref!r} does not exist under the allowed model folders")
    for f in path.iterdir():      # a file linked from elsewhere would be read (and saved) too
        try:
            check_path_allowed(f, policy.roots)
        except ModelRefError:
            raise ModelRefError(f"{f.name!r} in model folder {ref!r} links outside the allowed model folders; "
                                "copy the file in instead of linking it") from None
    return path


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def hub_weight_bytes(repo_id: str, revision: str | None = None) -> int | None:
    """Bytes of a hub repo's safetensors weights, None when it cannot be asked (offline, network)."""
    if hub_offline():
        return None
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo_id, revision=revision or None, files_metadata=True)
    except Exception:
        return None
    return sum((s.size or 0) for s in (info.siblings or []) if s.rfilename.endswith(".safetensors"))


def _download(ref: str, policy: RefPolicy, progress: Callable[[str], None] | None) -> Path:
    repo_id, _, revision = ref.partition("@")
    if not policy.allow_downloads:
        raise ModelRefError(f"{ref!r} looks like a hub id, but downloads are disabled on this server "
                            f"(DPPA_UI_ALLOW_DOWNLOADS=0); use a demo model or a folder under the model roots")
    size = hub_weight_bytes(repo_id, revision)
    if size is not None and policy.max_download_bytes is not None and size > policy.max_download_bytes:
        raise ModelRefError(f"hub model {ref!r} has {size / GB:.1f} GB of weights; this server downloads at "
                            f"most {policy.max_download_bytes / GB:.1f} GB (DPPA_UI_MAX_DOWNLOAD_GB)")
    if progress and size is not None:
        progress(f"downloading {ref}: {size / GB:.2f} GB of weights"
                 + (f" (cap {policy.max_download_bytes / GB:.1f} GB)" if policy.max_download_bytes else ""))
    patterns = _HUB_PATTERNS + (["*.bin"] if policy.allow_pickle else [])
    kwargs = {}
    if progress:
        kwargs["tqdm_class"] = _progress_tqdm(ref, progress)
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns, **kwargs)
    except Exception as e:  # offline, unknown repo, bad revision, invalid id, network ...
        raise ModelRefError(f"model {ref!r} is not a local folder and could not be fetched from the hub: "
                            f"{_hub_failure(e, repo_id, revision)}") from e
    return Path(path)


def _hub_failure(e: Exception, repo_id: str, revision: str) -> str:
    """Why a hub download failed, in words a user can act on (not the library's exception text)."""
    kind = type(e).__name__
    if kind == "LocalEntryNotFoundError":
        return ("this server has no copy of it and cannot reach the hub (offline: HF_HUB_OFFLINE=1, or no "
                "network); use a demo model or a folder under the model roots")
    if kind == "GatedRepoError":
        return f"{repo_id} is gated: accept its terms on the hub and give this server a token (HF_TOKEN)"
    if kind == "RepositoryNotFoundError":
        return f"there is no model {repo_id} on the hub (or it is private): check the name"
    if kind == "RevisionNotFoundError":
        return f"{repo_id} has no revision {revision!r}"
    return f"{kind}: {e}"


def _progress_tqdm(ref: str, report: Callable[[str], None]):
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        """huggingface_hub's download bars, forwarded as one line of text per update."""

        def update(self, n=1):
            out = super().update(n)
            if self.total:
                report(f"downloading {ref}: {self.n / self.total:.0%} of {self.total / 1e9:.2f} GB"
                       if self.unit == "B" else f"downloading {ref}: {self.n}/{self.total} files")
            return out

    return Reporting


def resolve_model(ref: str, *, allow_pickle: bool = False, policy: RefPolicy | None = None,
                  progress: Callable[[str], None] | None = None, lora_cache: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """The local folder of a model ref under `policy` (default: open, as the CLI). Every refusal
    is a ModelRefError (a ValueError) naming the ref and the fix. `progress` gets text lines while
    a hub model downloads. `MODEL+ADAPTER`: MODEL with the PEFT adapter merged in (lora.py), kept
    in `lora_cache` for reuse; both parts are resolved under the same policy."""
    policy = policy or OPEN
    if allow_pickle and not policy.allow_pickle:
        policy = RefPolicy(policy.roots, policy.allow_downloads, policy.max_download_bytes, True)
    ref = str(ref or "").strip()
    if not ref:
        raise ModelRefError("empty model ref: give a local folder, a hub id (org/name[@revision]) or a "
                            "demo model (demo:NAME)")
    scheme = scheme_of(ref)
    if scheme is not None:
        try:
            return Path(_SCHEMES[scheme](ref[len(scheme) + 1:]))
        except ValueError as e:
            raise ModelRefError(str(e)) from None
    if "+" in ref:
        try:
            return resolve_lora(ref, lambda r: resolve_model(r, policy=policy, progress=progress), lora_cache, log,
                                local=lambda r: _local(r, policy))
        except AdapterError as e:
            raise ModelRefError(str(e)) from None
    local = _local(ref, policy)
    return local if local is not None else _download(ref, policy, progress)


def is_hub_id(ref: str, policy: RefPolicy | None = None) -> bool:
    """True when `ref` would be fetched from the hub (not a scheme, not an existing folder)."""
    ref = str(ref or "").strip()
    if scheme_of(ref) or not _HUB_ID.match(ref):
        return False
    roots = (policy or OPEN).roots or ()
    return not Path(ref).expanduser().exists() and not any((Path(r) / ref).exists() for r in roots)


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))


def files_identity(path: str | os.PathLike) -> tuple:
    """What identifies a checkpoint's bytes: its resolved folder, the hub revision when it lives
    in the hub cache (…/snapshots/REV/), and each weight file's name, size and mtime."""
    path = Path(path)
    parts = path.resolve().parts
    rev = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    files = []
    for f in weight_files(path):
        st = f.stat()            # follows the hub cache's symlinks to the blobs
        files.append((f.name, st.st_size, st.st_mtime_ns))
    return (str(path.resolve()), rev, tuple(files))
