"""The data the page scores and searches on: the demo family's held-out items, and JSONL files
this session uploaded. A suite file is read only if it came through the page's upload route (a
server path sent over the API is refused before anything reads it) and this session uploaded it."""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from .. import evaluation
from .common import MAX_UPLOAD_ITEMS, SCORE_PER_DOMAIN, AppState, UserError, expected, message, ok, warn

DEMO_SUITE = "demo suite"
UPLOAD_SUITE = "uploaded JSONL"
SUITE_FORMAT = 'one JSON object per line: {"prompt": …, "answer": …, "domain": …}'


@functools.lru_cache(maxsize=2)
def _zoo_test_items() -> tuple[dict, ...]:
    return tuple(evaluation.load_suite("zoo", "test"))


def demo_items(per_domain: int | None = None) -> list[dict]:
    """The first `per_domain` test items of each demo domain (all when <= 0)."""
    n = SCORE_PER_DOMAIN if per_domain is None else per_domain
    items = _zoo_test_items()
    if n <= 0:
        return list(items)
    return [it for its in evaluation.by_domain(items).values() for it in its[:n]]


def _require_upload(path) -> None:
    from gradio.utils import get_upload_folder
    p = Path(str(path)).resolve()
    if not p.is_relative_to(Path(get_upload_folder()).resolve()):
        raise gr.Error("only files uploaded through this page are accepted (over the API: upload the file, e.g. "
                       "with gradio_client.handle_file, and call /upload_suite)")


def upload_only(component: gr.File) -> gr.File:
    """Make a File input accept only files gradio received through its upload route (they live in
    its upload folder): a path or URL of the server's own, sent over the API, is refused before
    anything reads it. Patched on the instance: a gr.File subclass would make gradio write a .pyi
    stub beside this module."""
    move, move_async = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def guarded(url_or_file_path):
        if url_or_file_path is not None:
            _require_upload(url_or_file_path)
        return move(url_or_file_path)

    async def guarded_async(url_or_file_path):
        if url_or_file_path is not None:
            _require_upload(url_or_file_path)
        return await move_async(url_or_file_path)

    component.move_resource_to_block_cache = guarded
    component.async_move_resource_to_block_cache = guarded_async
    return component


def upload_path(upload) -> str | None:
    """The server path of an upload box's value, whatever form gradio or an API client gives it in."""
    if upload is None:
        return None
    return upload if isinstance(upload, str) else getattr(upload, "path", None) or (
        upload.get("path") if isinstance(upload, dict) else None)


def read_upload(path: str) -> list[dict]:
    """The items of an uploaded suite file, or a UserError that names the file (never its server path)."""
    name = Path(path).name
    if Path(path).suffix.lower() != ".jsonl":
        raise UserError(f"{name} is not a suite file: upload a .jsonl file, {SUITE_FORMAT}")
    try:
        items = evaluation.load_suite(path, label=name)
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text: upload a .jsonl file, {SUITE_FORMAT}") from None
    if len(items) > MAX_UPLOAD_ITEMS:
        raise UserError(f"{name} has {len(items)} items; this app scores at most {MAX_UPLOAD_ITEMS} "
                        f"(DPPA_UI_MAX_UPLOAD_ITEMS; use `python -m dppa_ui score` for bigger suites)")
    return items


def register_upload(state: AppState, upload) -> tuple[str, list[dict]] | None:
    """A file that arrived through an upload box: remembered for this session, then read (None: the
    box was cleared)."""
    path = upload_path(upload)
    if not path:
        return None
    state.uploads.add(str(Path(path).resolve()))
    return path, read_upload(path)


def upload_report(state: AppState, upload) -> tuple[str, bool]:
    """(the status line, whether a suite was registered) for a file that arrived through an upload
    box: its items and domains, or what is wrong with it."""
    try:
        got = register_upload(state, upload)
    except expected() as e:
        return warn(message(e)), False
    if got is None:
        return "", False
    path, items = got
    domains = sorted({it["domain"] for it in items})
    return ok(f"{Path(path).name}: {len(items)} items in {len(domains)} domain(s): {', '.join(domains)}"), True


def session_upload(state: AppState, upload, missing: str, refused: str) -> tuple[str, list[dict]]:
    """(path, items) of a suite file this session uploaded (registered by register_upload); a path
    it did not upload, even one that exists on the server, is refused with `refused`."""
    path = upload_path(upload)
    if not path:
        raise UserError(missing)
    if str(Path(path).resolve()) not in state.uploads:
        raise UserError(refused)
    return path, read_upload(path)
