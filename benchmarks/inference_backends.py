"""Eager PyTorch vs the compiled OpenVINO backend: latency, agreement on real photos, evaluation time.

    python benchmarks/inference_backends.py [--photos 296] [--eval-photos 75] [--runs 15]

NTS-Net on Lite0 (ImageNet weights, seeded heads, 81 products), 448/224 px, K=4, one 640x480 frame at a time;
the instant embedder (Lite0 at 224); agreement of the two backends on the grocery val photos (top-1 and the
K boxes); and training/evaluate.py's 4 conditions on --eval-photos photos. Prints the CPU model and flags.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_ms  # noqa: E402
from train_click import DATA, cpu_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=296)
    ap.add_argument("--eval-photos", type=int, default=75)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    from ntsnet import NTSConfig, NTSNet, Predictor, save_checkpoint
    from ntsnet.instant import Embedder
    from training.evaluate import CONDITIONS, apply_condition

    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=81), pretrained=True)
    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "nts.safetensors"
    save_checkpoint(ckpt, model, [f"product {i}" for i in range(81)])
    frame = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    t0 = time.perf_counter()
    ov = Predictor.from_checkpoint(ckpt, backend="openvino", background=False)
    print(f"OpenVINO export built and compiled in {time.perf_counter() - t0:.1f} s (cached afterwards)")
    t0 = time.perf_counter()
    Predictor.from_checkpoint(ckpt, backend="openvino")
    print(f"loading the cached export: {time.perf_counter() - t0:.2f} s")
    eager = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    nchw = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    nchw.net = nchw.net.to(memory_format=torch.contiguous_format)  # what the predictor ran before this change
    rows = []
    for name, p in (("eager fp32 NCHW (before)", nchw), ("eager fp32 channels_last", eager), ("openvino", ov)):
        rows.append((name, median_ms(lambda: p.predict(frame), args.runs, warmup=3)))
    e_eager, e_ov = Embedder(backend="torch"), Embedder(background=False)
    rows.append(("instant embedder, eager fp32 CL", median_ms(lambda: e_eager([frame]), args.runs * 2, warmup=3)))
    rows.append(("instant embedder, openvino", median_ms(lambda: e_ov([frame]), args.runs * 2, warmup=3)))
    print("\n| what (640x480 frame) | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| NTS-Net Lite0 448/224 K=4, {name} | {ms:.1f} |" if "embedder" not in name else f"| {name} | {ms:.1f} |")
    print_breakdown(ov, frame, args.runs)

    if DATA.exists():
        from PIL import Image

        lines = [l for l in (DATA / "val.txt").read_text().splitlines() if l.strip()][: args.photos]
        photos = [np.array(Image.open(DATA / l.split(",")[0]).convert("RGB")) for l in lines]
        same_top1 = same_boxes = 0
        for start in range(0, len(photos), 16):
            a, b = eager.predict_batch(photos[start:start + 16]), ov.predict_batch(photos[start:start + 16])
            for x, y in zip(a, b):
                same_top1 += x.label == y.label
                same_boxes += [(q.x0, q.y0, q.x1, q.y1) for q in x.boxes] == [(q.x0, q.y0, q.x1, q.y1) for q in y.boxes]
        n = len(photos)
        print(f"\ngrocery val photos: top-1 agreement {same_top1}/{n} = {same_top1 / n:.1%}; identical K boxes {same_boxes}/{n} = {same_boxes / n:.1%}")
        sub = photos[: args.eval_photos]
        for name, p in (("eager fp32 NCHW (before)", nchw), ("openvino", ov)):
            t0 = time.perf_counter()
            for cond in CONDITIONS:
                arrays = [apply_condition(a, cond) for a in sub]
                for start in range(0, len(arrays), 16):
                    p.predict_batch(arrays[start:start + 16])
            dt = time.perf_counter() - t0
            print(f"evaluation, {len(sub)} photos x {len(CONDITIONS)} conditions, {name}: {dt:.1f} s "
                  f"(= {dt * 300 / len(sub):.0f} s for 300 photos)")


def print_breakdown(predictor, frame, runs: int):
    """Where one OpenVINO frame's time goes: which part a faster runtime could still win back."""
    from ntsnet.anchors import select_proposals
    from ntsnet.crops import crop_boxes
    from ntsnet.images import to_input_tensor, to_rgb_array
    from torchvision.ops import roi_align

    net, engine = predictor.net, predictor.engine
    x = to_input_tensor([frame], net.config.input_size, net.mean, net.std)
    _, scores = engine.whole_and_scores(x)
    index = select_proposals(scores, net.anchors, net.config.cat_num, net.config.nms_iou)
    rois = net.rois(net.anchors[index])
    size = net.config.part_size
    crops = crop_boxes(x, rois, size)
    parts = {
        "preprocessing (resize, normalise)": lambda: to_input_tensor([to_rgb_array(frame)], net.config.input_size, net.mean, net.std),
        "graph 1: backbone 448 + Navigator": lambda: engine.whole_and_scores(x),
        "NMS over the anchors": lambda: select_proposals(scores, net.anchors, net.config.cat_num, net.config.nms_iou),
        "K crops (ntsnet/crops.py)": lambda: crop_boxes(x, rois, size),
        "K crops, torchvision roi_align (what crops.py replaces)": lambda: roi_align(x, rois, (size, size), 1.0, 2, True),
        f"graph 2: backbone {size} on the K crops": lambda: engine.graphs.run("parts", crops),
        "K crops + graph 2": lambda: engine.box_features(x, rois),
        "both graphs, one after the other": lambda: (engine.whole_and_scores(x), engine.box_features(x, rois)),
        "whole predict()": lambda: predictor.predict(frame),
    }
    print("\n| OpenVINO frame, part | ms |\n|---|---|")
    for name, fn in parts.items():
        print(f"| {name} | {median_ms(fn, runs, warmup=3):.1f} |")


if __name__ == "__main__":
    main()
