"""The page's component registry and the one way handlers are wired.

Sections register components under string keys (`page.add("histogram", gr.Plot(...))`). A
handler is a plain function of one dict {key: value} returning a dict {key: value} (or yielding
such dicts): testable without a browser, and independent of the order of components. `page.on`
binds it: the event's inputs are the listed keys in that order (the app's API signature), and
only the keys a handler returns are updated.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import gradio as gr


class Page:
    def __init__(self):
        self.c: dict[str, gr.components.Component] = {}

    def add(self, key: str, component):
        if key in self.c:
            raise KeyError(f"component {key!r} registered twice")
        self.c[key] = component
        return component

    def __getitem__(self, key: str):
        return self.c[key]

    def __contains__(self, key: str) -> bool:
        return key in self.c

    def many(self, keys: Iterable[str]) -> list:
        return [self.c[k] for k in keys]

    def bind(self, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], progress: bool = False):
        """(wrapper, input components, output components) for gradio. The wrapper calls
        fn({key: value}) and maps the returned keys to components; with `progress` the dict also
        gets a gr.Progress under "progress"."""
        comps_out = {k: self.c[k] for k in outputs}

        def convert(result: dict) -> dict:
            unknown = set(result) - set(comps_out)
            if unknown:
                raise KeyError(f"{fn.__name__} returned keys that are not its outputs: {sorted(unknown)}")
            return {comps_out[k]: v for k, v in result.items()}

        if inspect.isgeneratorfunction(fn):
            def wrapper(*args):
                values = dict(zip(inputs, args))
                if progress:
                    values["progress"] = args[len(inputs)]
                for result in fn(values):
                    yield convert(result)
        else:
            def wrapper(*args):
                values = dict(zip(inputs, args))
                if progress:
                    values["progress"] = args[len(inputs)]
                return convert(fn(values))
        params = [inspect.Parameter(k.replace("-", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in inputs]
        if progress:
            params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper, self.many(inputs), list(comps_out.values())

    def on(self, triggers, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], *,
           progress: bool = False, **kwargs):
        """gr.on(triggers, ...) with `fn` bound as above; returns the event (for .then chains)."""
        wrapper, ins, outs = self.bind(fn, inputs, outputs, progress)
        if not isinstance(triggers, (list, tuple)):
            triggers = [triggers]
        return gr.on(list(triggers), wrapper, ins, outs, **kwargs)

    def then(self, event, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], *,
             progress: bool = False, **kwargs):
        wrapper, ins, outs = self.bind(fn, inputs, outputs, progress)
        return event.then(wrapper, ins, outs, **kwargs)
