"""Model refs (dppa_ui.refs): the one resolver, its app policy (model roots, downloads, size cap),
registered schemes, and the file identity caches key on."""
from __future__ import annotations

import os

import pytest

from dppa_ui.refs import ModelRefError, RefPolicy, check_path_allowed, files_identity, is_hub_id, resolve_model


def test_check_path_allowed(tmp_path):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    assert check_path_allowed(root / "m", [root]) == (root / "m").resolve()
    assert check_path_allowed("m", [root]) == (root / "m").resolve()          # relative: under a root
    for bad in (outside, str(root / ".." / "secret"), "../secret", "/etc"):
        with pytest.raises(ModelRefError, match="outside the allowed model folders"):
            check_path_allowed(bad, [root])
    (root / "link").symlink_to(outside)
    for bad in (root / "link", "link"):
        with pytest.raises(ModelRefError, match="outside the allowed model folders"):
            check_path_allowed(bad, [root])


def test_app_policy_rules(tiny_llama, tmp_path, monkeypatch):
    fam = tiny_llama()
    root = fam.base.parent
    app = RefPolicy(roots=(root,))
    assert resolve_model(str(fam.base), policy=app) == fam.base.resolve()
    assert resolve_model("base", policy=app) == fam.base.resolve()              # relative to a root
    with pytest.raises(ModelRefError, match="outside the allowed"):
        resolve_model(str(fam.base), policy=RefPolicy(roots=(tmp_path,)))
    with pytest.raises(ModelRefError, match="downloads are disabled"):
        resolve_model("someone/some-model", policy=RefPolicy(roots=(root,), allow_downloads=False))
    with pytest.raises(ModelRefError, match="could not be fetched"):          # HF_HUB_OFFLINE=1 in tests
        resolve_model("someone/surely-not-cached-model", policy=app)
    # a file linked in from outside the roots would be read (and saved with the merge): refused
    sneaky = tmp_path / "roots" / "sneaky"
    sneaky.mkdir(parents=True)
    secret = tmp_path / "token.json"
    secret.write_text("{}")
    (sneaky / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(ModelRefError, match="links outside"):
        resolve_model(str(sneaky), policy=RefPolicy(roots=(tmp_path / "roots",)))
    # the open policy (the CLI) reaches any folder
    assert resolve_model(str(sneaky)) == sneaky


def test_hub_size_cap_is_stated_before_any_download(monkeypatch, tiny_llama):
    from dppa_ui import refs
    monkeypatch.setattr(refs, "hub_weight_bytes", lambda repo, rev=None: 9 << 30)
    called = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: called.append(a))
    with pytest.raises(ModelRefError, match=r"has 9\.0 GB of weights; this server downloads at most 4\.0 GB"):
        resolve_model("org/huge", policy=RefPolicy(roots=(tiny_llama().base.parent,), max_download_bytes=4 << 30))
    assert not called


def test_hub_ids_and_identity(tiny_llama, tmp_path):
    fam = tiny_llama()
    assert is_hub_id("org/name@v1") and is_hub_id("org/name")
    assert not is_hub_id("demo:base") and not is_hub_id(str(fam.base)) and not is_hub_id("/abs/path")
    a = files_identity(fam.base)
    assert a == files_identity(fam.base)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in fam.base.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert files_identity(copy) != a                       # another folder
    b = files_identity(copy)
    w = copy / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert files_identity(copy) != b                       # rewritten in place: a new identity
