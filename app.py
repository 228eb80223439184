"""Retail product recogniser: collect photos, label them, train NTS-Net, recognise live. ``python app.py --help``.

This file only lays out the screen and wires events; every action is a plain function in webapp/actions.py.
"""
from __future__ import annotations

import argparse
import os
import time

import gradio as gr
import numpy as np
from PIL import Image

from ntsnet.backbones import list_backbones
from webapp.actions import CONDITION_TAGS, MAX_BURST_SECONDS, MAX_UPLOAD_MB, SessionMemory, Studio, StudioError
from webapp.plots import training_curves

TITLE = "Product recogniser (NTS-Net)"
# how often the browser sends a live frame (after the answer to the last one). 10 showed 8.5-9.5 frames/s (the
# page waits for each answer); 12 showed 9.3-11.5 with as many fresh answers; 15 or 20 cost fresh answers on 2
# cores, the browser's encoding taking the model's CPU (README, recognise_fps.py --live-fps)
LIVE_FPS = 12.0


def camera_constraints(width: int, height: int) -> dict:
    """Ask the webcam for about this size. Gradio's default asks for 1920x1440: every streamed frame is then
    JPEG-encoded in the browser, uploaded and decoded at that size, although the model sees 448x448."""
    return {"video": {"width": {"ideal": width}, "height": {"ideal": height}}, "audio": False}


