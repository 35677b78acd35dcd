"""The one model builder: a checkpoint folder as a transformers causal LM for chat and scoring, at
any size, with accelerate's big-model loading.

  skeleton(dir)        the model built on the meta device (thread-local): no memory
  model_bytes(dir, dt) its weights' bytes in dtype dt, from that skeleton (what estimates show)
  placement(dir, ...) where it would go: dtype, device map and whether layers go to disk
  load(dir, ...)       the model so placed (`device_map="auto"`, `max_memory` from the free GPU
                       and CPU memory, disk offload to `offload_dir` when needed) + its tokenizer;
                       `placed=False`: float32, whole on the CPU (the private copies that scoring,
                       searches and APL copy weights into); a SMILE folder through smile_model

Float32 is preferred on the CPU (the scores are computed in float32 everywhere) when it fits the
budget; otherwise the checkpoint's own dtype.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import smile_model
from .io import DTYPES
from .refs import files_identity, resolve_model

def _env_gb(name: str) -> float | None:
    v = os.environ.get(name)
    try:
        return float(v) if v else None
    except ValueError:
        return None


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json names (the checkpoint's), float32 when it names none."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name), torch.float32)


def skeleton(model_dir: str | Path):
    """The causal LM of `model_dir/config.json` with every weight on the meta device. Built under
    torch's meta device context, which holds for this thread only: accelerate's init_empty_weights
    patches nn.Module for every thread, so a model loading meanwhile in another thread (a chat, a
    score, the warm-up) would get meta weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"cannot read {Path(model_dir).name}/config.json: {type(e).__name__}: {e}") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except Exception as e:
            raise ValueError(f"{Path(model_dir).name} is not a causal language model transformers can build: "
                             f"{type(e).__name__}: {e}") from None


