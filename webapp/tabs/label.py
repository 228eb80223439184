"""Label: browse a product's photos (or the unlabelled uploads), move or delete them, review with the active model."""
from __future__ import annotations

import gradio as gr

from .common import Screen, act, fail


def build(studio, screen: Screen):
    with gr.Tab("Label") as tab:
        with gr.Row():
            browse = gr.Dropdown(label="Browse product", choices=studio.product_names(), interactive=True)
            show_unlabelled = gr.Checkbox(label="Show unlabelled uploads instead")
            refresh = gr.Button("Refresh")
        gallery = gr.Gallery(label="Photos (caption: #id · split · warnings · tags)", columns=8, height=320)
        with gr.Row():
            selected = gr.CheckboxGroup(label="Select photos by id", choices=[])
            move_to = gr.Dropdown(label="Move selected to", choices=studio.product_names(), interactive=True)
            move_btn = gr.Button("Move")
            confirm_delete = gr.Checkbox(label="Yes, delete permanently")
            delete_btn = gr.Button("Delete selected", variant="stop")
        message = gr.Markdown("")
        counts = gr.Dataframe(headers=["product", "SKU", "photos", "train", "val", "test"], value=studio.product_table(),
                              label="Photos per product and split", interactive=False)
        with gr.Accordion("Review with the active model", open=False):
            scan_btn = gr.Button("List possible mislabels")
            mislabels = gr.Dataframe(headers=["id", "label", "predicted", "confidence"], interactive=False)
            suggest_btn = gr.Button("Suggest products for unlabelled uploads")
            suggestions = gr.Dataframe(headers=["id", "suggested", "confidence"], interactive=False)
            with gr.Row():
                confirm_id = gr.Number(label="Photo id", precision=0)
                confirm_product = gr.Dropdown(label="Product", choices=studio.product_names(), allow_custom_value=True)
                confirm_btn = gr.Button("Confirm label")

    def label_view(name, unlabelled):
        ids = [str(i["id"]) for i in studio.label_view(name, bool(unlabelled))]
        names = studio.product_names()
        return (studio.gallery(name, unlabelled=bool(unlabelled)), gr.update(choices=ids, value=[]), studio.product_table(),
                gr.update(choices=names), gr.update(choices=names), gr.update(choices=names))

    outputs = [gallery, selected, counts, browse, move_to, confirm_product]

    def on_move(ids, target, name, unlabelled):
        return (act(studio.move_photos, ids, target), *label_view(name, unlabelled))

    def on_delete(ids, confirmed, name, unlabelled):
        if not confirmed:
            fail("Tick “Yes, delete permanently” first.")
        return (act(studio.delete_photos, ids), *label_view(name, unlabelled))

    def on_scan():
        if studio.predictor() is None:
            gr.Info("No active model yet: train one first.")
        return [[r["id"], r["label"], r["predicted"], round(r["confidence"], 3)] for r in act(studio.possible_mislabels)]

    def on_suggest():
        return [[r["id"], r["suggested"] or "(no model)", round(r["confidence"], 3)] for r in act(studio.suggestions)]

    def on_confirm(image_id, product, name, unlabelled):
        if not image_id or not product:
            fail("Give a photo id and a product.")
        return (act(studio.confirm_suggestion, int(image_id), product), *label_view(name, unlabelled))

    for trigger in (browse.change, show_unlabelled.change, refresh.click, tab.select):
        trigger(label_view, [browse, show_unlabelled], outputs)
    move_btn.click(on_move, [selected, move_to, browse, show_unlabelled], [message, *outputs])
    delete_btn.click(on_delete, [selected, confirm_delete, browse, show_unlabelled], [message, *outputs])
    scan_btn.click(on_scan, None, mislabels)
    suggest_btn.click(on_suggest, None, suggestions)
    confirm_btn.click(on_confirm, [confirm_id, confirm_product, browse, show_unlabelled], [message, *outputs])
