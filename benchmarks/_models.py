"""Random Llama-shaped checkpoints for the benchmarks: a base plus fine-tunes.

The fine-tunes are base + delta where the delta looks like a real fine-tune's as far as
the merge methods can tell: Laplace noise (heavy-tailed, kurtosis 6) whose scale varies per
layer and per module (so DPPA's dynamic pruning has outlier structure to react to) plus a
few large outliers in every row (the "massive activations"-like entries that magnitude
pruning always keeps). Nothing here is trained; the models are only good for timing and
for comparing merge tools tensor by tensor.

Files are written the way `save_pretrained` writes them (transformers' LlamaConfig names,
config.json, model.safetensors with {"format": "pt"} metadata), so transformers, mergekit
and dppa_ui all read them. Built models are cached by shape under `cache_dir`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Bump when the generated values change, so stale caches are not reused.
GENERATOR_VERSION = 1

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    head_dim: int = 64
    tie_embeddings: bool = False

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor names and shapes, in the order save_pretrained would list them."""
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for proj in ("k", "o", "q", "v"):
                shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def largest_tensor(self) -> int:
        return max(math.prod(s) for s in self.tensor_shapes().values())

    def key(self, dtype: str) -> str:
        tie = "-tied" if self.tie_embeddings else ""
        return (f"llama-v{self.vocab}-h{self.hidden}-i{self.intermediate}-L{self.layers}"
                f"-hd{self.head_dim}{tie}-{dtype}-g{GENERATOR_VERSION}")


def _intermediate(hidden: int) -> int:
    # Llama's SwiGLU width: 8/3·h rounded up to a multiple of 64 (~2.7×h).
    return int(math.ceil(8 * hidden / 3 / 64) * 64)


def _layer_params(hidden: int) -> int:
    return 4 * hidden * hidden + 3 * hidden * _intermediate(hidden) + 2 * hidden


def shape_for(params: float, layers: int | None = None, vocab: int = 32000) -> LlamaShape:
    """A Llama shape of about `params` parameters.

    Width is chosen so depth ≈ hidden/48 (roughly the aspect ratio of small Llamas), then
    the depth that hits `params`. `layers` overrides the depth with the width kept, which is
    how the benchmark shows memory does not grow with depth.
    """
    best = None
    for hidden in range(128, 8193, 128):
        emb = 2 * vocab * hidden + hidden
        n = round((params - emb) / _layer_params(hidden))
        if n < 1:
            continue
        miss = abs(n - hidden / 48)
        if best is None or miss < best[0]:
            best = (miss, hidden, n)
    if best is None:  # params too small for even one layer at width 128
        best = (0, 128, 1)
    _, hidden, n = best
    return LlamaShape(vocab=vocab, hidden=hidden, intermediate=_intermediate(hidden),
                      layers=layers if layers is not None else n)


def _generator(seed: int, model_index: int, name: str) -> torch.Generator:
    # One generator per tensor: values do not depend on the order tensors are built in.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + model_index * 7919 + zlib.crc32(name.encode())) % 2**63)
    return g


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _generator(seed, 0, name)
    if len(shape) == 1:  # RMSNorm gains sit around 1
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _block(name: str) -> int | None:
    parts = name.split(".")
    for p in parts:
        if p.isdigit():
            return int(p)
    return None


def delta_tensor(name: str, shape: tuple[int, ...], seed: int, model_index: int,
                 scale: float = 1e-3, outliers_per_row: int = 3,
                 outlier_factor: tuple[float, float] = (15.0, 40.0)) -> torch.Tensor:
    """A heavy-tailed fine-tune delta: Laplace(0, s) plus a few ±(15..40)·s outliers per row.

    s varies log-normally per (model, layer) and per (model, module), so blocks and modules
    differ in their outlier share the way they do in real fine-tunes.
    """
    g = _generator(seed, model_index, name)
    block = _block(name)
    gb = _generator(seed, model_index, f"block:{block}")
    s = scale * math.exp(0.4 * torch.randn((), generator=gb).item())
    s *= math.exp(0.25 * torch.randn((), generator=g).item())
    # Laplace via a signed exponential: cheap and heavy-tailed.
    d = torch.empty(shape).exponential_(generator=g)
    sign = torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
    d.mul_(sign).mul_(s)
    rows = d.reshape(-1, shape[-1]) if len(shape) > 1 else d.reshape(1, -1)
    k = min(outliers_per_row, rows.shape[1])
    if k:
        cols = torch.randint(0, rows.shape[1], (rows.shape[0], k), generator=g)
        lo, hi = outlier_factor
        mag = lo + (hi - lo) * torch.rand((rows.shape[0], k), generator=g)
        sgn = torch.randint(0, 2, (rows.shape[0], k), generator=g) * 2 - 1
        rows.scatter_(1, cols, mag * sgn * s)
    return d


def _write_model(path: Path, shape: LlamaShape, tensors: dict[str, torch.Tensor], dtype: str):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tie_embeddings,
        max_position_embeddings=2048, architectures=["LlamaForCausalLM"], dtype=dtype,
    )
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def build_models(shape: LlamaShape, n_finetunes: int = 3, dtype: str = "bfloat16",
                 cache_dir: str | os.PathLike = "bench-models", seed: int = 0,
                 log=print) -> tuple[Path, list[Path]]:
    """Build (or reuse from the cache) base + n fine-tunes; returns their directories."""
    root = Path(cache_dir) / (shape.key(dtype) + f"-s{seed}")
    names = ["base"] + [f"ft{i}" for i in range(1, n_finetunes + 1)]
    paths = [root / n for n in names]
    todo = [p for p in paths if not (p / "model.safetensors").exists()]
    if not todo:
        return paths[0], paths[1:]
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape.json").write_text(json.dumps(asdict(shape), indent=1))
    tdtype = DTYPES[dtype]
    shapes = shape.tensor_shapes()
    log(f"building {len(todo)} model(s) of {shape.n_params() / 1e6:.1f} M params "
        f"({dtype}) in {root}")
    base = {n: base_tensor(n, s, seed).to(tdtype) for n, s in shapes.items()}
    for index, path in enumerate(paths):
        if path not in todo:
            continue
        if index == 0:
            tensors = base
        else:
            tensors = {n: (base[n].float() + delta_tensor(n, s, seed, index)).to(tdtype)
                       for n, s in shapes.items()}
        # Write beside the target and rename, so an interrupted build is never cached.
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=root))
        _write_model(tmp, shape, tensors, dtype)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        del tensors
    return paths[0], paths[1:]
