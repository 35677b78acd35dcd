"""Chat prompts and streaming generation (dppa_ui.chat) on tiny random Llamas built in tests."""
from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, chat_llama

from dppa_ui import chat


@pytest.fixture(scope="module")
def pair():
    return chat_llama(3), char_tokenizer()


def test_to_messages_accepts_gradio_shapes():
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
            ("ab", "cd"), {"role": "tool", "content": "x"}]
    msgs = chat.to_messages(hist, "next", system_prompt="  be brief ")
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ab"},
                    {"role": "assistant", "content": "cd"}, {"role": "user", "content": "next"}]
    assert chat.to_messages(None, "x") == [{"role": "user", "content": "x"}]


def test_render_prompt_template_and_fallback():
    tok = char_tokenizer()
    msgs = chat.to_messages([("ab", "cd")], "ef", system_prompt="sys")
    # The demo-style template ignores the system role; the prompt ends on the generation prompt.
    assert chat.render_prompt(tok, msgs) == "<bos><|user|>ab<|assistant|>cd<eos><|user|>ef<|assistant|>"
    bare = char_tokenizer(template=None)
    assert not bare.chat_template
    text = chat.render_prompt(bare, msgs)
    assert text == "<|system|>\nsys\n<|user|>\nab\n<|assistant|>\ncd\n<|user|>\nef\n<|assistant|>\n"


def test_system_prompt_folded_when_template_rejects_it():
    tok = char_tokenizer(template="{% for m in messages %}{% if m['role'] == 'system' %}"
                                  "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    text = chat.render_prompt(tok, chat.to_messages([], "ab", system_prompt="zz"))
    assert text == "zz\n\nab"


def test_prompt_ids_truncate_to_context(pair):
    model, tok = pair
    msgs = chat.to_messages([], "a" * 300)
    ids, new = chat.prompt_ids(model, tok, msgs, max_new_tokens=28)
    assert ids.shape == (1, 100) and new == 28          # 128 positions - 28 new tokens
    ids, new = chat.prompt_ids(model, tok, msgs, max_new_tokens=500)
    assert ids.shape == (1, 64) and new == 64           # half the context each
    ids, new = chat.prompt_ids(model, tok, chat.to_messages([], "ab"), max_new_tokens=500)
    assert ids.shape == (1, 5) and new == 123
    assert ids[0, -1].item() == tok.convert_tokens_to_ids("<|assistant|>")


def test_chat_stream_greedy_grows_and_matches_generate(pair):
    model, tok = pair
    parts = list(chat.chat_stream(model, tok, [], "abc", temperature=0, max_new_tokens=12))
    assert len(parts) >= 2 and parts[-1]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(parts, parts[1:]))
    assert len(tok(parts[-1], add_special_tokens=False)["input_ids"]) <= 12
    # Same as a plain greedy generate on the same prompt.
    ids, _ = chat.prompt_ids(model, tok, chat.to_messages([], "abc"), 12)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
    assert parts[-1] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert chat.generate_reply(model, tok, [], "abc", temperature=0, max_new_tokens=12) == parts[-1]


def test_sampling_seed_repeatable_and_cap(pair):
    model, tok = pair
    a = chat.generate_reply(model, tok, [], "hello", temperature=1.5, top_p=1.0, max_new_tokens=20, seed=1)
    b = chat.generate_reply(model, tok, [], "hello", temperature=1.5, top_p=1.0, max_new_tokens=20, seed=1)
    c = chat.generate_reply(model, tok, [], "hello", temperature=1.5, top_p=1.0, max_new_tokens=20, seed=2)
    assert a == b and a != c
    long = chat.generate_reply(model, tok, [], "x", temperature=0, max_new_tokens=10_000)
    assert 0 < len(tok(long, add_special_tokens=False)["input_ids"]) <= 128 - 4   # context-bound (cap 512)


def test_errors(pair):
    model, tok = pair
    with pytest.raises(ValueError, match="type a message"):
        next(chat.chat_stream(model, tok, [], "  "))

    class Broken(torch.nn.Module):
        config = model.config
        generation_config = model.generation_config

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kw):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: boom"):
        list(chat.chat_stream(Broken(), tok, [], "ab"))


def test_chat_with_workspace_models_and_compare(tiny_llama, tmp_path):
    from dppa_ui.workspace import Workspace
    fam = tiny_llama("chat", n_ft=2)
    ws = Workspace(temp_root=tmp_path).load(str(fam.base), [str(f) for f in fam.fts])
    ws.merge({"merge_method": "task_arithmetic", "base_model": str(fam.base),
              "models": [{"model": str(f)} for f in fam.fts]})
    merged, base = ws.model("merged"), ws.model("base")
    replies = list(chat.compare_stream([merged, base], [], "hello", temperature=0, max_new_tokens=8))
    final = replies[-1]
    assert all(final) and final[0] == chat.generate_reply(*merged, [], "hello", temperature=0, max_new_tokens=8)
    assert replies[0][1] == ""        # the second model answers after the first
    assert final[1] == chat.generate_reply(*base, [], "hello", temperature=0, max_new_tokens=8)
    ws.close()
