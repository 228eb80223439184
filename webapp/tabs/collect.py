"""Collect: create products, take photos one by one or as a burst from the webcam, or upload files."""
from __future__ import annotations

import gradio as gr

from ntsnet.predictor import EMPTY_SCENE

from ..common import CONDITION_TAGS, MAX_BURST_SECONDS
from ..live import SessionMemory
from .common import Screen, act, session_of


def camera_constraints(width: int, height: int) -> dict:
    """Ask the webcam for about this size (Gradio's default, 1920x1440, makes the browser encode and upload every
    frame at that size although the model sees 448x448)."""
    return {"video": {"width": {"ideal": width}, "height": {"ideal": height}}, "audio": False}


def build(studio, screen: Screen):
    """Returns the product dropdown (the app fills it on load)."""
    latest_frames = SessionMemory(keep_seconds=120)  # session -> last webcam frame; forgotten when idle
    with gr.Tab("Collect"):
        with gr.Row():
            with gr.Column(scale=1):
                product = gr.Dropdown(label="Product", choices=studio.product_names(), value=None, interactive=True)
                with gr.Accordion("New product", open=not studio.product_names()):
                    new_name = gr.Textbox(label="Name", placeholder="e.g. Oat milk 1 L")
                    new_sku = gr.Textbox(label="SKU / barcode (optional)")
                    create_btn = gr.Button("Create product")
                tags = gr.CheckboxGroup(CONDITION_TAGS, label="Condition tags for this session")
                on_counter = gr.Checkbox(label="On the checkout counter: keep only the item, as Checkout sees it",
                                         value=False)
                count = gr.Markdown("")
            with gr.Column(scale=2):
                cam = gr.Image(label="Camera", sources=["webcam"], streaming=True, type="numpy",
                               webcam_options=gr.WebcamOptions(mirror=False, constraints=camera_constraints(1280, 720)))
                cam_state = gr.Markdown("")
                with gr.Row():
                    snap_btn = gr.Button("Take photo", variant="primary")
                    burst_every = gr.Number(label="Burst: every (ms)", value=500, minimum=100)
                    burst_secs = gr.Number(label="for (s)", value=5, minimum=1, maximum=MAX_BURST_SECONDS)
                    burst_btn = gr.Button("Burst")
                    empty_btn = gr.Button("Capture the empty scene (3 s)")
                uploads = gr.File(label="Or drop photo files", file_count="multiple", file_types=["image"])
                upload_btn = gr.Button("Save uploaded files")
                collect_msg = gr.Markdown("")
        gallery = gr.Gallery(label="Photos of this product (newest first)", columns=8, height=300)

    def counted(name):
        return f"**{studio.photo_count(name)}** photos of “{name}”" if name else ""

    def on_create(name, sku):
        msg = act(studio.create_product, name, sku)
        return screen.product_choices(name.strip()), msg, "", "", screen.status_line()

    def on_frame(frame, request: gr.Request):
        latest_frames.put(session_of(request), frame)
        return "camera live"  # a stream needs an output to keep its round trip going

    def on_snap(name, tag_list, counter, request: gr.Request):
        r = act(studio.save_photo, latest_frames.get(session_of(request)), name, tag_list, source="webcam", on_counter=counter)
        return r["message"], studio.gallery(name), counted(name), screen.status_line()

    def on_burst(name, tag_list, every_ms, seconds, counter, request: gr.Request):
        key = session_of(request)
        for step in act(studio.burst, lambda: latest_frames.get(key), name, tag_list, every_ms, seconds, on_counter=counter):
            yield step["message"], studio.gallery(name), counted(name), screen.status_line()

    def on_empty_scene(request: gr.Request):
        key = session_of(request)
        for step in act(studio.capture_empty_scene, lambda: latest_frames.get(key)):
            yield step["message"], studio.gallery(EMPTY_SCENE), counted(EMPTY_SCENE), screen.status_line()

    def on_upload(files, name, tag_list):
        r = act(studio.save_uploads, files, name, tag_list)
        return r["message"], studio.gallery(name), None, screen.status_line()

    create_btn.click(on_create, [new_name, new_sku], [product, collect_msg, new_name, new_sku, screen.header])
    cam.stream(on_frame, [cam], [cam_state], stream_every=0.1, concurrency_limit=None, show_progress="hidden")
    snap_btn.click(on_snap, [product, tags, on_counter], [collect_msg, gallery, count, screen.header])
    burst_btn.click(on_burst, [product, tags, burst_every, burst_secs, on_counter], [collect_msg, gallery, count, screen.header])
    empty_btn.click(on_empty_scene, None, [collect_msg, gallery, count, screen.header]).then(
        lambda: screen.product_choices(EMPTY_SCENE), None, product)
    upload_btn.click(on_upload, [uploads, product, tags], [collect_msg, gallery, uploads, screen.header])
    def on_product(name):
        return studio.gallery(name), counted(name)

    product.change(on_product, [product], [gallery, count])
    return product
