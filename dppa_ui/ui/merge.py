"""4 · Merge: one click streams the merge through the CLI's engine into a run folder (on the GPU
when there is one); chat and score use it right away. Save offers it as a zip; push uploads it."""
from __future__ import annotations

import time

import gradio as gr

from ..workspace import short
from .common import (CONTROL_KEYS, DOWNLOAD_LIMIT, AppState, _expected, hub_offline, message, ok, on_space, warn)
from .method import controls_of


def build(page) -> None:
    with gr.Row():
        page.add("merge_btn", gr.Button("Merge", variant="primary", elem_id="merge-btn"))
        page.add("cancel_btn", gr.Button("Cancel", variant="stop", elem_id="cancel-btn"))
        page.add("save_btn", gr.Button("Save model (zip)", elem_id="save-btn"))
    page.add("merge_summary", gr.Markdown("No merge yet.", elem_id="merge-summary"))
    page.add("download", gr.File(label="Download (zip)", interactive=False, elem_id="download", visible=False))
    with gr.Accordion("Push to the Hugging Face Hub", open=False, elem_id="push-accordion"):
        offline = hub_offline()
        if offline:
            gr.Markdown("Pushing is off: this server runs offline (`HF_HUB_OFFLINE=1`).", elem_id="push-note")
        with gr.Row(equal_height=True):
            if on_space():
                gr.LoginButton(elem_id="login-btn")
            page.add("hub_token", gr.Textbox(label="Write token" + (" (or sign in)" if on_space() else ""),
                                             type="password", interactive=not offline, elem_id="hub-token", scale=2))
            page.add("hub_repo", gr.Textbox(label="Repo", placeholder="user/merged-model", interactive=not offline,
                                            elem_id="hub-repo", scale=2))
            page.add("hub_private", gr.Checkbox(value=True, label="private", interactive=not offline,
                                                elem_id="hub-private"))
            page.add("push_btn", gr.Button("Push", interactive=not offline, elem_id="push-btn"))
    page.add("merge_status", gr.Markdown("", elem_id="merge-status", elem_classes=["status"]))


def run_summary(run) -> str:
    kept = ", ".join(f"`{short(m)}` {k:.1%}" for m, k in zip(run.models, run.kept_fraction))
    lines = [f"**{run.label()}** merged in **{run.seconds:.2f} s** on **{run.device}**.  ",
             f"Kept of each delta: {kept}.  ", "The merged model is ready: chat with it (5 · Chat) or score it (6 · Score)."]
    lines += [f"\n⚠ {n}" for n in run.notices]
    return "\n".join(lines)


def merge(v: dict):
    """Merge the loaded models with the current controls (one merge at a time on the server)."""
    from .score import leaderboard
    state: AppState = v["state"]
    progress = v["progress"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        cfg = ws.config(c)
    except _expected() as e:
        return {"merge_status": warn(message(e)), "state": state}
    state.cancel.clear()
    t0 = time.perf_counter()

    def tick(done: int, total: int):
        left = (time.perf_counter() - t0) / max(done, 1) * (total - done)
        progress((done, total), desc=f"merging: {done}/{total} tensors, ~{left:.1f} s left", unit="tensors")

    try:
        run = ws.merge(cfg, controls=c, progress=tick, cancel=state.cancel.is_set)
    except InterruptedError:
        return {"merge_status": warn("merge cancelled; the previous merge (if any) is still there"), "state": state}
    except (*_expected(), RuntimeError, OSError) as e:
        return {"merge_status": warn(f"merge refused: {message(e)}"), "state": state}
    return {"merge_summary": run_summary(run), "leaderboard": leaderboard(state),
            "download": gr.update(value=None, visible=False),       # the zip of an older run must not linger
            "merge_status": ok(f"merged in {run.seconds:.2f} s"), "state": state}


MERGE_OUT = ["merge_summary", "leaderboard", "download", "merge_status", "state"]


def cancel(v: dict) -> dict:
    state: AppState = v["state"]
    if state is not None:
        state.cancel.set()
    return {"merge_status": "⏹ cancel requested: the merge stops at the next tensor"}


def save(v: dict) -> dict:
    """The last run's folder (weights, config, tokenizer, card, YAML) as a zip for download."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        run = ws.runs.last
        if run is None:
            raise ValueError("nothing to save yet: merge first (4 · Merge)")
        zpath = ws.runs.archive(run, max_bytes=DOWNLOAD_LIMIT)
    except (*_expected(), OSError) as e:
        return {"merge_status": warn(f"save failed: {message(e)}")}
    size = sum(p.stat().st_size for p in run.folder.rglob("*") if p.is_file())
    if zpath is None:
        return {"download": gr.update(value=None, visible=False),
                "merge_status": ok(f"{run.name} is {size / 1e6:.0f} MB: too large to download here; push it to the hub")}
    return {"download": gr.update(value=str(zpath), visible=True),
            "merge_status": ok(f"{run.name} saved ({size / 1e6:.1f} MB): download the zip below")}


def push(state: AppState, repo_id: str, token_text: str, private: bool, oauth_token: gr.OAuthToken | None = None):
    """Upload the last run's folder to the user's hub repo. The token (the Space login's, or the
    one typed) is used for this call only: never stored, never sent back to the page."""
    if hub_offline():
        return warn("pushing is off: this server runs offline (HF_HUB_OFFLINE=1)")
    token = (oauth_token.token if oauth_token is not None else None) or (token_text or "").strip() or None
    if not token:
        return warn("sign in with Hugging Face (on a Space) or paste a write token first")
    if not repo_id or "/" not in repo_id:
        return warn("give the target repo as user/name")
    try:
        ws = state.workspace()
        run = ws.runs.last
        if run is None or not run.on_disk:
            raise ValueError("nothing to push yet: merge first (4 · Merge)")
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(run.folder), repo_id=repo_id, repo_type="model")
    except Exception as e:   # noqa: BLE001 - auth, network, permissions: all shown to the user
        return warn(f"push failed: {type(e).__name__}: {message(e)}")
    return ok(f"pushed {run.name} to https://huggingface.co/{repo_id}")


def wire(page) -> None:
    ev = page.on(page["merge_btn"].click, merge, ["state", *CONTROL_KEYS], MERGE_OUT, progress=True,
                 api_name="merge", concurrency_limit=1, concurrency_id="merge")
    page.merge_event = ev
    page.on(page["cancel_btn"].click, cancel, ["state"], ["merge_status"], cancels=[ev], api_name="cancel", queue=False)
    page.on(page["save_btn"].click, save, ["state"], ["download", "merge_status"], api_name="save")
    page["push_btn"].click(push, page.many(["state", "hub_repo", "hub_token", "hub_private"]), page["merge_status"],
                           api_name="push")
