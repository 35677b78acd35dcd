"""The page's component registry and the one way handlers are wired.

Sections register components under string keys (`page.add("histogram", gr.Plot(...))`). A
handler is a plain function of one dict {key: value} returning a dict {key: value} (or yielding
such dicts): testable without a browser, and independent of the order of components. `page.on`
binds it: the event's inputs are the listed keys in that order (the app's API signature), and
only the keys a handler returns are updated (none: nothing changes). Every bound handler is
recorded in `page.events`, so a test can call each one as the page would.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import gradio as gr


@dataclass(frozen=True)
class Event:
    """One bound handler: `fn` of {key: value} with the event's input and output keys."""
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    progress: bool
    oauth: bool
    bound: Callable            # what gradio calls: fn's wrapper of positional arguments


class Page:
    def __init__(self):
        self.c: dict[str, gr.components.Component] = {}
        self.events: list[Event] = []

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

    def bind(self, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], progress: bool = False,
             oauth: bool = False):
        """(wrapper, input components, output components) for gradio. The wrapper calls
        fn({key: value}) and maps the returned keys to components; with `progress` the dict also
        gets a gr.Progress under "progress", with `oauth` the Space login's token (or None) under
        "oauth_token"."""
        comps_out = {k: self.c[k] for k in outputs}
        specials = ["progress"] * progress + ["oauth_token"] * oauth

        def convert(result: dict):
            unknown = set(result) - set(comps_out)
            if unknown:
                raise KeyError(f"{fn.__name__} returned keys that are not its outputs: {sorted(unknown)}")
            if not result:         # gradio refuses an empty dict (a ValueError per call): nothing changes
                return gr.skip()
            return {comps_out[k]: v for k, v in result.items()}

        def values_of(args) -> dict:
            return {**dict(zip(inputs, args)), **dict(zip(specials, args[len(inputs):]))}

        if inspect.isgeneratorfunction(fn):
            def wrapper(*args):
                # Each yield carries every key yielded before (unchanged: gradio then streams no edit
                # for it). A key left out after an update is streamed as that update's fields deleted,
                # which the page applies to the component's value: a table then holds
                # {"__type__": "update"} and every event that reads it fails.
                sent: dict = {}
                for result in fn(values_of(args)):
                    sent.update(result)
                    yield convert(dict(sent))
        else:
            def wrapper(*args):
                return convert(fn(values_of(args)))
        params = [inspect.Parameter(k.replace("-", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in inputs]
        if progress:
            params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
        if oauth:       # gradio fills a parameter annotated so with the login's token
            params.append(inspect.Parameter("oauth_token", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                            annotation=gr.OAuthToken | None))
            wrapper.__annotations__ = {"oauth_token": gr.OAuthToken | None}
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        self.events.append(Event(fn, tuple(inputs), tuple(outputs), progress, oauth, wrapper))
        return wrapper, self.many(inputs), list(comps_out.values())

    def on(self, triggers, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], *,
           progress: bool = False, oauth: bool = False, **kwargs):
        """gr.on(triggers, ...) with `fn` bound as above; returns the event (for .then chains)."""
        wrapper, ins, outs = self.bind(fn, inputs, outputs, progress, oauth)
        if not isinstance(triggers, (list, tuple)):
            triggers = [triggers]
        return gr.on(list(triggers), wrapper, ins, outs, **kwargs)
    def then(self, event, fn: Callable[[dict], dict], inputs: list[str], outputs: list[str], *,
             progress: bool = False, **kwargs):
        wrapper, ins, outs = self.bind(fn, inputs, outputs, progress)
        return event.then(wrapper, ins, outs, **kwargs)
