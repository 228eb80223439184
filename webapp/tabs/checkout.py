"""Checkout: a camera looking down at the counter; every item boxed and named, the basket as a table."""
from __future__ import annotations

import gradio as gr

from ..common import StudioError
from ..live import SessionMemory
from .collect import camera_constraints
from .common import fail, session_of

HOW = ("Fix the camera above the counter. Clear the counter and click **Learn the empty counter** (2 s); then put the "
       "shopping down. An item counts once it lies still; orange boxes are products not in the catalogue, grey ones "
       "are still settling.")


def build(studio, live_fps: float):
    latest_frames = SessionMemory(keep_seconds=120)
    with gr.Tab("Checkout"):
        gr.Markdown(HOW)
        with gr.Row():
            with gr.Column():
                # the Collect camera's size: "on the counter" captures there are cut out with this tab's counter
                cam = gr.Image(label="Counter camera", sources=["webcam"], streaming=True, type="numpy",
                               webcam_options=gr.WebcamOptions(mirror=False, constraints=camera_constraints(1280, 720)))
                with gr.Row():
                    learn_btn = gr.Button("Learn the empty counter", variant="primary")
                    new_btn = gr.Button("New customer")
                learn_msg = gr.Markdown(studio.checkout_status())
            with gr.Column():
                annotated = gr.Image(label="Items on the counter", interactive=False, format="jpeg", elem_id="checkout-frame")
                state = gr.Markdown("")
                basket = gr.Dataframe(headers=["product", "count"], datatype=["str", "number"], label="Basket",
                                      interactive=False, elem_id="checkout-basket")

    def on_frame(frame, request: gr.Request):
        key = session_of(request)
        latest_frames.put(key, frame)
        try:
            view = studio.checkout_frame(frame, key)
        except StudioError as exc:
            return frame, str(exc), gr.skip()
        if view is None:
            return gr.skip(), gr.skip(), gr.skip()
        return view.annotated, view.message, view.basket

    def on_learn(request: gr.Request):
        key = session_of(request)
        try:
            yield from studio.learn_counter_live(lambda: latest_frames.get(key))
        except StudioError as exc:
            fail(exc)

    def on_new(request: gr.Request):
        return studio.new_customer(session_of(request)), []

    cam.stream(on_frame, [cam], [annotated, state, basket], stream_every=1 / live_fps, concurrency_limit=None,
               show_progress="hidden")
    learn_btn.click(on_learn, None, learn_msg)
    new_btn.click(on_new, None, [state, basket])
