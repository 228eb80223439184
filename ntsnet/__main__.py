"""Command line: ``python -m ntsnet predict|draw|live|checkout|export|push|space``."""
from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import CheckpointError
from .images import ImageLoadError, to_rgb_array


def _load_predictor(args, wait: bool = True):
    """``wait``: build a missing compiled export before the first answer (it is cached for every later run)."""
    from .predictor import Predictor

    if args.checkpoint.startswith("hf://"):
        predictor = Predictor.from_pretrained(args.checkpoint, device=args.device, precision=args.precision, backend=args.backend)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision, backend=args.backend)
    if wait:
        predictor.wait_for_engine()
    return predictor


def cmd_predict(args) -> int:
    from .images import image_paths, read_in_batches

    predictor = _load_predictor(args)
    paths = image_paths(args.images)
    if not paths:
        print("error: no photos in the folders given", file=sys.stderr)
        return 1
    failed = 0
    # a GPU gets its photos in large batches, decoded by threads while the previous batch runs
    for batch in read_in_batches(paths, predictor.preferred_batch if len(paths) > 1 else 1):
        good = [arr for _, arr in batch if not isinstance(arr, ImageLoadError)]
        answers = iter(predictor.predict_batch(good) if good else [])
        for path, arr in batch:
            if isinstance(arr, ImageLoadError):
                print(f"error: {arr}", file=sys.stderr)
                failed += 1
            else:
                _print_prediction(path, next(answers), predictor.backend_name, args.json)
    return 1 if failed else 0


def _print_prediction(path, pred, backend: str, as_json: bool):
    if as_json:
        print(json.dumps({"image": path, **pred.to_dict(), "backend": backend}, ensure_ascii=False), flush=True)
    else:
        top5 = ", ".join(f"{n} {p:.1%}" for n, p in pred.top5)
        boxes = " ".join(f"[{b.x0:.0f},{b.y0:.0f},{b.x1:.0f},{b.y1:.0f} s={b.score:.2f}]" for b in pred.boxes)
        print(f"{path}: {pred.label} ({pred.confidence:.1%}, {backend})\n  top-5: {top5}\n  boxes: {boxes or '-'}", flush=True)


def cmd_draw(args) -> int:
    from PIL import Image

    from .draw import draw_prediction

    predictor = _load_predictor(args)
    try:
        rgb = to_rgb_array(args.image)
    except ImageLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pred = predictor.predict(rgb)
    Image.fromarray(draw_prediction(rgb, pred)).save(args.out)
    print(f"{args.image}: {pred.label} ({pred.confidence:.1%}) -> {args.out}")
    return 0


def cmd_live(args) -> int:
    from .live import run_live

    predictor = _load_predictor(args, wait=False)  # eager frames until the export is ready
    try:
        run_live(predictor, args.source, out_path=args.out, show=False if args.no_window else None, max_frames=args.max_frames)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_checkout(args) -> int:
    # the one command that reads a catalogue: it answers as the app does, so it borrows the app's actions
    from webapp.actions import Studio, StudioError

    studio = Studio(args.db, allow_training=False)
    recogniser = _load_predictor(args) if args.checkpoint else None
    try:
        answers = studio.checkout_scenes(args.scenes, background=args.background, recogniser=recogniser)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answers, ensure_ascii=False, indent=1))
    for a in answers:
        if "error" in a:
            print(f"error: {a['path']}: {a['error']}", file=sys.stderr)
        elif not args.json:
            basket = ", ".join(f"{n} x {p}" for p, n in a["basket"].items()) or "nothing"
            print(f"{a['path']}: {basket}" + (f" ({a['problem']})" if a.get("problem") else ""))
    return 1 if any("error" in a for a in answers) else 0


def cmd_export(args) -> int:
    from .export import export_model

    try:
        out = export_model(args.checkpoint, args.out, args.format)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} as {args.format} to {out}: run it with `python {out / 'predict.py'} PHOTOS`")
    return 0


def cmd_push(args) -> int:
    from .hub import push_model

    url = push_model(args.checkpoint, args.repo, private=args.private, export=args.export)
    print(f"pushed {args.checkpoint} to {url}")
    return 0


def cmd_space(args) -> int:
    from .hub import push_space

    url = push_space(args.repo, demo_model=args.demo_model, private=args.private)
    print(f"Space ready at {url}" + (f" (recognise-only demo of {args.demo_model})" if args.demo_model else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ntsnet", description="NTS-Net product recognition")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--checkpoint", required=True, help="trained .safetensors checkpoint, or hf://user/name[@revision]")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
        p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                       help="auto: OpenVINO on a CPU (compiled once, cached beside the checkpoint), PyTorch on a GPU")

    p = sub.add_parser("predict", help="print label, confidence, top-5 and Navigator boxes per image")
    common(p)
    p.add_argument("images", nargs="+", help="photos, or folders of photos")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("draw", help="save the image with the boxes and label drawn")
    common(p)
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_draw)

    p = sub.add_parser("live", help="recognise a camera or video live, drawing boxes and frames/s")
    common(p)
    p.add_argument("--source", default="0", help="camera index (0) or a video file")
    p.add_argument("--out", help="write the annotated video here (mp4)")
    p.add_argument("--no-window", action="store_true", help="do not open a window even if a display exists")
    p.add_argument("--max-frames", type=int, default=None)
    p.set_defaults(func=cmd_live)

    p = sub.add_parser("checkout", help="every item on photos of a checkout counter, named, and the basket")
    p.add_argument("--db", required=True, help="the catalogue (its active model answers unless --checkpoint is given)")
    p.add_argument("--checkpoint", default=None, help="a trained .safetensors checkpoint, or hf://user/name")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"])
    p.add_argument("--background", required=True, help="a photo of the empty counter from the same camera, or a folder of them")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per scene, in the order given")
    p.add_argument("scenes", nargs="+", help="photos of the counter, or folders of them")
    p.set_defaults(func=cmd_checkout)

    p = sub.add_parser("export", help="the model as ONNX or OpenVINO graphs with a predict.py that needs no PyTorch")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a checkpoint with a generated model card to the Hugging Face Hub")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repo", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--export", choices=["onnx", "openvino"], help="also upload the model exported so, with its predict.py")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("space", help="push this app as a Gradio Space")
    p.add_argument("--repo", required=True, help="user/space-name")
    p.add_argument("--demo-model", help="user/name of a pushed model: the Space starts as a recognise-only demo of it")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_space)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .hub import HubError

    try:
        return args.func(args)
    except (CheckpointError, HubError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
