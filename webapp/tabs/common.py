"""What the tabs share: the status line at the top, turning a StudioError into the message a person sees, and the
product choices of every dropdown."""
from __future__ import annotations

import gradio as gr

from ..common import StudioError


def fail(message) -> None:
    raise gr.Error(str(message))


def act(fn, *args, **kwargs):
    """Run a Studio action; its StudioError becomes the message the person sees."""
    try:
        return fn(*args, **kwargs)
    except StudioError as exc:
        fail(exc)


def session_of(request: gr.Request | None) -> str:
    return request.session_hash if request else "-"


class Screen:
    """The app's shared header (active model, products, readiness) and whether capture is on."""

    def __init__(self, studio, allow_capture: bool):
        self.studio, self.allow_capture = studio, allow_capture
        self.header = None

    def status_line(self) -> str:
        name = self.studio.active_model_name()
        model = f"Active model: **{name}**" if name else "No trained model active: Recognise uses the instant model."
        if not self.allow_capture:  # a public demo says nothing about the catalogue behind it
            return model
        return f"{model} · {len(self.studio.product_names())} products · {self.studio.training_readiness()[1]}"

    def product_choices(self, selected=None):
        names = self.studio.product_names()
        return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))
