"""Evaluate: the active model's accuracy on a split, under store conditions, its confusions and the unknown-product
trade-off."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from .common import act


def report_tables(rep: dict, split: str):
    """The report as the tab shows it: summary, condition rows, confusion pixels, confused pairs, open-set rows."""
    rows = [[c, round(r["accuracy"], 4), r["n"]] for c, r in rep["conditions"].items()]
    rows += [[f"tag: {t}", round(r["accuracy"], 4), r["n"]] for t, r in rep.get("tags", {}).items()]
    summary = f"**{rep['n']} photos** ({split}): top-1 **{rep['accuracy']:.1%}**, top-5 {rep['top5']:.1%}"
    table, picture, o = [], None, rep.get("open_set")
    if o:
        summary += f"  \nUnknown products ({o['n_unknown']} photos): AUROC **{o['auroc']:.3f}**"
        table = [[r["coverage"], r["threshold"], round(r["known_accepted"], 3), round(r["accuracy_on_accepted"], 3),
                  round(r["unknown_rejected"], 3)] for r in o["coverage"]]
        drawn = Path(rep["confusion_png"]).with_name("open_set.png")
        picture = np.asarray(Image.open(drawn).convert("RGB")) if drawn.exists() else None
    # pixels, not the file: the catalogue folder (runs included) is never served
    confusion = np.asarray(Image.open(rep["confusion_png"]).convert("RGB"))
    return summary, rows, confusion, [[m["true"], m["predicted"], m["count"]] for m in rep["most_confused"]], table, picture


def build(studio):
    with gr.Tab("Evaluate"):
        with gr.Row():
            split = gr.Radio(["test", "val", "train"], value="test", label="Split")
            unknown_box = gr.Textbox(label="Unknown products (held out of training), comma-separated")
            eval_btn = gr.Button("Evaluate the active model", variant="primary")
        summary = gr.Markdown("")
        conditions = gr.Dataframe(headers=["condition", "accuracy", "photos"], interactive=False, label="Store conditions")
        with gr.Row():
            confusion = gr.Image(label="Confusion matrix", interactive=False)
            pairs = gr.Dataframe(headers=["true", "predicted", "count"], interactive=False, label="Most confused pairs")
        with gr.Row():
            open_set = gr.Dataframe(headers=["coverage", "threshold", "known accepted", "accuracy on accepted", "unknowns rejected"],
                                    interactive=False, label="Unknown products: accuracy / coverage trade-off")
            open_set_plot = gr.Image(label="Scores of known and unknown products", interactive=False)

    def on_evaluate(split_name, unknown_names, progress=gr.Progress(track_tqdm=True)):
        unknown = [u.strip() for u in (unknown_names or "").split(",")]
        return report_tables(act(studio.evaluate, split_name, progress=True, unknown_products=unknown), split_name)

    eval_btn.click(on_evaluate, [split, unknown_box], [summary, conditions, confusion, pairs, open_set, open_set_plot])
