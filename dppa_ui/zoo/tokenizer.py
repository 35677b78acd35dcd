"""The demo family's character-level tokenizer, saved as a standard HF tokenizer.

One token per printable ASCII character (plus newline), five specials and <unk> (any other
character, so pasted text never breaks the tokenizer): 102 tokens. Any HF tool
loads it with `AutoTokenizer.from_pretrained(dir)`; its chat template renders
`<bos><|user|>{question}<|assistant|>{answer}<eos>`, the exact format the fine-tunes were trained on.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"
SPECIALS = [PAD, BOS, EOS, USER, ASSISTANT]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
UNK = "<unk>"
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS + [UNK])}
PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = range(5)
UNK_ID = VOCAB[UNK]

# Jinja chat template (HF format). The generation prompt ends with <|assistant|>: the model answers
# right after it, with no space or newline, and stops with <eos>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def encode(text: str) -> list[int]:
    """Characters to ids, no specials (fast path used in training; same ids as the HF tokenizer).

    Characters outside the vocabulary are an error: the demo data never contains them.
    """
    try:
        return [VOCAB[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the demo tokenizer's vocabulary") from None


def chat_ids(prompt: str) -> list[int]:
    """Ids of `<bos><|user|>{prompt}<|assistant|>`: what the model sees before its answer."""
    return [BOS_ID, USER_ID] + encode(prompt) + [ASSISTANT_ID]


def build_tokenizer():
    """A transformers fast tokenizer over VOCAB (character-level, no normaliser, no added bos)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # Every single character is its own pre-token; the specials are matched before splitting.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS + [UNK])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="left",
        model_max_length=256, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path) -> None:
    build_tokenizer().save_pretrained(str(out_dir))