def build_app(studio: Studio, allow_capture: bool = True, allow_training: bool = True, live_fps: float = LIVE_FPS) -> gr.Blocks:
    latest_frames = SessionMemory(keep_seconds=120)  # session -> last webcam frame (Collect tab); forgotten when idle

    def fail(exc):
        raise gr.Error(str(exc))

    def act(fn, *args, **kwargs):
        """Run a Studio action; its StudioError becomes the message the person sees."""
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            fail(exc)

    # ------------------------------------------------------------------ small helpers shared by events
    def product_choices(selected=None):
        names = studio.product_names()
        return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))

    def status_line():
        active_name = studio.active_model_name()
        ok, why = studio.training_readiness()
        model = f"Active model: **{active_name}**" if active_name else "No trained model active: Recognise uses the instant model."
        if not allow_capture:  # a public demo says nothing about the catalogue behind it
            return model
        return f"{model} · {len(studio.product_names())} products · {why}"

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        header = gr.Markdown(status_line())

        # ============================================================================ Collect
        if allow_capture:  # not built at all when off: no component, no data, no API endpoint
            with gr.Tab("Collect"):
                with gr.Row():
                    with gr.Column(scale=1):
                        product = gr.Dropdown(label="Product", choices=studio.product_names(), value=None, interactive=True)
                        with gr.Accordion("New product", open=not studio.product_names()):
                            new_name = gr.Textbox(label="Name", placeholder="e.g. Oat milk 1 L")
                            new_sku = gr.Textbox(label="SKU / barcode (optional)")
                            create_btn = gr.Button("Create product")
                        tags = gr.CheckboxGroup(CONDITION_TAGS, label="Condition tags for this session")
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
                        uploads = gr.File(label="Or drop photo files", file_count="multiple", file_types=["image"])
                        upload_btn = gr.Button("Save uploaded files")
                        collect_msg = gr.Markdown("")
                collect_gallery = gr.Gallery(label="Photos of this product (newest first)", columns=8, height=300)

            def on_create(name, sku):
                msg = act(studio.create_product, name, sku)
                return product_choices(name.strip()), msg, "", "", status_line()

            def on_frame(frame, request: gr.Request):
                latest_frames.put(request.session_hash if request else "-", frame)
                return "camera live"  # a stream needs an output to keep its round trip going

            def on_snap(product_name, tag_list, request: gr.Request):
                frame = latest_frames.get(request.session_hash if request else "-")
                r = act(studio.save_photo, frame, product_name, tag_list, source="webcam")
                return r["message"], studio.gallery(product_name), f"**{r['count']}** photos of “{product_name}”", status_line()

            def on_burst(product_name, tag_list, every_ms, seconds, request: gr.Request):
                key = request.session_hash if request else "-"
                if not product_name:
                    fail("Choose or create a product first.")
                # the page's limits, applied again here: a client can send any number
                seconds, every_ms = min(max(float(seconds or 1), 1.0), MAX_BURST_SECONDS), max(float(every_ms or 500), 100.0)
                end, saved, msgs = time.time() + seconds, 0, []
                while time.time() < end:
                    frame = latest_frames.get(key)
                    if frame is not None:
                        try:
                            r = studio.save_photo(frame, product_name, tag_list, source="webcam")
                            saved += "duplicate" not in r["warnings"]
                            msgs = r["message"]
                        except StudioError as exc:
                            msgs = str(exc)
                        yield f"Burst: {saved} saved. {msgs}", studio.gallery(product_name), f"**{studio._count(product_name)}** photos", status_line()
                    time.sleep(max(0.1, float(every_ms) / 1000))
                yield f"Burst finished: {saved} photos saved.", studio.gallery(product_name), f"**{studio._count(product_name)}** photos", status_line()

            def on_upload(files, product_name, tag_list):
                r = studio.save_uploads(files, product_name, tag_list)
                return r["message"], studio.gallery(product_name), None, status_line()

            def on_product(product_name):
                return studio.gallery(product_name), (f"**{studio._count(product_name)}** photos of “{product_name}”" if product_name else "")

            create_btn.click(on_create, [new_name, new_sku], [product, collect_msg, new_name, new_sku, header])
            cam.stream(on_frame, [cam], [cam_state], stream_every=0.1, concurrency_limit=None, show_progress="hidden")
            snap_btn.click(on_snap, [product, tags], [collect_msg, collect_gallery, count, header])
            burst_btn.click(on_burst, [product, tags, burst_every, burst_secs], [collect_msg, collect_gallery, count, header])
            upload_btn.click(on_upload, [uploads, product, tags], [collect_msg, collect_gallery, uploads, header])
            product.change(on_product, [product], [collect_gallery, count])

        # ============================================================================== Label
        if allow_capture:  # not built at all when off: no component, no data, no API endpoint
            with gr.Tab("Label") as label_tab:
                with gr.Row():
                    browse = gr.Dropdown(label="Browse product", choices=studio.product_names(), interactive=True)
                    show_unlabelled = gr.Checkbox(label="Show unlabelled uploads instead")
                    refresh_label = gr.Button("Refresh")
                label_gallery = gr.Gallery(label="Photos (caption: #id · split · warnings · tags)", columns=8, height=320)
                with gr.Row():
                    selected = gr.CheckboxGroup(label="Select photos by id", choices=[])
                    move_to = gr.Dropdown(label="Move selected to", choices=studio.product_names(), interactive=True)
                    move_btn = gr.Button("Move")
                    confirm_delete = gr.Checkbox(label="Yes, delete permanently")
                    delete_btn = gr.Button("Delete selected", variant="stop")
                label_msg = gr.Markdown("")
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

            def label_view(product_name, unlabelled):
                if unlabelled:
                    imgs = studio.catalogue.images(unlabelled=True)
                elif product_name:
                    imgs = studio.catalogue.images(product=product_name)
                else:
                    imgs = []
                ids = [str(i["id"]) for i in imgs]
                names = studio.product_names()
                return (studio.gallery(product_name, unlabelled=bool(unlabelled)), gr.update(choices=ids, value=[]), studio.product_table(),
                        gr.update(choices=names), gr.update(choices=names), gr.update(choices=names))

            label_outputs = [label_gallery, selected, counts, browse, move_to, confirm_product]

            def on_move(ids, target, product_name, unlabelled):
                msg = act(studio.move_photos, ids, target)
                return (msg, *label_view(product_name, unlabelled))

            def on_delete(ids, confirmed, product_name, unlabelled):
                if not confirmed:
                    fail("Tick “Yes, delete permanently” first.")
                msg = act(studio.delete_photos, ids)
                return (msg, *label_view(product_name, unlabelled))

            def on_scan():
                rows = studio.possible_mislabels()
                if studio.predictor() is None:
                    gr.Info("No active model yet: train one first.")
                return [[r["id"], r["label"], r["predicted"], round(r["confidence"], 3)] for r in rows]

            def on_suggest():
                return [[r["id"], r["suggested"] or "(no model)", round(r["confidence"], 3)] for r in studio.suggestions()]

            def on_confirm(image_id, product_name, browse_name, unlabelled):
                if not image_id or not product_name:
                    fail("Give a photo id and a product.")
                msg = act(studio.confirm_suggestion, int(image_id), product_name)
                return (msg, *label_view(browse_name, unlabelled))

            for trigger in (browse.change, show_unlabelled.change, refresh_label.click, label_tab.select):
                trigger(label_view, [browse, show_unlabelled], label_outputs)
            move_btn.click(on_move, [selected, move_to, browse, show_unlabelled], [label_msg, *label_outputs])
            delete_btn.click(on_delete, [selected, confirm_delete, browse, show_unlabelled], [label_msg, *label_outputs])
            scan_btn.click(on_scan, None, mislabels)
            suggest_btn.click(on_suggest, None, suggestions)
            confirm_btn.click(on_confirm, [confirm_id, confirm_product, browse, show_unlabelled], [label_msg, *label_outputs])

        # ============================================================================== Train
        if allow_training:  # not built at all when off: no component, no data, no API endpoint
            with gr.Tab("Train"):
                readiness = gr.Markdown(studio.training_readiness()[1])
                gr.Markdown("One click trains in stages (a linear head in seconds, then fine-tuning, then NTS-Net). Each stage "
                            "answers in Recognise as soon as it is at least as accurate as the model answering now.")
                with gr.Row():
                    backbone = gr.Dropdown(list_backbones(), value="efficientnet_lite0", label="Backbone")
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
                run = studio.current_run()
                runs = studio.runs()
                table = [[r["name"], r["state"], None if r["best_val_acc"] is None else round(r["best_val_acc"], 4),
                          len(r["metrics"]), r["config"].get("backbone", ""), r["config"].get("cat_num", "")] for r in runs]
                names = [r["name"] for r in runs if r["checkpoint"]]
                key = (run or {}).get("name"), len((run or {}).get("metrics", []))
                if shown_curves.get("key") == key:  # redraw only when an epoch finished
                    figure = gr.skip()
                else:
                    shown_curves["key"] = key
                    figure = training_curves((run or {}).get("metrics", []))
                return (studio.describe_run(run), figure, table, gr.update(choices=names), studio.training_readiness()[1], status_line())

            train_outputs = [run_status, curves_plot, runs_table, run_pick, readiness, header]

            def on_train(bb, mins, k, rec, ep, size, rate, bs, held_out):
                held = [h.strip() for h in (held_out or "").split(",") if h.strip()]
                if rec == "paper":
                    act(studio.start_training, bb, mins or None, int(k), int(size), exclude_products=held, recipe="paper",
                        epochs=int(ep), lr=float(rate), batch_size=int(bs))
                else:
                    act(studio.start_training, bb, mins or None, int(k), exclude_products=held)
                return train_view()

            def on_cancel():
                gr.Info(studio.cancel_training())
                return train_view()

            def on_activate(name, pinned):
                if not name:
                    fail("Pick a finished run first.")
                msg = act(studio.set_active_model, name, pin=bool(pinned))
                gr.Info(msg)
                return status_line()

            train_btn.click(on_train, [backbone, minutes, k_parts, recipe, epochs, input_size, lr, batch, holdout], train_outputs)
            cancel_btn.click(on_cancel, None, train_outputs)
            timer.tick(train_view, None, train_outputs, show_progress="hidden")
            activate_btn.click(on_activate, [run_pick, pin], [header])

        # ========================================================================== Recognise
        def recognise_hint():
            return ("" if studio.active_checkpoint() else
                    "**No trained model yet.** Collect photos of at least two products and click Train: each better model answers here as soon as it is ready.")

        with gr.Tab("Recognise") as recognise_tab:
            hint = gr.Markdown(recognise_hint())
            with gr.Row():
                with gr.Column():
                    live = gr.Image(label="Live camera", sources=["webcam"], streaming=True, type="numpy",
                                    webcam_options=gr.WebcamOptions(mirror=False, constraints=camera_constraints(640, 480)))
                    photo = gr.Image(label="Or a photo", sources=["upload", "clipboard"], type="numpy")
                with gr.Column():
                    # JPEG encodes a 640x480 frame in ~1.4 ms, the default WebP in ~52 ms (measured here)
                    annotated = gr.Image(label="What the model looked at (numbered by rank)", interactive=False, format="jpeg",
                                         elem_id="recognised-frame")
                    answer = gr.Markdown("")
                    top5 = gr.Label(label="Top 5", num_top_classes=5)

        def on_recognise(frame, request: gr.Request, wait: bool = False):
            r = studio.recognise(frame, session=request.session_hash if request else "-", wait=wait)
            if r is None:
                return gr.skip(), gr.skip(), gr.skip()
            if not r.fresh:  # the model is busy: newest frame, last boxes; the text and top-5 stay as they are
                return r.annotated, gr.skip(), gr.skip()
            how = f"model: {r.model} · {r.backend} · {r.answers_per_s:.1f} answers/s"
            title = f"## {r.label}  \n" + (f"{r.confidence:.0%} confident · {how}" if r.sure else how)
            return r.annotated, title, r.top5 or None

        # the browser sends the next frame only after the answer to the last one (frames in between are dropped,
        # not queued); recognise() also drops any frame that arrives while one is being processed
        live.stream(on_recognise, [live], [annotated, answer, top5], stream_every=1 / live_fps, concurrency_limit=None, show_progress="hidden")
        def on_photo(image, request: gr.Request):
            return on_recognise(image, request, wait=True)

        photo.change(on_photo, [photo], [annotated, answer, top5])
        recognise_tab.select(recognise_hint, None, hint)

        # =========================================================================== Evaluate
        if allow_capture:  # not built at all when off: no component, no data, no API endpoint
            with gr.Tab("Evaluate"):
                with gr.Row():
                    split = gr.Radio(["test", "val", "train"], value="test", label="Split")
                    unknown_box = gr.Textbox(label="Unknown products (held out of training), comma-separated")
                    eval_btn = gr.Button("Evaluate the active model", variant="primary")
                eval_summary = gr.Markdown("")
                conditions = gr.Dataframe(headers=["condition", "accuracy", "photos"], interactive=False, label="Store conditions")
                with gr.Row():
                    confusion = gr.Image(label="Confusion matrix", interactive=False)
                    pairs = gr.Dataframe(headers=["true", "predicted", "count"], interactive=False, label="Most confused pairs")
                open_set = gr.Dataframe(headers=["coverage", "threshold", "known accepted", "accuracy on accepted", "unknowns rejected"],
                                        interactive=False, label="Unknown products: accuracy / coverage trade-off")

            def on_evaluate(split_name, unknown_names, progress=gr.Progress(track_tqdm=True)):
                rep = act(studio.evaluate, split_name, progress=True, unknown_products=[u.strip() for u in (unknown_names or "").split(",")])
                rows = [[c, round(r["accuracy"], 4), r["n"]] for c, r in rep["conditions"].items()]
                rows += [[f"tag: {t}", round(r["accuracy"], 4), r["n"]] for t, r in rep.get("tags", {}).items()]
                summary = f"**{rep['n']} photos** ({split_name}): top-1 **{rep['accuracy']:.1%}**, top-5 {rep['top5']:.1%}"
                o = rep.get("open_set")
                table = []
                if o:
                    summary += f"  \nUnknown products ({o['n_unknown']} photos): AUROC **{o['auroc']:.3f}**"
                    table = [[r["coverage"], r["threshold"], round(r["known_accepted"], 3), round(r["accuracy_on_accepted"], 3),
                              round(r["unknown_rejected"], 3)] for r in o["coverage"]]
                # pixels, not the file: the catalogue folder (runs included) is never served
                confusion_img = np.asarray(Image.open(rep["confusion_png"]).convert("RGB"))
                return summary, rows, confusion_img, [[m["true"], m["predicted"], m["count"]] for m in rep["most_confused"]], table

            eval_btn.click(on_evaluate, [split, unknown_box], [eval_summary, conditions, confusion, pairs, open_set])

        if allow_capture:
            demo.load(lambda: (status_line(), product_choices()), None, [header, product])
        else:
            demo.load(status_line, None, [header])
    return demo


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--db", default=os.environ.get("NTS_CATALOGUE", "data"), help="catalogue directory (created if missing)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--checkpoint", default=None, help="model to activate: a .safetensors file, a run name, or hf://user/repo")
    ap.add_argument("--backend", default=os.environ.get("NTSNET_BACKEND", "auto"), choices=["auto", "torch", "openvino"],
                    help="inference runtime: auto = OpenVINO on a CPU (compiled in the background, cached), PyTorch on a GPU")
    ap.add_argument("--precision", default=os.environ.get("NTSNET_PRECISION", "auto"), choices=["auto", "fp32", "bf16"],
                    help="trained models' inference precision: auto = bf16 where the hardware has it (on a CPU the "
                         "Navigator's boxes stay fp32), fp32 = measure a bf16 machine as an ordinary one")
    ap.add_argument("--live-threads", type=int, default=None,
                    help="threads for the live model (default: all cores, less one when the browser runs on this machine)")
    ap.add_argument("--live-fps", type=float, default=LIVE_FPS, help="live frames the page sends per second at most")
    ap.add_argument("--auth", default=os.environ.get("APP_AUTH"), help="user:pass to require a login (or the APP_AUTH secret)")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    ap.add_argument("--no-capture", action="store_true", help="no Collect, Label or Evaluate (a recognise-only demo)")
    ap.add_argument("--no-training", action="store_true", help="no Train")
    ap.add_argument("--allow-public-writes", action="store_true", default=os.environ.get("ALLOW_PUBLIC_WRITES") == "1",
                    help="start with capture/training on a public address without --auth (anyone who finds it can change the catalogue)")
    args = ap.parse_args(argv)
    return apply_demo_mode(args, os.environ)


