"""4 · Merge: one click streams the merge through the CLI's engine into a run folder (on the GPU
when there is one); chat and score use it right away. Save offers it as a zip; push uploads it.
"Upscale (SMILE)" builds, instead of a merge, the loaded fine-tunes' mixture of low-rank experts
(`merge_method: smile` through the same engine) into a run folder: it becomes the merged model
for chat and score like any merge."""
from __future__ import annotations

import time

import gradio as gr

from ..config import UPSCALE_METHODS
from ..workspace import size_text
from .common import (CONTROL_KEYS, DOWNLOAD_LIMIT, AppState, expected, bounded, fmt, hub_offline, lenient, message, ok,
                     on_space, warn)
from .controls_ui import controls_of
from .jobs import running
from .reports import leaderboard, run_summary

SMILE_SCOPES = {"blocks (paper)": "blocks", "blocks + embeddings": "embeddings"}
SMILE_RANK, SMILE_ROUTER, SMILE_K = (1, 256), (1, 64), (1, 8)      # the sliders' ranges


def build(page) -> None:
    with gr.Row():
        page.add("merge_btn", gr.Button("Merge", variant="primary", elem_id="merge-btn"))
        page.add("cancel_btn", gr.Button("Cancel", variant="stop", elem_id="cancel-btn"))
        page.add("save_btn", gr.Button("Save model (zip)", elem_id="save-btn"))
    page.add("merge_status", gr.Markdown("", elem_id="merge-status", elem_classes=["status"]))
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
        page.add("push_status", gr.Markdown("", elem_id="push-status", elem_classes=["status"]))
    with gr.Accordion("Upscale (SMILE): a mixture of low-rank experts instead of a merge", open=True,
                      elem_id="smile-accordion"):
        text, url = UPSCALE_METHODS["smile"]
        gr.Markdown(f"{text} Each token is routed, in every layer, to the expert whose input subspace it "
                    f"lies in most ([SMILE, arXiv 2408.10174]({url})); chat shows which expert wrote each "
                    f"token and score shows how often a domain reaches its own fine-tune's expert.",
                    elem_id="smile-intro")
        with gr.Row(equal_height=True):
            page.add("smile_rank", lenient(gr.Slider(*SMILE_RANK, value=64, step=1, label="rank_of_expert", scale=3,
                                                     info="rank of each expert (its delta's top singular vectors)",
                                                     elem_id="smile-rank")))
            page.add("smile_full", gr.Checkbox(value=False, label="full rank", scale=1, elem_id="smile-full",
                                               info="each expert = its whole delta"))
        with gr.Row(equal_height=True):
            page.add("smile_router", lenient(gr.Slider(*SMILE_ROUTER, value=8, step=1, label="rank_of_router", scale=2,
                                                       info="singular vectors per router", elem_id="smile-router")))
            page.add("smile_k", lenient(gr.Slider(*SMILE_K, value=1, step=1, label="num_experts_per_tok (k)", scale=2,
                                                  info="experts mixed per token", elem_id="smile-k")))
            page.add("smile_scope", gr.Radio(list(SMILE_SCOPES), value="blocks (paper)", label="Upscaled layers",
                                             scale=2, elem_id="smile-scope"))
        page.add("smile_btn", gr.Button("Upscale (SMILE)", variant="primary", elem_id="smile-btn"))
        page.add("smile_size", gr.Markdown("", elem_id="smile-size"))


def merge(v: dict):
    """Merge the loaded models with the current controls (one merge at a time on the server)."""
    state: AppState = v["state"]
    progress = v["progress"]
    try:
        ws = state.workspace()
        c = controls_of(v)
        cfg = ws.config(c)
    except expected() as e:
        return {"merge_status": warn(message(e)), "state": state}
    state.cancel.clear()
    t0 = time.perf_counter()

    last = [0.0]

    def tick(done: int, total: int):
        # at most 4 updates a second: each one is work for the server's event loop, which shares
        # the GIL with the merge (a 0.5 B model has ~250 tensors, a 7 B one ~300, quickly done)
        now = time.perf_counter()
        if now - last[0] < 0.25 and done < total:
            return
        last[0] = now
        left = (now - t0) / max(done, 1) * (total - done)
        progress((done, total), desc=f"merging: {done}/{total} tensors, ~{left:.1f} s left", unit="tensors")

    try:
        with running(state, "merge"):
            run = ws.merge(cfg, controls=c, progress=tick, cancel=state.cancel.is_set)
    except InterruptedError:
        return {"merge_status": warn("merge cancelled; the previous merge (if any) is still there"), "state": state}
    except (*expected(), RuntimeError, OSError) as e:
        return {"merge_status": warn(f"merge refused: {message(e)}"), "state": state}
    return {"merge_summary": run_summary(run), "leaderboard": leaderboard(state),
            "download": gr.update(value=None, visible=False),       # the zip of an older run must not linger
            "merge_status": ok(f"{run.name} merged in {fmt(run.seconds)} s"), "state": state}


