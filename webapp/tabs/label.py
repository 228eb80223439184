"""Label: the gallery is the selection. Filter the photos, click pictures to select them (Shift or the Range box
for a range), then move, delete, set the split or tag them all at once; Undo reverses the last edit."""
from __future__ import annotations

import gradio as gr

from ..common import CONDITION_TAGS
from ..labelling import Selection
from .common import Screen, act

ALL = "(all)"
SPLITS = [ALL, "train", "val", "test"]
SOURCES = [ALL, "webcam", "upload", "import"]
WARNINGS = [ALL, "blurry", "too dark", "too bright", "too small"]


def _value(choice):
    return None if choice in (None, "", ALL) else choice


def build(studio, screen: Screen):
    selection = gr.State(Selection())
    with gr.Tab("Label") as tab:
        with gr.Row():
            product = gr.Dropdown([ALL, *studio.product_names()], value=ALL, label="Show product", interactive=True)
            split = gr.Dropdown(SPLITS, value=ALL, label="Split")
            tag = gr.Dropdown([ALL, *CONDITION_TAGS], value=ALL, label="Tag")
            source = gr.Dropdown(SOURCES, value=ALL, label="Source")
            warning = gr.Dropdown(WARNINGS, value=ALL, label="Quality warning")
            unlabelled = gr.Checkbox(label="Unlabelled uploads only")
            suspects = gr.Checkbox(label="Suspects only")
        gallery = gr.Gallery(label="Click pictures to select them (caption: #id · split · warnings · tags)", columns=8, height="auto",
                             allow_preview=False, elem_id="label-gallery")
        with gr.Row():
            count = gr.Markdown("No photo selected.", elem_id="selection-count")
            shift = gr.Checkbox(label="Range (hold Shift)", elem_id="range-select", scale=0)
            all_btn = gr.Button("Select all shown", size="sm")
            clear_btn = gr.Button("Clear selection", size="sm")
            like_btn = gr.Button("Show photos like the first selected", size="sm")
        with gr.Row():
            move_to = gr.Dropdown(studio.product_names(), value=None, label="Move selected to (or type a new product)",
                                  allow_custom_value=True)
            move_btn = gr.Button("Move", variant="primary")
            delete_btn = gr.Button("Delete (to trash)", variant="stop")
            undo_btn = gr.Button("Undo last edit (U)", elem_id="undo")
        with gr.Row():
            new_split = gr.Dropdown(["train", "val", "test"], value=None, label="Set split")
            split_btn = gr.Button("Set split")
            tag_name = gr.Dropdown(CONDITION_TAGS, value=None, label="Tag", allow_custom_value=True)
            tag_add = gr.Button("Add tag")
            tag_remove = gr.Button("Remove tag")
        message = gr.Markdown("")
        counts = gr.Dataframe(headers=["product", "SKU", "photos", "train", "val", "test"], value=studio.product_table(),
                              label="Photos per product and split", interactive=False)

    filters = [product, split, tag, source, warning, unlabelled, suspects]

    def render(sel: Selection, *chosen):
        """The filtered photos, the selection kept for those still shown, and the count."""
        p, sp, tg, src, warn, unl, sus = chosen
        photos = act(studio.photos, _value(p), _value(sp), _value(tg), _value(src), _value(warn), bool(unl), bool(sus))
        sel.show([ph["id"] for ph in photos])
        return sel, studio.gallery_items(photos, sel), _count(sel)

    def _count(sel: Selection) -> str:
        n = len(sel.selected)
        return f"**{n}** of {len(sel.shown)} shown selected." if n else f"No photo selected ({len(sel.shown)} shown)."

    def refresh(sel, *chosen):
        names = studio.product_names()
        return (*render(sel, *chosen), studio.product_table(), gr.update(choices=[ALL, *names]), gr.update(choices=names))

    outputs = [selection, gallery, count, counts, product, move_to]

    def on_click(sel: Selection, range_held: bool, p, sp, tg, src, warn, unl, sus, evt: gr.SelectData):
        sel.click(evt.index if isinstance(evt.index, int) else evt.index[0], shift=bool(range_held))
        return render(sel, p, sp, tg, src, warn, unl, sus)

    def bulk(action):
        def run(sel: Selection, value, *chosen):
            msg = act(action, sel.ids(), value)
            sel.clear()
            return (msg, *refresh(sel, *chosen))
        return run

    def on_undo(sel: Selection, *chosen):
        return (act(studio.undo), *refresh(sel, *chosen))

    for trigger in (*(f.change for f in filters), tab.select):
        trigger(refresh, [selection, *filters], outputs)
    gallery.select(on_click, [selection, shift, *filters], [selection, gallery, count], show_progress="hidden")
    all_btn.click(lambda sel, *c: render(sel.all(), *c), [selection, *filters], [selection, gallery, count])
    clear_btn.click(lambda sel, *c: render(sel.clear(), *c), [selection, *filters], [selection, gallery, count])
    def on_like(sel: Selection):
        if not sel.ids():
            return sel, gr.skip(), "Select a photo first."
        source = sel.ids()[0]
        photos = act(studio.more_like_this, source, k=32)
        sel.show([p["id"] for p in photos]).clear()
        return sel, studio.gallery_items(photos, sel), f"The {len(photos)} photos most like #{source}, most alike first."

    like_btn.click(on_like, selection, [selection, gallery, count])
    move_btn.click(bulk(studio.move_selected), [selection, move_to, *filters], [message, *outputs])
    delete_btn.click(bulk(lambda ids, _: studio.delete_selected(ids)), [selection, gr.State(""), *filters], [message, *outputs])
    split_btn.click(bulk(studio.set_split), [selection, new_split, *filters], [message, *outputs])
    tag_add.click(bulk(lambda ids, t: studio.tag_selected(ids, add=[t] if t else [])), [selection, tag_name, *filters], [message, *outputs])
    tag_remove.click(bulk(lambda ids, t: studio.tag_selected(ids, remove=[t] if t else [])), [selection, tag_name, *filters],
                     [message, *outputs])
    undo_btn.click(on_undo, [selection, *filters], [message, *outputs])