def apply_demo_mode(args, env):
    """On a Space with DEMO_MODEL=user/name: serve that Hub model, recognise-only unless ALLOW_CAPTURE=1,
    so a public demo cannot be filled with strangers' photos or made to train (enforced on the server: the
    handlers do not exist, and Studio refuses every write)."""
    demo_model = env.get("DEMO_MODEL")
    if demo_model and not args.checkpoint:
        args.checkpoint = demo_model if demo_model.startswith("hf://") else f"hf://{demo_model}"
        if env.get("ALLOW_CAPTURE", "0") != "1":
            args.no_capture = args.no_training = True
    return args


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(args) -> str | None:
    """Why the app must not start as asked, or None. Writes on a public address need a login."""
    public = args.share or args.host not in LOOPBACK
    writes = not (args.no_capture and args.no_training)
    if public and writes and not args.auth and not args.allow_public_writes:
        where = "a --share link" if args.share else f"--host {args.host}"
        return (f"refusing to start: {where} is reachable by others, and capture/training would let anyone change the "
                "catalogue. Add --auth user:password (on a Space: the APP_AUTH secret), or --no-capture --no-training "
                "for a recognise-only demo, or --allow-public-writes if you accept that risk.")
    return None


def live_threads(args, cores: int | None = None) -> int | None:
    """Threads for the live model. A browser on this machine (the app serves only loopback) decodes the camera and
    encodes every frame on the same cores; on 2 cores, leaving it one gave 17-38% more fresh answers per second
    (benchmarks/recognise_fps.py, README). A remote browser (a Space, --host 0.0.0.0, --share): all cores."""
    if args.live_threads is not None:
        if args.live_threads < 1:
            raise SystemExit("--live-threads must be at least 1")
        return args.live_threads
    if args.share or args.host not in LOOPBACK:
        return None
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, cores - 1) if cores > 1 else None


def main(argv=None):
    args = parse_args(argv)
    why = check_exposure(args)
    if why:
        raise SystemExit(why)
    if not args.live_fps > 0:
        raise SystemExit("--live-fps must be more than 0")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.auth and len(auth) != 2:
        raise SystemExit("--auth must look like user:password")
    studio = Studio(args.db, checkpoint=args.checkpoint, backend=args.backend, allow_capture=not args.no_capture,
                    allow_training=not args.no_training, live_threads=live_threads(args), precision=args.precision)
    demo = build_app(studio, allow_capture=not args.no_capture, allow_training=not args.no_training, live_fps=args.live_fps)
    # nothing of the catalogue is served as a file: galleries get thumbnails through Gradio's own cache
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, auth=auth, share=args.share,
                                                  max_file_size=f"{MAX_UPLOAD_MB}mb", blocked_paths=[str(studio.db.resolve())])


if __name__ == "__main__":
    main()
