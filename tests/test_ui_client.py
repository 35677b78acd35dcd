"""The app over its HTTP API with gradio_client, on the committed demo family: load -> inspect (the
threshold follows the density) -> merge -> chat -> score -> save -> export YAML, and the YAML re-run
through `python -m dppa_ui merge` gives the app's tensors. Bad input gives a message and leaves
the session usable; server files never reach the scorer."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import DEMO_FTS

pytest.importorskip("gradio_client")

from dppa_ui import chat

from dppa_ui.ui.common import api_controls
from dppa_ui.ui.score import DEMO_SUITE, UPLOAD_SUITE, demo_items

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
FTS = DEMO_FTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    from dppa_ui.ui import build_app, launch_options
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    opts = {k: v for k, v in launch_options().items() if k in ("run_history", "head")}
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, **opts)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def method(**over) -> list:
    return api_controls(**over)


def value(x):
    """A component's value from an API output (plain value or an update dict)."""
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def last_reply(history) -> str:
    assert history and history[-1]["role"] == "assistant"
    return chat.message_text(history[-1]["content"])


def test_full_flow_over_the_api(client, tmp_path, read_weights):
    out = client.predict("demo:base", FTS, api_name="/load_models")
    summary, status = out[0], out[1]
    assert status.startswith("✓") and "parameters" in summary

    def thresholds(density):
        fig, table, name, matrix, status = client.predict(1, "mlp.down_proj", *method(preset="ties", density=density),
                                                          api_name="/inspect")
        assert not status.startswith("⚠") and fig["type"] == "plotly"
        assert [r[0] for r in table["data"]] == [f.removeprefix("demo:") for f in FTS]
        return [float(r[2].removeprefix("|δ| ≥ ")) for r in table["data"]]
    lo, hi = thresholds(0.5), thresholds(0.1)
    assert all(h > l > 0 for l, h in zip(lo, hi))
    heat, note = client.predict("DP density", 0, *method(preset="dppa"), api_name="/heatmap")
    assert heat["type"] == "plotly"
    mask, numbers, method_view, merged = client.predict("model.layers.1.mlp.down_proj.weight",
                                                        *method(preset="ties", density=0.2), api_name="/masks")
    assert "sign conflicts" in numbers and value(mask)["type"] == "plotly" and value(merged)["type"] == "plotly"
    _, numbers, method_view, merged = client.predict("model.layers.1.mlp.down_proj.weight", *method(preset="linear"),
                                                     api_name="/masks")
    assert "keeps every entry" in numbers and value(method_view)["type"] == "plotly"
    mv = method(preset="dppa", density=0.1)
    summary, board, download, status = client.predict(*mv, api_name="/merge")
    assert status.startswith("✓") and "run 1: dppa" in summary
    hist, hist_c, box, status = client.predict("reverse: abc", [], [], "base", "", 0.0, 0.9, 24, api_name="/chat")
    assert box == "" and isinstance(last_reply(hist), str) and isinstance(last_reply(hist_c), str), status
    plot, objective, board, results, status = client.predict(DEMO_SUITE, None, api_name="/score")
    assert status.startswith("✓"), status
    assert set(results) == {"merged", "base", *FTS}
    for per in results.values():
        for s in per.values():
            assert 0.0 <= s["em"] <= 1.0 and 0.0 <= s["smooth"] <= 1.0
    assert board["data"][0][1] == "dppa" and 0 <= float(re.search(r"\*\*([0-9.]+)\*\*", objective).group(1)) <= 2
    zpath, status = client.predict(api_name="/save")
    assert status.startswith("✓")
    with zipfile.ZipFile(value(zpath)) as z:
        z.extractall(tmp_path / "app")
    app_dir = next((tmp_path / "app").iterdir())
    text, yfile, status = client.predict("demo:base", FTS, *mv, api_name="/export_yaml")
    assert status.startswith("✓") and "merge_method: dppa" in text
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "dppa_ui", "merge", str(cfg), "--out", str(tmp_path / "cli"),
                          "--quiet", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    import torch
    a, b = read_weights(app_dir), read_weights(tmp_path / "cli")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_replies_differ_from_the_base_where_the_scores_say_so(client):
    """One fine-tune pruned by DP to density 0.5 keeps its skill: the scores say so, and its chat
    replies on that skill are non-empty and unlike the base's."""
    assert client.predict("demo:base", ["demo:reverse"], api_name="/load_models")[1].startswith("✓")
    assert client.predict(*method(preset="dp", density=0.5), api_name="/merge")[-1].startswith("✓")
    _, _, _, results, status = client.predict(DEMO_SUITE, None, api_name="/score")
    assert results["merged"]["reverse"]["em"] >= results["base"]["reverse"]["em"] + 0.5, results
    differ = 0
    for it in [it for it in demo_items() if it["domain"] == "reverse"][:5]:
        h, hc, *_ = client.predict(it["prompt"], [], [], "base", "", 0.0, 0.9, 32, api_name="/chat")
        assert last_reply(h).strip(), "the merged model answered nothing on a skill it scores on"
        differ += last_reply(h) != last_reply(hc)
    assert differ >= 3, differ


