"""Review: the queue of suspicious photos, most suspicious first, each shown large beside photos of its product and
of the suggested one, answered with one key (A accept, K keep, D delete, S skip, arrows to move); unlabelled uploads
by suggested product; "more like this"; coverage with "capture next" hints; and the map of the catalogue."""
from __future__ import annotations

import gradio as gr

from .common import Screen, act

KIND_TEXT = {"wrong-label": "looks like another product", "session": "a whole capture session looks like another product",
             "duplicate": "the same picture is filed under another product", "outlier": "looks like no product of the catalogue"}
SHORTCUTS = """() => {
  if (window.ntsKeys) return; window.ntsKeys = true;
  const press = (id) => { const b = document.getElementById(id); if (b) b.click(); };
  const keys = {a: 'review-accept', k: 'review-keep', d: 'review-delete', s: 'review-skip', u: 'undo',
                ArrowRight: 'review-next', ArrowLeft: 'review-prev'};
  const range = () => document.querySelector('#range-select input');
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Shift') { const r = range(); if (r && !r.checked) r.click(); return; }
    const tag = (e.target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key]) { e.preventDefault(); press(keys[e.key]); }
  });
  document.addEventListener('keyup', (e) => { if (e.key === 'Shift') { const r = range(); if (r && r.checked) r.click(); } });
}"""


def build(studio, screen: Screen):
    queue, position = gr.State([]), gr.State(0)
    with gr.Tab("Review") as tab:
        with gr.Row():
            refresh_btn = gr.Button("Review the catalogue again")
            status = gr.Markdown("")
        with gr.Row():
            with gr.Column(scale=2):
                photo = gr.Image(label="Suspect", interactive=False, height=360)
                about = gr.Markdown("")
            with gr.Column(scale=3):
                own = gr.Gallery(label="Its product now", columns=6, height=150, allow_preview=False)
                other = gr.Gallery(label="The suggested product", columns=6, height=150, allow_preview=False)
        with gr.Row():
            prev_btn = gr.Button("← Previous", elem_id="review-prev")
            accept_btn = gr.Button("Accept suggestion (A)", variant="primary", elem_id="review-accept")
            keep_btn = gr.Button("Keep label (K)", elem_id="review-keep")
            delete_btn = gr.Button("Delete (D)", variant="stop", elem_id="review-delete")
            skip_btn = gr.Button("Skip (S)", elem_id="review-skip")
            next_btn = gr.Button("Next →", elem_id="review-next")
        with gr.Accordion("Unlabelled uploads by suggested product", open=False):
            groups_table = gr.Dataframe(headers=["suggested product", "photos"], interactive=False)
            with gr.Row():
                group_pick = gr.Dropdown([], label="Group")
                group_product = gr.Dropdown(studio.product_names(), label="Label them", allow_custom_value=True)
                group_btn = gr.Button("Confirm the group")
        with gr.Accordion("More like this", open=False):
            with gr.Row():
                like_id = gr.Number(label="Photo id", precision=0)
                like_btn = gr.Button("Show the most similar photos")
            like_gallery = gr.Gallery(columns=8, height=200, allow_preview=False)
        with gr.Accordion("Coverage and what to capture next", open=False):
            hints = gr.Markdown("")
            coverage = gr.Dataframe(headers=["product", "photos", "train", "val", "test", "tags", "looks like"], interactive=False)
        with gr.Accordion("Map of the catalogue (suspects marked; select a region to see its photos)", open=False):
            plot = gr.ScatterPlot(x="x", y="y", color="colour", tooltip=["id", "product", "suspect"], height=420)
            region = gr.Gallery(label="Photos in the selected region", columns=8, height=200, allow_preview=False)
        with gr.Row():
            splits_btn = gr.Button("Keep near-duplicates of a product in the training photos")
            splits_msg = gr.Markdown("")

    def show(items, pos):
        if not items:
            return None, "Nothing to review: no photo looks mislabelled.", [], [], f"{len(items)} suspects"
        pos = max(0, min(pos, len(items) - 1))
        s = items[pos]
        image = studio.photo_pixels(s["id"])
        text = (f"**{pos + 1} / {len(items)}** · photo #{s['id']} · **{s['product'] or 'unlabelled'}** — {KIND_TEXT[s['kind']]}"
                + (f"; suggested **{s['suggested']}**" if s.get("suggested") else "") + f" (score {s['score']:.2f})")
        strip = lambda name: [(studio.thumbnail_file(r), f"#{r['id']}") for r in studio.photos(product=name, limit=6)] if name else []  # noqa: E731
        return image, text, strip(s["product"]), strip(s.get("suggested")), f"{len(items)} suspects"

    def load(refresh=False):
        items = act(studio.review_queue, refresh=refresh)
        return (items, 0, *show(items, 0))

    outputs = [queue, position, photo, about, own, other, status]

    def step(delta):
        def run(items, pos):
            pos = max(0, min(pos + delta, len(items) - 1)) if items else 0
            return (items, pos, *show(items, pos))
        return run

    def respond(answer):
        def run(items, pos):
            if not items:
                return (items, pos, *show(items, pos))
            gr.Info(act(studio.answer, items[min(pos, len(items) - 1)], answer))
            items = act(studio.review_queue)
            return (items, min(pos if answer != "skip" else pos + 1, max(len(items) - 1, 0)), *show(items, pos))
        return run

    def on_groups():
        groups = act(studio.unlabelled_groups)
        return [[g, len(ids)] for g, ids in groups.items()], gr.update(choices=list(groups))

    def on_group(name, product):
        ids = act(studio.unlabelled_groups).get(name, [])
        gr.Info(act(studio.confirm_group, ids, product or name))
        return on_groups()

    def on_like(image_id):
        return [(studio.thumbnail_file(p), f"#{p['id']} · {p['product'] or '-'} · {p['similarity']:.2f}")
                for p in act(studio.more_like_this, int(image_id or 0))]

    def on_coverage():
        table, lines = act(studio.coverage)
        return "\n".join(f"- {line}" for line in lines) or "Every product has enough varied photos.", table

    def on_map():
        import pandas as pd

        return pd.DataFrame(act(studio.embedding_map))

    def on_region(evt: gr.SelectData):
        return [(studio.thumbnail_file(p), f"#{p['id']} · {p['product'] or '-'}") for p in act(studio.map_region, evt.index)]

    refresh_btn.click(lambda: load(True), None, outputs)
    plot.select(on_region, None, region)
    splits_btn.click(lambda: act(studio.join_duplicate_splits), None, splits_msg)
    tab.select(lambda: load(False), None, outputs).then(on_groups, None, [groups_table, group_pick]).then(
        on_coverage, None, [hints, coverage]).then(on_map, None, plot)
    prev_btn.click(step(-1), [queue, position], outputs)
    next_btn.click(step(1), [queue, position], outputs)
    for btn, answer in ((accept_btn, "accept"), (keep_btn, "keep"), (delete_btn, "delete"), (skip_btn, "skip")):
        btn.click(respond(answer), [queue, position], outputs)
    group_btn.click(on_group, [group_pick, group_product], [groups_table, group_pick])
    like_btn.click(on_like, like_id, like_gallery)