MERGE_OUT = ["merge_summary", "leaderboard", "download", "merge_status", "state"]


def smile_config(v: dict, ws):
    """The SMILE config the section's controls describe, over the loaded models."""
    full = bool(v["smile_full"])
    rank = None if full else bounded(v["smile_rank"], "rank_of_expert", *SMILE_RANK, integer=True)
    scope = SMILE_SCOPES.get(v["smile_scope"], v["smile_scope"])
    return ws.smile_config(rank, bounded(v["smile_router"], "rank_of_router", *SMILE_ROUTER, integer=True),
                           bounded(v["smile_k"], "num_experts_per_tok", *SMILE_K, integer=True), scope=scope)


def upscale(v: dict) -> dict:
    """Build the SMILE model of the loaded fine-tunes into a new run (the merged model from now on);
    ranks a projection cannot hold, or more experts per token than fine-tunes, are refused first."""
    state: AppState = v["state"]
    progress = v["progress"]
    try:
        ws = state.workspace()
        cfg = smile_config(v, ws)
        plain = ws.access.n_params
        estimate = ws.smile_parameters(cfg)
    except expected() as e:
        return {"smile_size": warn(message(e)), "state": state}
    state.cancel.clear()
    progress(0.0, desc=f"SMILE: about {estimate:,} parameters, {estimate / max(plain, 1):.1f}× the merge")

    def tick(done: int, total: int):
        progress((done, total), desc=f"SMILE: {done}/{total} layers upscaled", unit="layers")

    try:
        with running(state, "upscale"):
            run = ws.merge(cfg, progress=tick, cancel=state.cancel.is_set)
    except InterruptedError:
        return {"smile_size": warn("upscale cancelled; the previous merge (if any) is still there"), "state": state}
    except (*expected(), RuntimeError, OSError) as e:
        return {"smile_size": warn(f"upscale refused: {message(e)}"), "state": state}
    return {"merge_summary": run_summary(run), "leaderboard": leaderboard(state),
            "download": gr.update(value=None, visible=False),
            "smile_size": ok(f"{run.name}: {size_text(run.parameters)}"),
            "merge_status": ok(f"{run.name}: SMILE model built in {fmt(run.seconds)} s"), "state": state}