def test_bad_input_leaves_the_session_usable(client, tmp_path):
    from gradio_client import handle_file
    assert client.predict("demo:base", FTS[:2], api_name="/load_models")[1].startswith("✓")
    assert "at least one fine-tune" in client.predict("demo:base", [], api_name="/load_models")[1]
    assert "outside the allowed model folders" in client.predict("/etc", "demo:base", FTS[:2], api_name="/add_model")[-1]
    fig = client.predict(0, "mlp.up_proj", *method(weights="1, 2, 3"), api_name="/inspect")[0]
    assert "not drawn: weights: 3 given for 2 fine-tunes" in fig["plot"]             # the view says why
    for bad in (dict(weights="inf"), dict(weights="1e400, 1"), dict(alpha_per_model="demo:reverse=inf,1")):
        assert "finite" in client.predict(*method(**bad), api_name="/merge")[-1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    assert client.predict(*method(preset="task_arithmetic"), api_name="/merge")[-1].startswith("✓")
    status = client.predict(handle_file(str(bad)), api_name="/upload_suite")[-1]
    assert status.startswith("⚠") and "bad.jsonl, line 1: missing key 'answer'" in status
    assert "/tmp" not in status and "gradio" not in status                 # no server temp path shown
    fig, table, name, matrix, status = client.predict(1, "mlp.up_proj", *method(preset="ties"), api_name="/inspect")
    assert not status.startswith("⚠") and len(table["data"]) == 2
    assert client.predict(*method(preset="ties"), api_name="/merge")[-1].startswith("✓")


def test_smile_button_builds_the_model_chat_and_score_use(client):
    """/upscale builds the SMILE model of the loaded fine-tunes into a run: the leaderboard lists it
    with its size beside the plain merge's, and /chat and /score work on it as on a merge."""
    assert client.predict("demo:base", FTS, api_name="/load_models")[1].startswith("✓")
    summary, board, download, size, status = client.predict(16, False, 8, 1, "blocks (paper)",
                                                            api_name="/upscale")
    assert status.startswith("✓") and "smile of reverse, cipher, sort, brackets" in summary, (status, size)
    assert "a plain merge's 879,232" in size and board["data"][-1][1] == "smile"
    assert "rank_of_expert 16" in board["data"][-1][3]
    refused = client.predict(200, False, 8, 1, "blocks (paper)", api_name="/upscale")
    assert "at most 128" in refused[3] and len(client.predict(api_name="/save")) == 2
    hist, hist_c, box, status = client.predict("sort: 5213", [], [], "base", "", 0.0, 0.9, 16, api_name="/chat")
    assert box == "" and isinstance(last_reply(hist), str) and not status.startswith("⚠")
    plot, objective, board, results, status = client.predict(DEMO_SUITE, None, api_name="/score")
    assert status.startswith("✓") and set(results) == {"merged", "base", *FTS}
    assert board["data"][-1][1] == "smile" and board["data"][-1][4] is not None


def raw_call(url: str, api: str, data: list) -> str:
    """POST to gradio's /call route directly (gradio_client would upload a local path itself) and
    return the event stream's text."""
    import httpx
    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=60) as s:
        return "".join(s.iter_text())


def test_server_files_never_reach_the_scorer(client, tmp_path):
    """A reference to a file on the server's disk (not an upload) is refused by /upload_suite and
    /score; an upload is scored only once this session registered it."""
    from gradio_client import handle_file
    secret = tmp_path / "server-only.jsonl"
    secret.write_text('{"prompt": "reverse: abc", "answer": "cba", "domain": "private"}\n')
    raw = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    for api, data in (("upload_suite", [raw]), ("score", [UPLOAD_SUITE, raw])):
        text = raw_call(client.src, api, data)
        assert "event: error" in text and "private" not in text, text
    assert client.predict("demo:base", FTS[:1], api_name="/load_models")[1].startswith("✓")
    assert client.predict(*method(preset="task_arithmetic"), api_name="/merge")[-1].startswith("✓")
    out = client.predict(UPLOAD_SUITE, handle_file(str(secret)), api_name="/score")
    assert "uploaded in this session" in out[-1]
    assert "1 items" in client.predict(handle_file(str(secret)), api_name="/upload_suite")[-1]
    out = client.predict(UPLOAD_SUITE, handle_file(str(secret)), api_name="/score")
    assert out[-1].startswith("✓") and set(out[3]["merged"]) == {"private"}


