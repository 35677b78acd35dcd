"""5 · Chat: talk to the last merged model, with the base or a fine-tune answering the same message
beside it. For the demo family, example prompts of each skill (from its held-out test split) show
the expected answer next to the replies. When the merged model is a SMILE model, a strip under the
replies shows, per token of its reply, which fine-tune's expert produced it (in that fine-tune's
colour)."""
from __future__ import annotations

from collections import Counter

import gradio as gr

from .. import figures, gpu
from ..chat import MAX_NEW_TOKENS, to_messages
from ..workspace import short
from .common import AppState, UserError, bounded, expected, lenient, message, warn
from .suites import demo_items

EXAMPLES_PER_DOMAIN = 3
TEMPERATURE, TOP_P, MAX_NEW = (0.0, 2.0), (0.05, 1.0), (1, MAX_NEW_TOKENS)     # the sliders' ranges
NOTE = ("A merge of several skills often loses exact answers (6 · Score shows EM per domain): a reply that looks "
        "like gibberish means that skill did not survive the merge. The demo models answer prompts such as "
        "`reverse: abc`, `encode: ABC`, `sort: 523` or `close: {[`; pick an example below.")


def example_rows() -> list[list[str]]:
    """[skill, prompt, expected answer] from the start of each demo domain's test split."""
    rows, seen = [], {}
    for it in demo_items(0):
        k = seen.get(it["domain"], 0)
        if k < EXAMPLES_PER_DOMAIN:
            rows.append([it["domain"], it["prompt"], it["answer"]])
            seen[it["domain"]] = k + 1
    return rows


def build(page) -> None:
    with gr.Row():
        page.add("compare", gr.Dropdown(["none", "base"], value="base", label="Compare with", elem_id="compare", scale=1))
        page.add("system", gr.Textbox(label="System prompt (optional)", elem_id="system-prompt", scale=3))
    with gr.Row():
        page.add("chat_merged", gr.Chatbot(label="merged", elem_id="chat-merged", height=300))
        page.add("chat_compare", gr.Chatbot(label="compared", elem_id="chat-compare", height=300))
    with gr.Row(equal_height=True):
        page.add("msg", gr.Textbox(placeholder="e.g. reverse: abc", show_label=False, scale=5, elem_id="chat-input"))
        page.add("send_btn", gr.Button("Send", variant="primary", scale=1, elem_id="chat-send"))
        page.add("clear_btn", gr.Button("Clear", scale=1, elem_id="chat-clear"))
    page.add("chat_status", gr.Markdown("", elem_id="chat-status", elem_classes=["status"]))
    page.add("chat_routing", gr.HighlightedText(label="SMILE routing: the expert behind each token of the merged reply",
                                                show_legend=True, show_inline_category=False, combine_adjacent=False,
                                                visible=False, elem_id="chat-routing"))
    page.add("routing_note", gr.Markdown("", elem_id="routing-note", elem_classes=["status"]))
    try:
        rows = example_rows()
    except (OSError, ValueError):           # no demo family: no examples
        rows = []
    page.add("chat_examples", gr.Dataset(components=[gr.Textbox(visible=False), gr.Textbox(visible=False),
                                                     gr.Textbox(visible=False)],
                                         headers=["skill", "prompt", "expected answer"], samples=rows,
                                         label="Example prompts (click one)", type="values", visible=bool(rows),
                                         elem_id="chat-examples", samples_per_page=15))
    gr.Markdown(NOTE, elem_id="chat-note")
    with gr.Accordion("Sampling", open=False, elem_id="sampling"):
        with gr.Row():
            page.add("temperature", lenient(gr.Slider(*TEMPERATURE, value=0.0, step=0.05,
                                                      label="Temperature (0 = greedy)", elem_id="temperature")))
            page.add("top_p", lenient(gr.Slider(*TOP_P, value=0.9, step=0.05, label="Top-p", elem_id="top-p")))
            page.add("max_new", lenient(gr.Slider(*MAX_NEW, value=64, step=1, label="Max new tokens",
                                                  elem_id="max-new-tokens")))


def pick_example(v: dict) -> dict:
    """A clicked example: its prompt into the message box; its answer is checked after the reply."""
    state: AppState = v["state"]
    if not v["chat_examples"]:          # no example under the click
        return {}
    skill, prompt, answer = v["chat_examples"]
    state.expected = (prompt, answer)
    return {"msg": prompt, "chat_status": f"expected answer ({skill}): `{answer}`"}


def _plain(history) -> list[dict]:
    return [m for m in to_messages(history) if m["role"] != "system"]


def _verdict(state: AppState, message_text: str, replies: dict[str, str]) -> str:
    if not state.expected or state.expected[0] != message_text:
        return ""
    answer = state.expected[1].strip()
    marks = ", ".join(f"{who} {'✓' if r.strip() == answer else '✗'}" for who, r in replies.items())
    return f"expected `{answer}`: {marks}"