def model_bytes(model_dir: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's weights in `dtype` (default: the checkpoint's), from its skeleton."""
    return _bytes_in(skeleton(model_dir), dtype or stored_dtype(model_dir))


def _bytes_in(sk, dtype: torch.dtype) -> int:
    """Bytes of the meta skeleton `sk` once its floating weights are in `dtype` (it is cast, on the
    meta device, where a cast only relabels): accelerate's `compute_module_sizes(dtype=)` counts
    min(dtype, stored dtype) per tensor, so a bf16 checkpoint planned in float32 came out at half."""
    from accelerate.utils import compute_module_sizes
    return int(compute_module_sizes(sk.to(dtype))[""])


def free_memory() -> dict:
    """Bytes free per device: {"cpu": n} plus {i: n} per CUDA GPU. DPPA_UI_CPU_GB caps the CPU."""
    import psutil
    cpu = int(psutil.virtual_memory().available)
    cap = _env_gb("DPPA_UI_CPU_GB")
    out: dict = {"cpu": min(cpu, int(cap * (1 << 30))) if cap else cpu}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[i] = int(torch.cuda.mem_get_info(i)[0])
    return out


@dataclass
class Placement:
    dtype: torch.dtype
    bytes: int                                  # the weights in that dtype
    max_memory: dict                            # what device_map="auto" may use per device
    offload: bool                               # some layers go to disk
    device_map: dict = field(default_factory=dict)

    def describe(self) -> str:
        where = sorted({str(v) for v in self.device_map.values()}) or ["cpu"]
        return (f"{self.bytes / 1e9:.2f} GB in {str(self.dtype).removeprefix('torch.')} on {', '.join(where)}"
                + (" (layers offloaded to disk: slow)" if self.offload else ""))


def placement(model_dir: str | Path, *, max_memory: dict | None = None, dtype: torch.dtype | None = None,
              headroom: float = 0.8) -> Placement:
    """Where the model of `model_dir` would go: accelerate's auto device map over `max_memory`
    (default: `headroom` x what is free now), in float32 when it fits on the CPU, else stored."""
    from accelerate import infer_auto_device_map
    model_dir = Path(model_dir)
    budget = dict(max_memory) if max_memory is not None else {k: int(v * headroom) for k, v in free_memory().items()}
    sk = skeleton(model_dir)
    if dtype is None:
        f32 = _bytes_in(sk, torch.float32)
        on_gpu = any(k != "cpu" for k in budget)
        dtype = torch.float32 if not on_gpu and f32 <= budget.get("cpu", 0) else stored_dtype(model_dir)
        if on_gpu and dtype == torch.float32:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    size = _bytes_in(sk, dtype)          # sk is in `dtype` from here: the device map sizes it so too
    no_split = getattr(sk, "_no_split_modules", None) or []
    dmap = infer_auto_device_map(sk, max_memory={**budget, "disk": 1 << 60}, dtype=dtype,
                                 no_split_module_classes=list(no_split))
    return Placement(dtype=dtype, bytes=size, max_memory=budget, offload="disk" in dmap.values(),
                     device_map=dict(dmap))


def load(model_ref: str | Path, *, max_memory: dict | None = None, dtype: torch.dtype | None = None,
         offload_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
         chat_template: str | None = None, placed: bool = True):
    """(model, tokenizer) of a checkpoint folder or ref, eval mode, placed by `placement`. Layers that
    fit nowhere are offloaded to `offload_dir` (required then). A SMILE folder is built by
    `smile_model.load`, whole on one device (see `load_smile`). `placed=False`: float32, whole on
    the CPU, no planning (what scoring a state dict copies weights into)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = resolve_model(model_ref)
    if not placed:
        if smile_model.is_smile_folder(model_dir):
            return smile_model.load(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model.eval()
        return model, AutoTokenizer.from_pretrained(str(model_dir))
    if smile_model.is_smile_folder(model_dir):
        return load_smile(model_dir, max_memory=max_memory, tokenizer_dir=tokenizer_dir, chat_template=chat_template)
    p = placement(model_dir, max_memory=max_memory, dtype=dtype)
    kwargs: dict = {"dtype": p.dtype}
    if p.offload or any(v != "cpu" for v in p.device_map.values()):
        if p.offload and offload_dir is None:
            raise MemoryError(f"{Path(model_dir).name} needs {p.bytes / 1e9:.2f} GB and does not fit in memory; "
                              "it can only run with layers offloaded to disk (give an offload folder)")
        kwargs.update(device_map=p.device_map, offload_folder=str(offload_dir) if offload_dir else None)
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    except Exception as e:
        raise ValueError(f"no usable tokenizer in {Path(tokenizer_dir or model_dir).name}: "
                         f"{type(e).__name__}: {e}") from None
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()          # a per-tensor bar on the server log per chat model
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    if chat_template:
        tok.chat_template = chat_template
    model.placement = p
    return model, tok


def load_smile(model_dir: Path, *, max_memory: dict | None = None, tokenizer_dir: str | Path | None = None,
               chat_template: str | None = None):
    """(model, tokenizer) of a SMILE folder (smile_model.load: no remote code), float32, on the first
    GPU when it fits there, else on the CPU; its experts are not split across devices or offloaded,
    so a folder larger than the free memory is refused with the numbers."""
    spec = json.loads((Path(model_dir) / smile_model.SMILE_CONFIG).read_text())
    size = int((spec.get("parameters") or {}).get("total", 0)) * 4
    budget = dict(max_memory) if max_memory is not None else {k: int(v * 0.8) for k, v in free_memory().items()}
    device = next((f"cuda:{k}" for k, v in budget.items() if k != "cpu" and size <= v), None)
    if device is None:
        if size > budget.get("cpu", 0):
            raise MemoryError(f"{Path(model_dir).name} is a SMILE model of {size / 1e9:.2f} GB in float32 and does "
                              f"not fit in the {budget.get('cpu', 0) / 1e9:.2f} GB free; SMILE models load whole "
                              f"(lower rank_of_expert to shrink it)")
        device = "cpu"
    model, tok = smile_model.load(model_dir, device=device)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if chat_template:
        tok.chat_template = chat_template
    model.placement = Placement(dtype=torch.float32, bytes=size, max_memory=budget, offload=False,
                                device_map={"": device})
    return model, tok


class ModelPool:
    """Loaded (model, tokenizer) pairs shared by every session, least recently used first out.
    Keyed by the checkpoint's file identity (and tokenizer / template), so a re-merged folder is
    loaded again and the demo models are loaded once for everybody."""

    def __init__(self, max_models: int = 4):
        self.max_models = max_models
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
            chat_template: str | None = None, offload_dir: str | Path | None = None,
            max_memory: dict | None = None):
        model_dir = resolve_model(model_dir)
        key = (files_identity(model_dir), str(tokenizer_dir or ""), chat_template or "")
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        pair = load(model_dir, tokenizer_dir=tokenizer_dir, chat_template=chat_template, offload_dir=offload_dir,
                    max_memory=max_memory)
        with self._lock:
            self.loads += 1
            self._models[key] = pair
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return pair

    def drop(self, model_dir: str | Path) -> None:
        """Forget every model loaded from `model_dir` (its folder is about to be deleted)."""
        prefix = str(Path(model_dir).resolve())
        with self._lock:
            for key in [k for k in self._models if k[0][0] == prefix]:
                del self._models[key]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


POOL = ModelPool(int(os.environ.get("DPPA_UI_MAX_MODELS", "4") or 4))


def input_device(model) -> torch.device:
    """Where a model's inputs go: its first placed module's device (accelerate's hooks move the
    offloaded layers in as they run), the CPU when every layer lives on disk."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        for where in dmap.values():
            if where not in ("disk", "meta"):
                return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        return torch.device("cpu")
    return next(model.parameters()).device


def warm_up(model_dir: str | Path | None = None) -> None:
    """Import what building a chat model needs (transformers' model classes, accelerate's device
    maps: seconds on a small machine) and plan `model_dir` once, so the first chat does not pay it."""
    import accelerate.utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    if model_dir is not None:
        try:
            placement(model_dir)
        except (OSError, ValueError):
            pass