def test_the_upload_guard_refuses_paths_outside_the_upload_folder(tmp_path):
    """Beside gradio's own check: the suite box's component refuses any path outside gradio's
    upload folder and any URL, before anything reads it."""
    import gradio as gr
    from dppa_ui.ui.score import upload_only
    comp = upload_only(gr.File())
    f = tmp_path / "x.jsonl"
    f.write_text("{}")
    for bad in (str(f), "https://example.com/x.jsonl", "/etc/passwd"):
        with pytest.raises(gr.Error, match="only files uploaded through this page"):
            comp.move_resource_to_block_cache(bad)


def test_session_files_are_removed_when_the_server_stops(tmp_path):
    """The app's temp folder (every session's runs and uploads) goes with the server process, on
    SIGTERM as on a normal exit."""
    import signal
    import time
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, time\n"
        "from dppa_ui.ui import build_app\nfrom dppa_ui.ui.common import TEMP\n"
        "demo = build_app(); demo.queue()\n"
        f"demo.launch(server_name='127.0.0.1', server_port={port}, prevent_thread_lock=True, quiet=True)\n"
        "print(TEMP.get(), flush=True)\n"
        "while True: time.sleep(0.5)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        root = Path(proc.stdout.readline().strip())
        from gradio_client import Client
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert c.predict("demo:base", ["demo:reverse"], api_name="/load_models")[1].startswith("✓")
        assert c.predict(*method(preset="task_arithmetic"), api_name="/merge")[-1].startswith("✓")
        assert any(root.rglob("model.safetensors"))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for _ in range(50):
            if not root.exists():
                break
            time.sleep(0.1)
        assert not root.exists()
    finally:
        proc.kill()


def test_search_over_the_api_on_an_uploaded_dev_file(client, tmp_path):
    """/search on the session's own upload (registered through /search_upload, as /upload_suite
    does; a server path is refused): the plot has a point per candidate, the table a row, and
    /search_load_best puts the best candidate's weights and density into the controls."""
    import json

    from gradio_client import Client, handle_file

    from dppa_ui import evaluation
    from dppa_ui.ui.common import CONTROL_KEYS as KEYS
    from dppa_ui.ui.search import HEADERS
    c = Client(client.src, verbose=False)                     # a session of its own
    assert c.predict("demo:base", FTS[::2], api_name="/load_models")[1].startswith("✓")
    dev = tmp_path / "my_dev.jsonl"
    items = [it for d in ("reverse", "sort") for it in evaluation.load_suite("zoo", "dev", domains=[d])[:20]]
    dev.write_text("".join(json.dumps({k: it[k] for k in ("prompt", "answer", "domain")}) + "\n" for it in items))
    text = raw_call(client.src, "search_upload", [{"path": str(dev), "meta": {"_type": "gradio.FileData"}}])
    assert "event: error" in text and "reverse" not in text
    data, status = c.predict(handle_file(str(dev)), api_name="/search_upload")
    assert data == UPLOAD_SUITE and "40 items in 2 domain(s)" in status
    table = {"headers": HEADERS, "data": [[True, "weight", "each", 0.5, 1.5], [True, "density", "shared", 0.1, 0.4]]}
    plot, rows, status, yaml_text, file = c.predict(table, "oneplusone", 4, "geometric", UPLOAD_SUITE,
                                                    handle_file(str(dev)), 0, True, *method(), api_name="/search")
    assert status.startswith("✓") and "searched 4 candidates" in status and "test split" not in status
    assert str(tmp_path) not in status
    points = json.loads(value(plot)["plot"])["data"]
    assert len(points[0]["x"]) == 4 and len(points[1]["y"]) == 4
    rows = value(rows)
    assert rows["headers"][:4] == ["#", "weight reverse", "weight sort", "density"] and len(rows["data"]) == 4
    best = max(rows["data"], key=lambda r: r[4])
    assert "merge_method: dppa" in yaml_text
    out = dict(zip([*KEYS, "preset_info", "search_status"], c.predict(api_name="/search_load_best")))
    assert out["search_status"].startswith("✓"), out["search_status"]
    weights = [float(w) for w in value(out["weights"]).split(",") if w.strip()] or [1.0, 1.0]    # '' = 1 each
    assert weights == pytest.approx(best[1:3], abs=1e-4)
    assert value(out["density"]) == pytest.approx(best[3], abs=1e-4)
