"""Checkpoint I/O for the merge engine: a lazy reader, a streaming writer, output files.

The engine touches one tensor at a time, so nothing here holds a whole model:

- `CheckpointReader` reads names, shapes and dtypes from the safetensors headers and each tensor
  on demand (`safe_open` memory-maps the files; nothing is read until `get`).
- `ShardedWriter` plans every output shard up front from the tensor specs, so each shard's header
  is written first and each tensor's bytes go straight to their final offset: no shard is ever
  buffered in memory and the tensors may arrive in any order.
- `copy_model_files`, `write_model_card`, `atomic_output_dir`, `check_free_disk` finish the output
  folder safely (temp dir beside the target, renamed into place only when complete).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from . import lifecycle
from .version import __version__

# --------------------------------------------------------------------------------------- caches

CACHE_ENV = "DPPA_UI_CACHE_DIR"


def cache_root() -> Path:
    """Where computed-once results live (delta statistics, APL importance): DPPA_UI_CACHE_DIR, else
    $XDG_CACHE_HOME/dppa-ui, else ~/.cache/dppa-ui. Each user keys its files by the checkpoints'
    identity, so nothing in it goes stale."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dppa-ui"


# --------------------------------------------------------------------------------------- dtypes

# safetensors header dtype strings <-> torch dtypes (only those torch has).
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}
# The output dtypes a merge writes, by the name config.json and the YAML use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes a tensor of `shape` and `dtype` occupies on disk."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def estimate_bytes(specs: Iterable[tuple[str, Sequence[int], torch.dtype]]) -> int:
    """Total payload bytes of `(name, shape, dtype)` specs (what the output weights will take)."""
    return sum(tensor_bytes(shape, dtype) for _, shape, dtype in specs)


# -------------------------------------------------------------------------------------- reading

def _natural_key(name: str) -> list:
    # "layers.10" after "layers.2": compare digit runs as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class DamagedCheckpoint(ValueError):
    """A weights or index file of an input that cannot be read (truncated, corrupted): the message
    names the model ref and the file."""

    def __init__(self, file: str | os.PathLike, detail: str, ref: str | None = None):
        self.file, self.detail, self.ref = Path(file), detail, ref
        super().__init__(self.describe())

    def describe(self, full_path: bool = True) -> str:
        """The message; `full_path=False` names the file only by its folder's ref and its own name
        (the app shows no server paths)."""
        who = f"model {self.ref}: " if self.ref else ""
        where = str(self.file) if full_path or not self.ref else self.file.name
        return (f"{who}{where} is damaged or incomplete ({self.detail}); an interrupted download or copy "
                "leaves such a file: download or copy the model again")


