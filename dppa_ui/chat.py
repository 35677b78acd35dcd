"""Chat with a (merged) model: prompt from the history, streamed reply. No gradio.

The prompt comes from the tokenizer's chat template when it has one; otherwise from a plain
fallback (`<|system|>`, `<|user|>`, `<|assistant|>` blocks). Generation runs in a thread feeding a
TextIteratorStreamer, so the caller sees the reply grow token by token.
"""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch

from .modelbuild import input_device

MAX_NEW_TOKENS = 512

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def message_text(content) -> str:
    """Message content as text: gradio may send a string, a {"text": ...} dict or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content if not (isinstance(c, dict) and c.get("type") not in (None, "text")))
    return str(content)


def to_messages(history, message: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """[{"role", "content"}] from a history of messages dicts or (user, assistant) pairs, plus the
    new user message and an optional system prompt first."""
    msgs: list[dict] = []
    if system_prompt and system_prompt.strip():
        msgs.append({"role": "system", "content": system_prompt.strip()})
    for item in history or []:
        if isinstance(item, dict):
            role = item.get("role")
            if role in ("user", "assistant", "system"):
                msgs.append({"role": role, "content": message_text(item.get("content"))})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            user, bot = item
            if user is not None:
                msgs.append({"role": "user", "content": message_text(user)})
            if bot is not None:
                msgs.append({"role": "assistant", "content": message_text(bot)})
    if message is not None:
        msgs.append({"role": "user", "content": message_text(message)})
    return msgs


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text for `messages` with a generation prompt: the tokenizer's chat template, or
    the fallback template when it has none. A template that rejects the system role gets the
    system prompt folded into the first user message."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception:
        if not messages or messages[0]["role"] != "system":
            raise
        sys_msg, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{sys_msg}\n\n{m['content']}"
                break
        return tokenizer.apply_chat_template(rest, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)


def prompt_ids(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Token ids of the rendered prompt (1, T) and the new-token budget, both fitted into the
    model's context: the prompt keeps its most recent tokens (at least half the context when it is
    that long) and the reply gets the rest, so generation never runs past the trained positions."""
    text = render_prompt(tokenizer, messages)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    # A chat template writes its own special tokens (e.g. bos); the fallback relies on the tokenizer's.
    ids = tokenizer(text, add_special_tokens=not has_template, return_tensors="pt")["input_ids"]
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if ctx and ids.shape[1] + max_new_tokens > ctx:
        keep = max(ctx - max_new_tokens, min(ids.shape[1], ctx // 2), 1)
        ids = ids[:, -keep:]
        max_new_tokens = max(ctx - ids.shape[1], 1)
    return ids, max_new_tokens


def _streamer_class():
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        """TextIteratorStreamer that hands on text after every token (the stock one waits for a
        space, which a character-level model may never write); an incomplete UTF-8 sequence at the
        end is held back until the next token completes it."""

        def put(self, value):
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            printable, self.print_len = text[self.print_len:], len(text)
            if printable:
                self.on_finalized_text(printable)

    return TokenStreamer


def _eos_ids(model, tokenizer) -> list[int] | None:
    ids = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids or None


def chat_stream(model, tokenizer, history, message: str, system_prompt: str | None = None,
                temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 128,
                seed: int | None = None) -> Iterator[str]:
    """Yield the reply as it grows (each value is the whole reply so far; at least one value).

    temperature 0 = greedy; max_new_tokens is capped at 512. `seed` makes sampling repeatable.
    """
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    if not str(message or "").strip():
        raise ValueError("type a message first")
    ids, max_new_tokens = prompt_ids(model, tokenizer, to_messages(history, message, system_prompt), max_new_tokens)
    device = input_device(model)
    streamer = _streamer_class()(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120.0)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kwargs = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), streamer=streamer,
                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    error: list[BaseException] = []

    def run():
        try:
            if seed is not None:
                torch.manual_seed(int(seed))
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:     # surface it in the caller's thread, and end the stream
            error.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    reply = ""
    yielded = False
    for piece in streamer:
        if piece:
            reply += piece
            yielded = True
            yield reply
    thread.join()
    if error:
        raise RuntimeError(f"generation failed: {type(error[0]).__name__}: {error[0]}") from error[0]
    if not yielded:
        yield reply


def generate_reply(model, tokenizer, history, message: str, system_prompt: str | None = None,
                   temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 128,
                   seed: int | None = None) -> str:
    """The whole reply at once (same arguments as `chat_stream`)."""
    reply = ""
    for reply in chat_stream(model, tokenizer, history, message, system_prompt, temperature, top_p,
                             max_new_tokens, seed):
        pass
    return reply


def compare_stream(pairs: Sequence[tuple], history, message: str, **kwargs) -> Iterator[list[str]]:
    """Side by side: the same message to each (model, tokenizer) in `pairs`, one after the other;
    yields the list of replies so far (later ones "" until their turn)."""
    replies = [""] * len(pairs)
    for k, (model, tok) in enumerate(pairs):
        for r in chat_stream(model, tok, history, message, **kwargs):
            replies[k] = r
            yield list(replies)
