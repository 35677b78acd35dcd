"""Shared test fixtures: offline environment, tiny random Llama checkpoints, weight readers.

Everything is built here on CPU in a fraction of a second per model: no hub, no demo zoo.

Fixtures
  offline_env      (autouse) HF_HUB_OFFLINE=1 and friends, so nothing ever reaches the network.
  tiny_llama       factory: tiny_llama(name, n_ft=2, seed=0, dtype=torch.float32, tie=False,
                   max_shard_size=None, scale=0.02, vocab=64) -> TinyFamily (cached per arguments
                   for the whole session; treat its folders as read-only).
  tiny_family      the default family: float32 base + 2 fine-tunes.
  read_weights     read_weights(dir) -> {name: tensor} over every *.safetensors file of a folder.
  char_tokenizer   (function) the 64-token character tokenizer every tiny model is saved with
  chat_llama       (function) a tiny LlamaForCausalLM whose greedy replies are never empty
DEMO_FTS: the demo family's four fine-tunes (assets/zoo), as the app's tests load them.
"""
from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported anywhere in the session.
_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# The app's statistics cache goes to a fresh folder per test session, never to ~/.cache.
import tempfile  # noqa: E402
os.environ.setdefault("DPPA_UI_CACHE_DIR", tempfile.mkdtemp(prefix="dppa-ui-test-cache-"))

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEMO_FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("ABCDEFGHIJKLMNOPQRSTUV")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'] + eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def char_tokenizer(template: str | None = TEMPLATE):
    """A 64-token character-level fast tokenizer (ids 0-5 special), with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
                                   clean_up_tokenization_spaces=False)
    if template:
        fast.chat_template = template
    return fast


def chat_llama(seed: int = 0):
    """A tiny LlamaForCausalLM (random, eval mode) with large logits on the characters and 0 on the
    specials, so greedy replies are never empty."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY_LLAMA, vocab_size=64, max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[:6] = 0.0
    return model


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    """Every test runs offline, without telemetry or analytics."""
    for k, v in _ENV.items():
        monkeypatch.setenv(k, v)
    yield


def heavy_tailed(shape, generator: torch.Generator, scale: float = 0.02, df: int = 3) -> torch.Tensor:
    """Student-t(df) noise times `scale`, plus a few large outliers: deltas like a real fine-tune's
    (most entries small, some far out), which is what DP's outlier ratios feed on."""
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((df, *shape), generator=generator).pow(2).sum(0) / df
    t = z / chi2.clamp_min(1e-6).sqrt()
    spikes = (torch.rand(shape, generator=generator) < 0.01) * torch.randn(shape, generator=generator) * 10
    return (t + spikes) * scale


def read_weights_from(folder) -> dict[str, torch.Tensor]:
    """All tensors of every *.safetensors file in `folder` (sharded or not)."""
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    for f in files:
        out.update(load_file(str(f)))
    return out


def write_tiny_llama(path, state_dict: dict[str, torch.Tensor] | None = None, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32, tie: bool = False, max_shard_size=None,
                     vocab: int = 64) -> dict[str, torch.Tensor]:
    """Save a tiny LlamaForCausalLM (`chat_llama`'s init from `seed`, or the given weights) with
    save_pretrained, and the character tokenizer (64-entry vocabularies); return the tensors as
    stored on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if vocab == 64 and not tie:
        model = chat_llama(seed)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=vocab, tie_word_embeddings=tie))
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected, unexpected
        assert all(tie and "lm_head" in k for k in missing), missing
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    if vocab == 64:
        char_tokenizer().save_pretrained(str(path))
    return read_weights_from(path)


@dataclass
class TinyFamily:
    """A base checkpoint and fine-tunes of it (base + heavy-tailed deltas)."""
    base: Path
    fts: list[Path]
    base_sd: dict[str, torch.Tensor] = field(repr=False)        # as stored on disk
    ft_sds: list[dict[str, torch.Tensor]] = field(repr=False)


def make_family(root, n_ft: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = False,
                max_shard_size=None, scale: float = 0.02, vocab: int = 64) -> TinyFamily:
    root = Path(root)
    base_sd = write_tiny_llama(root / "base", seed=seed, dtype=dtype, tie=tie,
                               max_shard_size=max_shard_size, vocab=vocab)
    fts, ft_sds = [], []
    for i in range(n_ft):
        g = torch.Generator().manual_seed(1000 * seed + i + 1)
        # sorted names: the same deltas whatever the file layout (sharded or not)
        sd = {k: (base_sd[k].float() + heavy_tailed(base_sd[k].shape, g, scale))
              if base_sd[k].is_floating_point() else base_sd[k] for k in sorted(base_sd)}
        path = root / f"ft{i}"
        ft_sds.append(write_tiny_llama(path, sd, seed=seed, dtype=dtype, tie=tie,
                                       max_shard_size=max_shard_size, vocab=vocab))
        fts.append(path)
    return TinyFamily(root / "base", fts, base_sd, ft_sds)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Factory of tiny model families, cached per arguments for the session (read-only folders)."""
    cache: dict = {}

    def make(name: str = "default", **kw) -> TinyFamily:
        key = (name, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_family(tmp_path_factory.mktemp(f"tiny-{name}"), **kw)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def tiny_family(tiny_llama) -> TinyFamily:
    return tiny_llama()


@pytest.fixture(scope="session")
def read_weights():
    return read_weights_from


@pytest.fixture(scope="module")
def one_thread():
    """For the demo models (tiny): one torch thread is as fast on a quiet machine and far faster on
    a busy one. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