def _detail(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class CheckpointReader:
    """Lazy, tensor-by-tensor access to a checkpoint folder (safetensors; pickles only if allowed).

    Shapes and dtypes come from the file headers; `get(name)` reads one tensor (CPU, stored dtype).
    `names` follows the checkpoint: shard files in order, names within a shard in natural order
    (layer 2 before layer 10). `ref`: the model ref the folder was resolved from, named in the
    errors about its files.
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False, ref: str | None = None):
        self.path = Path(path)
        self.ref = str(ref) if ref is not None and str(ref) != str(path) else None
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(self.path)!r} does not exist")
        self._handles: dict[Path, object] = {}       # file -> safe_open handle or state dict
        self._maps: dict[Path, tuple] = {}            # file -> (mmap, data start, {name: (begin, end)})
        self._where: dict[str, Path] = {}            # tensor name -> file
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self.files = self._safetensors_files()
        self.pickled = not self.files
        if self.pickled:
            self.files = self._pickle_files(allow_pickle)
        self.names: list[str] = []
        for f in self.files:
            self._index_file(f)

    # -- discovery

    def _safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise DamagedCheckpoint(index, f"not a safetensors index: {_detail(e)}", self.ref) from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that are missing: "
                                        f"{', '.join(missing[:5])}; re-download the model")
            return files
        if (self.path / "model.safetensors").is_file():
            return [self.path / "model.safetensors"]
        files = sorted(self.path.glob("*.safetensors"))
        if files and (self.path / "adapter_config.json").is_file():
            raise ValueError(f"{self.path} holds a LoRA/PEFT adapter, not a full model: reference it with "
                             f"its base as BASE_MODEL+{self.path}")
        return files

    def _pickle_files(self, allow_pickle: bool) -> list[Path]:
        bins = sorted(self.path.glob("pytorch_model*.bin")) or sorted(self.path.glob("*.bin"))
        if not bins:
            found = sorted(p.name for p in self.path.iterdir())
            raise FileNotFoundError(f"no weights in {self.path}: expected *.safetensors (found: "
                                    f"{', '.join(found[:12]) or 'nothing'}). If the model only ships "
                                    "pytorch_model*.bin, fetch it with --allow-pickle")
        if not allow_pickle:
            raise ValueError(f"{self.path} has only pickle weights ({', '.join(p.name for p in bins[:5])}) "
                             "and no *.safetensors; pickles can run code when loaded, so they are "
                             "refused. Pass --allow-pickle to load them with torch.load(weights_only=True)")
        return bins

    def _index_file(self, f: Path) -> None:
        try:
            items = self._read_header(f)
        except Exception as e:       # safetensors' SafetensorError, OSError, pickle errors: a damaged file
            raise DamagedCheckpoint(f, _detail(e), self.ref) from None
        for k, shape, dtype in sorted(items, key=lambda t: _natural_key(t[0])):
            if isinstance(dtype, str):
                raise ValueError(f"{f.name}: tensor {k!r} has dtype {dtype}, which torch cannot hold")
            if k in self._where:
                raise ValueError(f"tensor {k!r} appears in both {self._where[k].name} and {f.name} "
                                 f"in {self.path}; remove the stray file")
            self._where[k], self._shape[k], self._dtype[k] = f, shape, dtype
            self.names.append(k)

    def _read_header(self, f: Path) -> list[tuple[str, tuple[int, ...], torch.dtype | str]]:
        """(name, shape, dtype) of every tensor of one file (a safetensors dtype torch lacks: its name)."""
        if f.suffix == ".bin":
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
            self._handles[f] = sd
            return [(k, tuple(v.shape), v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)]
        from safetensors import safe_open
        h = safe_open(str(f), framework="pt", device="cpu")
        self._handles[f] = h
        items = []
        for k in h.keys():
            s = h.get_slice(k)
            st = s.get_dtype()
            items.append((k, tuple(s.get_shape()), _ST_TO_TORCH.get(st, st)))
        return items

    # -- access

    def _check(self, name: str) -> None:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in {self.path}")

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._dtype[name]

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def nbytes(self, name: str) -> int:
        return self.numel(name) * self.dtype(name).itemsize

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names)

    def get(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype). `rows` reads only the first rows (vocab trim)."""
        self._check(name)
        h = self._handles[self._where[name]]
        if self.pickled:
            t = h[name]
            return t[:rows].clone() if rows is not None else t
        if rows is not None:
            return h.get_slice(name)[:rows]
        return h.get_tensor(name)

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy read: a tensor over the memory-mapped file, sharing the page cache.

        The mapping is private (copy-on-write), so nothing can reach the file; callers treat the
        tensor as read-only. Falls back to `get` for pickles, empty or misaligned tensors.
        """
        self._check(name)
        f = self._where[name]
        dtype, shape = self._dtype[name], self._shape[name]
        if self.pickled or f.suffix == ".bin":
            return self.get(name)
        import mmap
        if f not in self._maps:
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[f] = (mm, 8 + header_len,
                             {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"})
        mm, start, offsets = self._maps[f]
        begin, end = offsets[name]
        if end == begin or (start + begin) % dtype.itemsize:
            return self.get(name)
        lo = (start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, lo, start + end - lo)   # start reading ahead if not cached
        t = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        return t.view(shape)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self.names)} tensors, {len(self.files)} files)"

    def close(self) -> None:
        # Dropping the handles unmaps the files (views still alive keep their mapping open).
        self._handles.clear()
        self._maps.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read into memory (CPU, stored dtypes)."""
    with CheckpointReader(path, allow_pickle=allow_pickle) as r:
        return {n: r.get(n) for n in r.names}


# -------------------------------------------------------------------------------- compatibility

def untied_missing(config, missing: Iterable[str]) -> list[str]:
    """The keys of `missing` not explained by a tied lm_head (which shares the embedding's storage;
    multimodal configs say so on their text config)."""
    text = getattr(config, "get_text_config", lambda: config)()
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    return [k for k in missing if not (tied and k.startswith("lm_head"))]


class IncompatibleModels(ValueError):
    """The fine-tunes do not have the base's tensors and shapes."""


# Tensors whose dim 0 is the vocabulary (input embeddings and output heads of common families).
_VOCAB_RE = re.compile(r"(embed_tokens|embed_in|embed_out|wte|word_embeddings|tok_embeddings|"
                       r"lm_head|(^|\.)output)(\.weight|\.bias)?$")


def is_vocab_tensor(name: str) -> bool:
    """True for embedding / LM-head tensors whose rows are vocabulary entries."""
    return bool(_VOCAB_RE.search(name))


def _vocab_only(name: str, a: tuple, b: tuple) -> bool:
    return (is_vocab_tensor(name) and len(a) == len(b) and len(a) >= 1 and a[1:] == b[1:]
            and a[0] != b[0])


def _few(items: list[str], n: int = 5) -> str:
    more = f"\n  ... and {len(items) - n} more" if len(items) > n else ""
    return "".join(f"\n  {s}" for s in items[:n]) + more


def check_compatible(base: CheckpointReader, others: Mapping[str, CheckpointReader],
                     allow_vocab_trim: bool = False) -> dict[str, tuple[int, ...]]:
    """Check every model has the base's tensors with the base's shapes; return the shape to merge.

    Returns `{name: shape}` in the base's order. With `allow_vocab_trim`, embedding/lm_head
    tensors differing only in rows (vocabulary size) get the common rows (min over all models).
    Raises `IncompatibleModels` listing the first few problems otherwise.
    """
    problems: list[str] = []          # missing / extra / non-vocab shape differences
    vocab: list[str] = []             # shape differences only in vocabulary rows
    shapes: dict[str, tuple[int, ...]] = {n: tuple(base.shape(n)) for n in base.names}
    for ref, r in others.items():
        missing = [n for n in base.names if n not in r]
        if missing:
            problems.append(f"{ref} lacks {len(missing)} tensor(s) of the base:" + _few(
                [f"{n} {list(base.shape(n))}" for n in missing]))
        extra = [n for n in r.names if n not in base]
        if extra:
            problems.append(f"{ref} has {len(extra)} tensor(s) the base lacks:" + _few(
                [f"{n} {list(r.shape(n))}" for n in extra]))
        differ = []
        for n in base.names:
            if n not in r:
                continue
            a, b = tuple(base.shape(n)), tuple(r.shape(n))
            if a == b:
                continue
            if _vocab_only(n, a, b):
                vocab.append(f"{ref} {n}: base {list(a)} vs {list(b)}")
                shapes[n] = (min(shapes[n][0], b[0]),) + a[1:]
            else:
                differ.append(f"{n}: base {list(a)} vs {list(b)}")
        if differ:
            problems.append(f"{ref} has {len(differ)} tensor(s) whose shape differs from the base:"
                            + _few(differ))
    if not problems and (allow_vocab_trim or not vocab):
        return shapes
    if not problems:
        raise IncompatibleModels(
            "the models differ only in vocabulary size (rows of the embedding / lm_head):"
            + _few(vocab) + "\nPass --allow-vocab-trim to merge the rows all models share "
            "(the extra tokens of the larger vocabularies are dropped).")
    hint = ("\n(embedding / lm_head rows also differ in vocabulary size; --allow-vocab-trim would "
            "merge the common rows of those)") if vocab and not allow_vocab_trim else ""
    raise IncompatibleModels("these models cannot be merged with the base (same architecture and "
                             "size needed):\n" + "\n".join(problems) + hint)


# -------------------------------------------------------------------------------------- writing

def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Streaming safetensors writer: all headers are planned from the specs before any data.

    Shards follow the given order (a new shard starts when the next tensor would pass
    `max_shard_bytes`; a tensor larger than the limit gets its own shard). Each file is created
    with its final header and size; `write(name, tensor)` puts the bytes at their offset, in any
    order, from any thread. `close()` checks that every tensor arrived and writes the index.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9, metadata: Mapping[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self._spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        shards: list[list[str]] = []
        size = 0
        for name, shape, dtype in specs:
            if name in self._spec:
                raise ValueError(f"tensor {name!r} is listed twice")
            if dtype not in _TORCH_TO_ST:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nb = tensor_bytes(shape, dtype)
            if not shards or (shards[-1] and size + nb > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nb
            self._spec[name] = (tuple(int(d) for d in shape), dtype)
        n = len(shards)
        self.files: list[Path] = [self.out_dir / _shard_name(i, n) for i in range(n)]
        self.weight_map: dict[str, str] = {}
        self._where: dict[str, tuple[int, int, int]] = {}   # name -> (shard, abs offset, nbytes)
        self._fh = []
        self.total_size = 0
        try:
            for i, names in enumerate(shards):
                self._fh.append(self._create_shard(i, names, metadata))
        except BaseException:
            self._close_files()
            raise
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._result: list[Path] = []

    def _create_shard(self, i: int, names: list[str], metadata: Mapping[str, str]):
        # Within a shard, larger items first (stable) keeps every tensor aligned to its item size,
        # as safetensors itself does; the header is padded to 8 bytes.
        order = sorted(names, key=lambda k: -self._spec[k][1].itemsize)
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        for k in order:
            shape, dtype = self._spec[k]
            nb = tensor_bytes(shape, dtype)
            header[k] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        start = 8 + len(blob)
        for k in order:
            a, b = header[k]["data_offsets"]
            self._where[k] = (i, start + a, b - a)
            self.weight_map[k] = self.files[i].name
        self.total_size += off
        fh = open(self.files[i], "w+b")
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(start + off)     # sparse until written; the final size is known now
        return fh

    @property
    def names(self) -> list[str]:
        return list(self._spec)

    @property
    def missing(self) -> list[str]:
        return [n for n in self._spec if n not in self._written]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (cast to its planned dtype) at its planned offset."""
        if name not in self._spec:
            raise KeyError(f"tensor {name!r} was not planned for this output")
        shape, dtype = self._spec[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, planned {list(shape)}")
        shard, off, nb = self._where[name]
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        assert data.numel() == nb
        buf = memoryview(data.numpy())
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            fh = self._fh[shard]
            fh.seek(off)
            fh.write(buf)
            self._written.add(name)

    def _close_files(self) -> None:
        for fh in self._fh:
            with contextlib.suppress(Exception):
                fh.close()
        self._fh = []

    def close(self) -> list[Path]:
        """Finish the output: every tensor must have been written. Returns the files written."""
        if self._closed:
            return self._result
        missing = self.missing
        for fh in self._fh:
            fh.flush()
        self._close_files()
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. "
                               f"{', '.join(missing[:5])}")
        written = list(self.files)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            p = self.out_dir / "model.safetensors.index.json"
            p.write_text(json.dumps(index, indent=2) + "\n")
            written.append(p)
        self._closed, self._result = True, written
        return written

    def abort(self) -> None:
        """Close the files without checking (the caller discards the output folder)."""
        self._close_files()
        self._closed = True

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------- output folder

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "chat_template.jinja", "chat_template.json")


def _set_dtype(cfg: dict, name: str) -> None:
    # transformers 5 writes `dtype`; older configs carry `torch_dtype`; nested sub-configs
    # (text_config of multimodal models) carry their own.
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    for v in cfg.values():
        if isinstance(v, dict) and ("dtype" in v or "torch_dtype" in v):
            _set_dtype(v, name)


def copy_model_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype,
                     tokenizer_dir: str | os.PathLike | None = None, chat_template: str | None = None,
                     config_overrides: Mapping[str, object] | None = None) -> list[Path]:
    """Copy everything but the weights: config (dtype set), generation config, tokenizer, template.

    Tokenizer files and the chat template come from `tokenizer_dir` (default `src_dir`);
    `chat_template` (a Jinja string) replaces the template. `config_overrides` are set in
    config.json (e.g. `vocab_size` after a vocab trim). Returns the files written.
    """
    src, out = Path(src_dir), Path(out_dir)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else src
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if (src / "config.json").is_file():
        cfg = json.loads((src / "config.json").read_text())
        _set_dtype(cfg, dtype_name(dtype))
        cfg.update(config_overrides or {})
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(out / "config.json")
    elif config_overrides:
        raise FileNotFoundError(f"no config.json in {src} to apply {dict(config_overrides)} to")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
        written.append(out / "generation_config.json")
    names = set(_TOKENIZER_FILES) | {p.name for p in tok.glob("*.model")} | {
        p.name for p in tok.glob("tokenizer*") if p.is_file()}
    if chat_template is not None:
        names -= {"chat_template.jinja", "chat_template.json"}
    for n in sorted(names):
        if (tok / n).is_file():
            shutil.copyfile(tok / n, out / n)
            written.append(out / n)
    if chat_template is None and (tok / "additional_chat_templates").is_dir():
        shutil.copytree(tok / "additional_chat_templates", out / "additional_chat_templates",
                        dirs_exist_ok=True)
        written.append(out / "additional_chat_templates")
    if chat_template is not None:
        # The given template wins: drop any inline template so transformers reads only ours.
        tc = out / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text())
            if cfg.pop("chat_template", None) is not None:
                tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(chat_template)
        written.append(out / "chat_template.jinja")
    return written


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_overrides(dirs: Sequence[str | os.PathLike], origin: Sequence[tuple[int, int]],
                    donor_dir: str | os.PathLike) -> dict:
    """config.json changes for a model stacked from layers of others: the layer count (whichever of
    num_hidden_layers / n_layer / num_layers / n_layers the donor's config has) and per-layer
    lists (`layer_types`) taken from each output layer's source. `origin`: per output layer,
    (index into dirs, that model's layer)."""
    cfg = json.loads((Path(donor_dir) / "config.json").read_text())
    out: dict = {}
    keys = [k for k in _LAYER_KEYS if k in cfg] or ["num_hidden_layers"]
    for k in keys:
        out[k] = len(origin)
    src_cfgs: dict[int, dict] = {}
    for key in ("layer_types",):
        if isinstance(cfg.get(key), list):
            vals = []
            for i, layer in origin:
                c = src_cfgs.setdefault(i, json.loads((Path(dirs[i]) / "config.json").read_text()))
                vals.append(c[key][layer])
            out[key] = vals
    return out


def chat_template_of(folder: str | os.PathLike) -> str | None:
    """A model folder's chat template (chat_template.jinja, else tokenizer_config.json's), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text().strip() or None
    try:
        t = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(t, list):          # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t.strip() if isinstance(t, str) and t.strip() else None


def most_common_template(folders: Sequence[str | os.PathLike]) -> str | None:
    """mergekit's `chat_template: auto`: the template most of the inputs carry (first seen on a tie)."""
    from collections import Counter
    found = [t for t in (chat_template_of(f) for f in folders) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output (for the model card)."""
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "transformers", "safetensors", "dppa-ui"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            if pkg == "dppa-ui":
                out[pkg] = __version__
            else:
                out[pkg] = "not installed"
    return out


def write_model_card(out_dir: str | os.PathLike, *, base_ref: str, model_refs: Sequence[str],
                     method: str, seed: int | None, yaml_text: str,
                     extra: Mapping[str, object] | None = None) -> Path:
    """Write README.md: front matter (every parent as base_model, tags), versions, the YAML."""
    import yaml
    parents = list(dict.fromkeys([base_ref, *model_refs]))
    front = {"base_model": parents, "tags": ["merge", "dppa-ui", method],
             "library_name": "transformers"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# Merged model", "",
             f"This model was made with dppa-ui by merging {len(model_refs)} model(s) into "
             f"`{base_ref}` with the **{method}** method.", "",
             "## Models", "", f"- base: `{base_ref}`"]
    lines += [f"- `{r}`" for r in model_refs]
    lines += ["", "## Settings", "", f"- method: `{method}`", f"- seed: `{seed}`"]
    lines += [f"- {k}: `{v}`" for k, v in (extra or {}).items()]
    lines += ["", "## Library versions", ""]
    lines += [f"- {k}: {v}" for k, v in library_versions().items()]
    lines += ["", "## Reproduce", "",
              "Save the configuration below as `merge.yaml` and run "
              "`python -m dppa_ui merge merge.yaml --out OUT_DIR`:", "",
              "```yaml", yaml_text.rstrip("\n"), "```", ""]
    p = Path(out_dir) / "README.md"
    p.write_text("\n".join(lines))
    return p


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out`; rename it to `out` only if the block completes.

    Refuses (at entry, before any work) an existing non-empty `out` unless `overwrite`. On an
    exception, Ctrl-C or SIGTERM the temp dir is removed and the error re-raised; `out` is
    untouched. The temp dir records this process as its owner (lifecycle.make_dir), so when the
    process is killed outright the next run beside `out` removes it; `out` gets the mode `mkdir`
    gives under the user's umask.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty; pass "
                              "--overwrite to replace it, or choose another folder")
    with lifecycle.busy():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = lifecycle.make_dir(out.parent, f".{out.name}.tmp-")
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            if out.exists():
                # Keep the old output until the new one is in place, then delete it. The holder has no
                # owner while it holds the only copy of the old output, so no sweep can take it.
                old = lifecycle.make_dir(out.parent, f".{out.name}.old-")
                lifecycle.release(old)
                os.replace(out, old / out.name)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old / out.name, out)
                    raise
                lifecycle.claim(old)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        lifecycle.release(out)


class NotEnoughDiskSpace(OSError):
    """The output filesystem lacks the space the merge needs."""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@contextlib.contextmanager
def naming_full_disk(folder: str | os.PathLike, needed_bytes: int) -> Iterator[None]:
    """Turn a full disk (ENOSPC, or a quota: EDQUOT) inside the block into `NotEnoughDiskSpace`
    naming `folder` and the space the output needs (the bare OSError names neither)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, NotEnoughDiskSpace):
            raise
        try:
            free = f", {_gb(shutil.disk_usage(folder).free)} is free now"
        except OSError:
            free = ""
        raise NotEnoughDiskSpace(f"the disk filled up while writing the output in {str(folder)!r}: it needs "
                                 f"about {_gb(needed_bytes)}{free}; free some space or choose an output "
                                 "folder on another disk") from None


def check_free_disk(path: str | os.PathLike, needed_bytes: int) -> int:
    """Raise `NotEnoughDiskSpace` unless the filesystem holding `path` has `needed_bytes` free.

    `path` need not exist yet (its nearest existing parent is checked). Returns the free bytes.
    """
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed_bytes:
        raise NotEnoughDiskSpace(f"not enough disk space for the output in {str(p)!r}: it needs about "
                                 f"{_gb(needed_bytes)}, only {_gb(free)} is free; free some space or "
                                 "choose an output folder on another disk")
    return free
