"""LoRA adapters as merge inputs: `MODEL+ADAPTER` references (or mergekit's {model, lora}) are
merged into their base with peft (`PeftModel.from_pretrained(...).merge_and_unload()`, as mergekit
does) before anything else, and the merged folder is used like any other model.

The merged folder is cached under the LoRA merge cache (`--lora-merge-cache DIR`; default
`dppa-ui-lora` in the system temp dir), named after both refs and a hash of their resolved paths,
and reused when it is complete. Before anything is merged the adapter is checked against the
model it is applied to, from headers only: its recorded base (`base_model_name_or_path`) must name
that model, and every LoRA pair must fit a weight of the model (lora_A: rank x in, lora_B:
out x rank for an out x in weight). Ranks may differ between adapters.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from . import lifecycle
from .io import CheckpointReader, copy_model_files

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """An adapter that cannot be applied to the model it is paired with."""


def split_ref(ref: str) -> tuple[str, str | None]:
    model, _, lora = ref.partition("+")
    return model, (lora or None)


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "dppa-ui-lora"


def adapter_dir(lora_ref: str, local: Callable[[str], Path | None] | None = None) -> Path:
    """A local adapter folder (adapter_config.json + weights), from a path or the hub. `local`:
    the caller's local-folder resolver (it enforces the app's allowed roots); None = any path."""
    local = local(lora_ref) if local is not None else (Path(lora_ref).expanduser()
                                                       if Path(lora_ref).expanduser().is_dir() else None)
    if local is not None:
        if not (local / "adapter_config.json").is_file():
            raise AdapterError(f"{lora_ref} is not a PEFT adapter folder (no adapter_config.json)")
        return local
    repo_id, _, revision = lora_ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id, revision=revision or None,
                                 allow_patterns=["adapter_config.json", "adapter_model.safetensors", "*.json"])
    except Exception as e:
        raise AdapterError(f"adapter {lora_ref!r} is not a local folder and could not be fetched from the hub "
                           f"(offline?): {type(e).__name__}: {e}") from e
    return Path(path)


def _same_model(recorded: str, model_ref: str, model_dir: Path) -> bool:
    if not recorded:
        return True
    rec = recorded.rstrip("/")
    if rec == model_ref.rstrip("/"):
        return True
    p = Path(rec).expanduser()
    if p.is_dir():          # a local folder recorded: it must be this very folder
        return p.resolve() == model_dir.resolve()
    # a hub id recorded: its snapshot, or a local copy named after the repo
    name = rec.split("/")[-1]
    return (f"models--{rec.replace('/', '--')}" in str(model_dir)
            or name in (model_ref.rstrip("/").split("/")[-1], model_dir.name))


def check_adapter(model_ref: str, model_dir: Path, lora_ref: str, a_dir: Path) -> dict:
    """Refuse an adapter made for another model (see module doc). Returns its adapter config."""
    cfg = json.loads((a_dir / "adapter_config.json").read_text())
    recorded = cfg.get("base_model_name_or_path") or ""
    if not _same_model(recorded, model_ref, model_dir):
        raise AdapterError(f"adapter {lora_ref} was trained on {recorded!r}, not on {model_ref}: apply it to its "
                           f"own base (`{recorded}+{lora_ref}`), or, if {model_ref} is a copy of that model, set "
                           f"base_model_name_or_path in {a_dir / 'adapter_config.json'} to it")
    weights = a_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{a_dir} has no adapter_model.safetensors (pickled adapters are not read)")
    from safetensors import safe_open
    with safe_open(str(weights), framework="pt") as h:
        shapes = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    with CheckpointReader(model_dir) as model:
        bad = []
        for k, sh in shapes.items():
            if ".lora_A." not in k:
                continue
            target = k.split(".lora_A.")[0]
            target = target.removeprefix("base_model.model.")
            name = target + ".weight"
            b = shapes.get(k.replace(".lora_A.", ".lora_B."))
            if name not in model:
                bad.append(f"{name} (not in {model_ref})")
                continue
            out_dim, in_dim = model.shape(name)[:2]
            if sh[1] != in_dim or b is None or b[0] != out_dim or b[1] != sh[0]:
                bad.append(f"{name}: weight {[out_dim, in_dim]}, lora_A {list(sh)}, lora_B {list(b or ())}")
        if bad:
            raise AdapterError(f"adapter {lora_ref} does not fit {model_ref} (another base model?):\n  "
                               + "\n  ".join(bad[:5]))
    return cfg


def merged_path(ref: str, model_dir: Path, a_dir: Path, cache: Path) -> Path:
    model, lora = split_ref(ref)
    digest = hashlib.sha256(f"{model_dir.resolve()}|{a_dir.resolve()}".encode()).hexdigest()[:12]
    name = f"{Path(model.rstrip('/')).name}+{Path(lora.rstrip('/')).name}-{digest}"
    return cache / name


def resolve_lora(ref: str, resolve_model: Callable[[str], Path], cache: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None, local: Callable[[str], Path | None] | None = None) -> Path:
    """The folder of MODEL with ADAPTER merged in (from the cache when already merged)."""
    model_ref, lora_ref = split_ref(ref)
    model_dir = resolve_model(model_ref)
    a_dir = adapter_dir(lora_ref, local)
    check_adapter(model_ref, model_dir, lora_ref, a_dir)
    cache = Path(cache) if cache is not None else default_cache()
    out = merged_path(ref, model_dir, a_dir, cache)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"merging adapter {lora_ref} into {model_ref} -> {out}")
    lifecycle.sweep(cache, lifecycle.is_output_temp, log)       # merges of killed processes
    tmp = lifecycle.make_dir(cache, f".{out.name}.tmp-")
    try:
        merge_adapter(model_dir, a_dir, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lifecycle.release(out)
    return out


def merge_adapter(model_dir: Path, a_dir: Path, out: Path) -> None:
    """peft: load the model (its own dtype), apply the adapter, merge_and_unload, save (safetensors);
    the model's tokenizer files come along."""
    import transformers
    from peft import PeftModel

    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    arch = (cfg.architectures or [""])[0]
    auto = transformers.AutoModelForCausalLM if arch.endswith(("ForCausalLM", "LMHeadModel")) or not arch \
        else transformers.AutoModel
    model = auto.from_pretrained(str(model_dir), dtype="auto")
    dtype = next(model.parameters()).dtype
    model = PeftModel.from_pretrained(model, str(a_dir), is_trainable=False).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    copy_model_files(model_dir, out, dtype=dtype, config_overrides=None)
