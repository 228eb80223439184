"""Recognise: the live webcam (or one photo) with the product, its confidence, the top 5 and the Navigator's boxes."""
from __future__ import annotations

import gradio as gr

from .collect import camera_constraints
from .common import act, session_of


def build(studio, live_fps: float, screen=None, product=None):
    """``product``: Collect's product dropdown; with it (capture on) an unknown product can be added from here."""
    def recognise_hint():
        return ("" if studio.active_checkpoint() else "**No trained model yet.** Collect photos of at least two products "
                "and click Train: each better model answers here as soon as it is ready.")

    with gr.Tab("Recognise") as tab:
        hint_md = gr.Markdown(recognise_hint())
        with gr.Row():
            with gr.Column():
                live = gr.Image(label="Live camera", sources=["webcam"], streaming=True, type="numpy",
                                webcam_options=gr.WebcamOptions(mirror=False, constraints=camera_constraints(640, 480)))
                photo = gr.Image(label="Or a photo", sources=["upload", "clipboard"], type="numpy")
            with gr.Column():
                # JPEG encodes a frame far faster than the default WebP
                annotated = gr.Image(label="What the model looked at (numbered by rank)", interactive=False, format="jpeg",
                                     elem_id="recognised-frame")
                answer = gr.Markdown("")
                top5 = gr.Label(label="Top 5", num_top_classes=5)
                if product is not None:
                    with gr.Accordion("Not in the catalogue? Add it", open=False):
                        new_name = gr.Textbox(label="New product's name", placeholder="e.g. Royal Gala apples")
                        add_btn = gr.Button("Add as a new product (the last unknown frame is its first photo)")
                        added = gr.Markdown("")

    def show(r):
        if r is None:
            return gr.skip(), gr.skip(), gr.skip()
        if not r.fresh:  # the model is busy: newest frame, last boxes; the text and top-5 stay as they are
            return r.annotated, gr.skip(), gr.skip()
        how = f"model: {r.model} · {r.backend} · {r.answers_per_s:.1f} answers/s"
        return r.annotated, f"## {r.label}  \n" + (f"{r.confidence:.0%} confident · {how}" if r.sure else how), r.top5 or None

    def on_recognise(frame, request: gr.Request):
        return show(studio.recognise(frame, session=session_of(request)))

    def on_photo(image, request: gr.Request):
        return show(studio.recognise(image, session=session_of(request), wait=True))

    # the browser sends the next frame only after the answer to the last one: frames in between are dropped, not queued
    live.stream(on_recognise, [live], [annotated, answer, top5], stream_every=1 / live_fps, concurrency_limit=None, show_progress="hidden")
    photo.change(on_photo, [photo], [annotated, answer, top5])
    tab.select(recognise_hint, None, hint_md)
    if product is None:
        return

    def on_add(name, request: gr.Request):
        r = act(studio.add_unknown_as_product, session_of(request), name)
        return r["message"], "", screen.product_choices(name.strip()), screen.status_line()

    add_btn.click(on_add, [new_name], [added, new_name, product, screen.header])
