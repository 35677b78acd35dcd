"""The whole app flow over its HTTP API with gradio_client, on the committed demo family:
load -> inspect (the threshold follows the prune-rate slider) -> merge -> chat -> score -> export
YAML, and the YAML re-run through `python -m dppa_ui merge` gives the same tensors as the app's
merge. Bad input over the API gives a message and leaves the session usable.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")

from dppa_ui import chat, zoo  # noqa: E402

try:
    zoo.demo_path("base")
except ValueError:
    pytest.skip("the demo family (assets/zoo) is not built", allow_module_level=True)

from dppa_ui.ui import callbacks as cb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FTS = ["demo:reverse", "demo:cipher", "demo:sort", "demo:brackets"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    from dppa_ui.ui import build_app
    demo = build_app()
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def method(**over) -> list:
    v = dict(cb.DEFAULTS)
    v.update(over)
    return [v[k] for k in cb.METHOD_KEYS]


def value(x):
    """A component's value from an API output (plain value or an update dict)."""
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def last_reply(history) -> str:
    assert history and history[-1]["role"] == "assistant"
    return chat._text(history[-1]["content"])


def test_full_flow_over_the_api(client, tmp_path):
    # 1. load
    out = client.predict("demo:base", FTS, api_name="/load_models")
    assert out[-1].startswith("✓") and "parameters" in out[0]
    module = value(out[2])
    # 3. inspect: the keep threshold rises with the prune rate, for every fine-tune
    def thresholds(rate):
        fig, table, name, status = client.predict(0, module, *method(preset="dppa", prune_rate=rate),
                                                  api_name="/inspect")
        assert status == "" and fig["type"] == "plotly"
        rows = table["data"]
        assert [r[0] for r in rows] == FTS
        return [float(r[2]) for r in rows]
    lo, hi = thresholds(0.5), thresholds(0.9)
    assert all(h > l > 0 for l, h in zip(lo, hi))
    # 4. merge (the exported YAML must reproduce exactly this)
    mv = method(preset="dppa", prune_rate=0.9)
    summary, board, status = client.predict(*mv, api_name="/merge")
    assert status.startswith("✓") and "Run 1: dppa" in summary
    # 5. chat: a streamed reply from the merged model and one from the base, side by side
    hist, hist_c, box, status = client.predict("reverse: buyoul", [], [], "base", "", 0.0, 0.9, 24, api_name="/chat")
    assert status == "" and box == ""
    merged_reply, base_reply = last_reply(hist), last_reply(hist_c)
    assert isinstance(merged_reply, str) and isinstance(base_reply, str)
    # 6. score: numbers in range for merged, base and every fine-tune
    plot, objective, board, results, status = client.predict(cb.DEMO_SUITE, None, api_name="/score")
    assert status.startswith("✓"), status
    assert set(results) == {"merged", "base", *FTS}
    for per in results.values():
        for s in per.values():
            assert 0.0 <= s["em"] <= 1.0 and 0.0 <= s["smooth"] <= 1.0
    obj = float(re.search(r"\*\*([0-9.]+)\*\*", objective).group(1))
    assert 0.0 <= obj <= 2.0
    assert board["data"][0][1] == "dppa"
    # Four skills merged at 90% pruning keep little exact match; the replies are checked below on a
    # merge whose scores show a kept skill.
    # save -> the app's merged tensors
    zpath, status = client.predict(api_name="/save")
    assert status.startswith("✓")
    with zipfile.ZipFile(value(zpath)) as z:
        z.extractall(tmp_path / "app")
    app_dir = next((tmp_path / "app").iterdir())
    # export YAML -> CLI merge -> the same tensors
    text, yfile, status = client.predict("demo:base", FTS, *mv, api_name="/export_yaml")
    assert status.startswith("✓") and "merge_method: dppa" in text
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "dppa_ui", "merge", str(cfg), "--out", str(tmp_path / "cli"),
                          "--quiet", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    from conftest import read_weights_from
    import torch
    a, b = read_weights_from(app_dir), read_weights_from(tmp_path / "cli")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_merged_replies_differ_from_the_base_where_the_scores_say_so(client):
    """One fine-tune pruned by DP to density 0.5 keeps its skill (EM 0.975 in the README table):
    the scores say so, and its chat replies on that skill are non-empty and unlike the base's."""
    assert client.predict("demo:base", ["demo:reverse"], api_name="/load_models")[-1].startswith("✓")
    assert client.predict(*method(preset="dp", prune_rate=0.5), api_name="/merge")[-1].startswith("✓")
    _, _, _, results, status = client.predict(cb.DEMO_SUITE, None, api_name="/score")
    assert status.startswith("✓"), status
    assert results["merged"]["reverse"]["em"] >= results["base"]["reverse"]["em"] + 0.5, results
    items = [it for it in cb.demo_items() if it["domain"] == "reverse"][:5]
    differ = 0
    for it in items:
        h, hc, *_ = client.predict(it["prompt"], [], [], "base", "", 0.0, 0.9, 32, api_name="/chat")
        assert last_reply(h).strip(), "the merged model answered nothing on a skill it scores on"
        differ += last_reply(h) != last_reply(hc)
    assert differ >= 3, differ


def test_bad_input_over_the_api_leaves_the_session_usable(client, tmp_path):
    out = client.predict("demo:base", FTS[:2], api_name="/load_models")
    assert out[-1].startswith("✓")
    assert "at least one fine-tune" in client.predict("demo:base", [], api_name="/load_models")[-1]
    assert "outside the allowed model folders" in client.predict("/etc", "demo:base", FTS[:2], api_name="/add_model")[-1]
    assert "hub" in client.predict("nobody/no-such-model", "demo:base", FTS[:2], api_name="/add_model")[-1]
    assert "weights" in client.predict(0, "mlp.up_proj", *method(weights="1, 2, 3"), api_name="/inspect")[-1]
    assert "merge first" in client.predict(cb.DEMO_SUITE, None, api_name="/score")[-1]
    from gradio_client import handle_file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    client.predict(*method(preset="task_arithmetic"), api_name="/merge")
    status = client.predict(cb.UPLOAD_SUITE, handle_file(str(bad)), api_name="/score")[-1]
    assert status.startswith("⚠") and "missing key 'answer'" in status
    # still usable: the same session inspects and merges
    fig, table, name, status = client.predict(1, "mlp.up_proj", *method(preset="ties"), api_name="/inspect")
    assert status == "" and len(table["data"]) == 2
    assert client.predict(*method(preset="ties"), api_name="/merge")[-1].startswith("✓")
