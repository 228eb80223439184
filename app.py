"""Retail product recogniser: collect photos, label them, train NTS-Net, recognise live. ``python app.py --help``.

This file holds the flags, the exposure checks and the launch; each tab is a module of webapp/tabs/ and every
action a plain Studio method (webapp/actions.py).
"""
from __future__ import annotations

import argparse
import os

import gradio as gr

from webapp.actions import MAX_UPLOAD_MB, Studio
from webapp.tabs import checkout, collect, evaluate, label, recognise, review, train
from webapp.tabs.common import Screen

TITLE = "Product recogniser (NTS-Net)"
LIVE_FPS = 12.0  # live frames the page sends per second at most (benchmarks/RESULTS.md, "Live Recognise")


def build_app(studio: Studio, allow_capture: bool = True, allow_training: bool = True, live_fps: float = LIVE_FPS) -> gr.Blocks:
    """The screen: one tab per module of webapp/tabs/. Tabs that capture is off for are not built at all: no
    component, no data, no API endpoint."""
    screen = Screen(studio, allow_capture)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        screen.header = gr.Markdown(screen.status_line())
        product = collect.build(studio, screen) if allow_capture else None
        if allow_capture:
            label.build(studio, screen)
            review.build(studio, screen)
        if allow_training:
            train.build(studio, screen)
        recognise.build(studio, live_fps, screen, product)
        if allow_capture:  # learning the counter writes beside the catalogue
            checkout.build(studio, live_fps)
        if allow_capture:
            evaluate.build(studio)
            demo.load(lambda: (screen.status_line(), screen.product_choices()), None, [screen.header, product])
            demo.load(None, None, None, js=review.SHORTCUTS)  # keyboard shortcuts of the Label and Review tabs
        else:
            demo.load(screen.status_line, None, [screen.header])
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
                    help="trained models' inference precision: auto = the part pass in bf16 on a CPU with bf16 hardware "
                         "(the Navigator's boxes stay fp32), fp32 on a GPU; fp32 = measure a bf16 machine as an ordinary one")
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
    encodes every frame on the same cores, so it is left one (benchmarks/RESULTS.md, "Live Recognise"). A remote
    browser (a Space, --host 0.0.0.0, --share): all cores."""
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
