"""Train: one click starts the progressive job in the background; its stages, curves, Cancel, past runs and the
choice of the model that answers."""
from __future__ import annotations

import gradio as gr

from ntsnet.backbones import list_backbones

from ..plots import training_curves
from .common import Screen, act, fail


def build(studio, screen: Screen):
    with gr.Tab("Train"):
        readiness = gr.Markdown(studio.training_readiness()[1])
        gr.Markdown("One click trains in stages (a linear head in seconds, then fine-tuning, then NTS-Net). Each stage "
                    "answers in Recognise as soon as it is at least as accurate as the model answering now.")
        with gr.Row():
            backbone = gr.Dropdown(list_backbones(), value="efficientnet_lite0", label="Backbone", allow_custom_value=True,
                                   info="or type timm/NAME for any timm model (weights from the Hub, or NTSNET_TIMM_WEIGHTS)")
            minutes = gr.Number(label="Time budget (minutes; empty: 3 + 1 per 100 photos)", value=None)
            k_parts = gr.Radio([0, 2, 4], value=4, label="K (parts the Scrutinizer uses)")
        with gr.Accordion("Advanced: the paper's single-stage recipe", open=False):
            with gr.Row():
                recipe = gr.Radio(["progressive", "paper"], value="progressive", label="Recipe")
                epochs = gr.Slider(1, 200, value=10, step=1, label="Epochs (paper)")
                input_size = gr.Dropdown([96, 224, 320, 448], value=448, label="Input size (paper, px)")
                lr = gr.Number(value=0.001, label="Learning rate (paper)")
                batch = gr.Slider(2, 64, value=8, step=1, label="Batch size (paper)")
            holdout = gr.Textbox(label="Hold out products (comma-separated, for the unknown-product test)")
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary")
            cancel_btn = gr.Button("Cancel", variant="stop")
        run_status = gr.Markdown("")
        curves_plot = gr.Plot(label="Training curves")
        runs_table = gr.Dataframe(headers=["run", "state", "best val acc", "epochs", "backbone", "K"], interactive=False, label="Runs")
        with gr.Row():
            run_pick = gr.Dropdown(label="Run", choices=[], interactive=True)
            pin = gr.Checkbox(label="Pin it (training will not replace it)")
            activate_btn = gr.Button("Make active model")
        timer = gr.Timer(2.0)

    shown_curves = {}

    def train_view():
        run, runs = studio.current_run(), studio.runs()
        table = [[r["name"], r["state"], None if r["best_val_acc"] is None else round(r["best_val_acc"], 4),
                  len(r["metrics"]), r["config"].get("backbone", ""), r["config"].get("cat_num", "")] for r in runs]
        key = (run or {}).get("name"), len((run or {}).get("metrics", []))
        if shown_curves.get("key") == key:  # redraw only when an epoch finished
            figure = gr.skip()
        else:
            shown_curves["key"] = key
            figure = training_curves((run or {}).get("metrics", []))
        names = [r["name"] for r in runs if r["checkpoint"]]
        return (studio.describe_run(run), figure, table, gr.update(choices=names), studio.training_readiness()[1], screen.status_line())

    outputs = [run_status, curves_plot, runs_table, run_pick, readiness, screen.header]

    def on_train(bb, mins, k, rec, ep, size, rate, bs, held_out):
        held = [h.strip() for h in (held_out or "").split(",") if h.strip()]
        if rec == "paper":
            act(studio.start_training, bb, mins or None, int(k), int(size), exclude_products=held, recipe="paper",
                epochs=int(ep), lr=float(rate), batch_size=int(bs))
        else:
            act(studio.start_training, bb, mins or None, int(k), exclude_products=held)
        return train_view()

    def on_cancel():
        gr.Info(act(studio.cancel_training))
        return train_view()

    def on_activate(name, pinned):
        if not name:
            fail("Pick a finished run first.")
        gr.Info(act(studio.set_active_model, name, pin=bool(pinned)))
        return screen.status_line()

    train_btn.click(on_train, [backbone, minutes, k_parts, recipe, epochs, input_size, lr, batch, holdout], outputs)
    cancel_btn.click(on_cancel, None, outputs)
    timer.tick(train_view, None, outputs, show_progress="hidden")
    activate_btn.click(on_activate, [run_pick, pin], [screen.header])