def chat(v: dict):
    """Stream the merged model's reply, then the compared model's to the same message."""
    state: AppState = v["state"]
    text = (v["msg"] or "").strip()
    hist, hist_c = _plain(v["chat_merged"]), _plain(v["chat_compare"])
    try:
        ws = state.workspace()
        if not text:
            raise UserError("type a message first")
        kw = dict(system_prompt=(v["system"] or "").strip() or None,
                  temperature=bounded(v["temperature"], "Temperature", *TEMPERATURE),
                  top_p=bounded(v["top_p"], "Top-p", *TOP_P),
                  max_new_tokens=bounded(v["max_new"], "Max new tokens", *MAX_NEW, integer=True))
        merged_dir = ws.model_dir("merged")
        other = v["compare"] if v["compare"] and v["compare"] != "none" else None
        other_dir = ws.model_dir(other) if other else None
    except expected() as e:
        yield {"chat_status": warn(message(e))}
        return
    out = hist + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    out_c = hist_c + ([{"role": "user", "content": text}, {"role": "assistant", "content": ""}] if other else [])
    yield {"chat_merged": out, "chat_compare": out_c, "msg": "", "chat_status": ""}
    replies = {}
    try:
        for part in gpu.chat(merged_dir, hist, text, load_kwargs=ws.load_kwargs(), **kw):
            out[-1]["content"] = part
            yield {"chat_merged": out}
        replies["merged"] = out[-1]["content"]
        if other_dir is not None:
            for part in gpu.chat(other_dir, hist_c, text, load_kwargs=ws.load_kwargs(), **kw):
                out_c[-1]["content"] = part
                yield {"chat_compare": out_c}
            replies[other.removeprefix("demo:")] = out_c[-1]["content"]
    except (*expected(), RuntimeError) as e:      # chat_stream's "generation failed" is a RuntimeError
        yield {"chat_status": warn(f"chat failed: {message(e)}")}
        return
    yield {"chat_merged": out, "chat_compare": out_c, "msg": "", "chat_status": _verdict(state, text, replies)}


CHAT_IN = ["state", "msg", "chat_merged", "chat_compare", "compare", "system", "temperature", "top_p", "max_new"]
CHAT_OUT = ["chat_merged", "chat_compare", "msg", "chat_status"]


def routing(v: dict) -> dict:
    """After a reply of a SMILE model: per generated token, the expert with the largest routing
    weight (averaged over the SMILE layers at the position that predicted it), coloured as its
    fine-tune everywhere else; hidden for a plain merge."""
    state: AppState = v["state"]
    hidden = {"chat_routing": gr.update(value=None, visible=False), "routing_note": ""}
    hist = _plain(v["chat_merged"])
    ws = state.ws
    run = ws.runs.last if ws is not None and ws.loaded else None
    if run is None or not run.is_smile or len(hist) < 2 or hist[-1]["role"] != "assistant" or not hist[-1]["content"]:
        return hidden
    try:
        entries = gpu.reply_routing(ws.model_dir("merged"), hist[:-2], hist[-2]["content"], hist[-1]["content"],
                                    (v["system"] or "").strip() or None, load_kwargs=ws.load_kwargs())
        loaded = ws.align(run.config)
    except (*expected(), RuntimeError) as e:
        return {"chat_routing": gr.update(visible=False), "routing_note": warn(f"routing view failed: {message(e)}")}
    labels = [short(m) for m in run.models]
    colors = {lab: figures.color(j) for lab, j in zip(labels, loaded)}
    value = [(e["token"], labels[e["expert"]]) for e in entries]
    counts = Counter(labels[e["expert"]] for e in entries)
    mean_top = sum(max(e["weights"]) for e in entries) / max(len(entries), 1)
    note = (f"{run.name}: {len(entries)} tokens — " + ", ".join(f"{lab} {counts[lab]}" for lab in labels if counts[lab])
            + f"; mean weight of the top expert {mean_top:.2f} (1.00 = every layer agrees)")
    return {"chat_routing": gr.update(value=value, color_map=colors, visible=True), "routing_note": note}


ROUTING_IN = ["state", "chat_merged", "system"]
ROUTING_OUT = ["chat_routing", "routing_note"]


def clear(v: dict) -> dict:
    v["state"].expected = None
    return {"chat_merged": [], "chat_compare": [], "msg": "", "chat_status": ""}


def wire(page, concurrency: int) -> None:
    sent = [page.on(page["send_btn"].click, chat, CHAT_IN, CHAT_OUT, api_name="chat", concurrency_limit=concurrency),
            page.on(page["msg"].submit, chat, CHAT_IN, CHAT_OUT, api_visibility="private",
                    concurrency_limit=concurrency)]
    for ev in sent:        # the routing strip follows each reply (its own request: /chat's outputs stay)
        page.then(ev, routing, ROUTING_IN, ROUTING_OUT, api_visibility="private", concurrency_limit=concurrency,
                  show_progress="hidden")
    cleared = page.on(page["clear_btn"].click, clear, ["state"], CHAT_OUT, api_name="clear_chat")
    page.then(cleared, routing, ROUTING_IN, ROUTING_OUT, api_visibility="private", show_progress="hidden")
    page.on(page["chat_examples"].click, pick_example, ["state", "chat_examples"], ["msg", "chat_status"],
            api_visibility="private")