def smile_estimate(v: dict) -> dict:
    """The size the SMILE controls would build, beside the merge's (no tensor read)."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        total = ws.smile_parameters(smile_config(v, ws))
    except expected() as e:
        return {"smile_size": f"⚠ {message(e)}", "smile_rank": gr.update(interactive=not v["smile_full"])}
    return {"smile_size": f"would build about {size_text({'total': total, 'plain': ws.access.n_params})}",
            "smile_rank": gr.update(interactive=not v["smile_full"])}


SMILE_IN = ["state", "smile_rank", "smile_full", "smile_router", "smile_k", "smile_scope"]
SMILE_OUT = ["merge_summary", "leaderboard", "download", "smile_size", "merge_status", "state"]


def cancel(v: dict) -> dict:
    """Stop the session's merge (or upscale) at its next tensor, and say how it ended: cancelled,
    or finished before the cancel reached it; nothing to cancel when none runs."""
    state: AppState = v["state"]
    if not isinstance(state, AppState) or state.running not in ("merge", "upscale", "merge as written"):
        last = state.ws.runs.last if isinstance(state, AppState) and state.ws is not None else None
        return {"merge_status": "nothing to cancel: no merge is running"
                                + (f" (the last one, {last.name}, had finished)" if last is not None else "")}
    what = state.running
    before = state.ws.runs.last if state.ws is not None else None
    state.cancel.set()
    t0 = time.monotonic()
    while state.running is not None and time.monotonic() - t0 < CANCEL_WAIT:
        time.sleep(0.05)
    last = state.ws.runs.last if state.ws is not None else None
    if state.running is not None:
        return {"merge_status": f"■ cancel requested: the {what} stops at its next tensor"}
    if last is not None and last is not before:
        return {"merge_status": ok(f"the {what} finished before the cancel reached it: {last.name} is there")}
    return {"merge_status": f"■ {what} cancelled; the previous merge (if any) is still there"}


CANCEL_WAIT = 10.0          # seconds Cancel waits to say how the merge ended (one tensor takes far less)


def save(v: dict) -> dict:
    """The last run's folder (weights, config, tokenizer, card, YAML) as a zip for download."""
    state: AppState = v["state"]
    try:
        ws = state.workspace()
        run = ws.runs.last
        if run is None:
            raise ValueError("nothing to save yet: merge first (4 · Merge)")
        zpath = ws.runs.archive(run, max_bytes=DOWNLOAD_LIMIT)
    except (*expected(), OSError) as e:
        return {"merge_status": warn(f"save failed: {message(e)}")}
    if zpath is None:
        size = sum(p.stat().st_size for p in run.folder.rglob("*") if p.is_file())
        return {"download": gr.update(value=None, visible=False),
                "merge_status": warn(f"{run.name} is {fmt(size / 1e6)} MB, over this server's download limit of "
                                     f"{fmt(DOWNLOAD_LIMIT / 1e6)} MB (DPPA_UI_MAX_DOWNLOAD_BYTES): push it to "
                                     f"the hub instead")}
    return {"download": gr.update(value=str(zpath), visible=True),
            "merge_status": ok(f"{run.name} saved: {zpath.name}, {fmt(zpath.stat().st_size / 1e6)} MB, below")}


def push(v: dict) -> dict:
    """Upload the last run's folder to the user's hub repo. The token (the Space login's, or the
    one typed) is used for this call only: never stored, never sent back to the page."""
    state: AppState = v["state"]
    if hub_offline():
        return {"push_status": warn("pushing is off: this server runs offline (HF_HUB_OFFLINE=1)")}
    oauth_token = v.get("oauth_token")
    token = (oauth_token.token if oauth_token is not None else None) or (v["hub_token"] or "").strip() or None
    repo_id = (v["hub_repo"] or "").strip()
    if not token:
        return {"push_status": warn("sign in with Hugging Face (on a Space) or paste a write token first")}
    if not repo_id or "/" not in repo_id:
        return {"push_status": warn("give the target repo as user/name")}
    try:
        ws = state.workspace()
        run = ws.runs.last
        if run is None or not run.on_disk:
            raise ValueError("nothing to push yet: merge first (4 · Merge)")
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        api.create_repo(repo_id, private=bool(v["hub_private"]), exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(run.folder), repo_id=repo_id, repo_type="model")
    except Exception as e:   # noqa: BLE001 - auth, network, permissions: all shown to the user
        return {"push_status": warn(f"push failed: {type(e).__name__}: {message(e)}")}
    return {"push_status": ok(f"pushed {run.name} to https://huggingface.co/{repo_id}")}


def wire(page) -> None:
    ev = page.on(page["merge_btn"].click, merge, ["state", *CONTROL_KEYS], MERGE_OUT, progress=True,
                 api_name="merge", concurrency_limit=1, concurrency_id="merge")
    page.merge_event = ev
    up = page.on(page["smile_btn"].click, upscale, SMILE_IN, SMILE_OUT, progress=True, api_name="upscale",
                 concurrency_limit=1, concurrency_id="merge")
    page.on([page["smile_rank"].release, page["smile_router"].release, page["smile_k"].release,
             page["smile_full"].input, page["smile_scope"].input], smile_estimate, SMILE_IN, ["smile_size", "smile_rank"],
            api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    page.on(page["cancel_btn"].click, cancel, ["state"], ["merge_status"], cancels=[ev, up], api_name="cancel",
            queue=False)
    page.on(page["save_btn"].click, save, ["state"], ["download", "merge_status"], api_name="save")
    page.on(page["push_btn"].click, push, ["state", "hub_repo", "hub_token", "hub_private"], ["push_status"],
            oauth=True, api_name="push")
