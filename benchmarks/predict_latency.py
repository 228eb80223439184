"""Per-frame predict latency on this machine: NTS-Net vs a plain classifier of the same backbone, fp32 vs fast path.

    python benchmarks/predict_latency.py [--backbones resnet50 efficientnet_lite0 ...] [--runs 10] [--input-size 448]
    python benchmarks/predict_latency.py --levers [--backbones efficientnet_lite0]   # what each speed-up is worth

Weights do not change latency, so every model is built with random weights (works offline). The plain
classifier is backbone + global pool + linear head at the same input size, timed in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ntsnet import NTSConfig, NTSNet, Predictor  # noqa: E402
from ntsnet.backbones import create_backbone  # noqa: E402
from ntsnet.fuse import fold_batchnorm  # noqa: E402
from ntsnet.images import to_input_tensor  # noqa: E402
from ntsnet.runtime import keep_freed_memory  # noqa: E402
from common import median_ms  # noqa: E402


def plain_classifier_ms(name, size, precision, runs, frame, fold=True):
    backbone = create_backbone(name, pretrained=False).eval()
    if fold:
        backbone, _ = fold_batchnorm(backbone, torch.randn(1, 3, 64, 64))
    head = torch.nn.Linear(backbone.out_channels, 81)
    fast = precision == "bf16"
    if fast:
        backbone = backbone.to(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fast else contextlib.nullcontext

    @torch.inference_mode()
    def run():
        x = to_input_tensor([frame], size, backbone.mean, backbone.std)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx():
            return head(backbone(x).float().mean((2, 3))).softmax(1)

    return median_ms(run, runs, warmup=2)


def levers(args):
    """Each lever in a fresh process (the allocator setting is process-wide), interleaved over rounds because
    this shared VM drifts by 10-20 % from minute to minute."""
    combos = [("glibc default", "0", False), ("+ keep freed memory", "1", False), ("+ BatchNorm folded", "1", True)]
    for name in args.backbones:
        results = {c[0]: [] for c in combos}
        for _ in range(args.rounds):
            for label, keep, fold in combos:
                cmd = [sys.executable, __file__, "--one", name, "--runs", str(args.runs), "--input-size", str(args.input_size)]
                out = subprocess.run(cmd + ([] if fold else ["--no-fold"]), env={**os.environ, "NTSNET_KEEP_MALLOC": keep},
                                     capture_output=True, text=True, check=True).stdout
                results[label].append(json.loads(out.strip().splitlines()[-1]))
        print(f"\n{name}, NTS-Net at {args.input_size}px, K={args.cat_num}, median over {args.rounds} rounds x {args.runs} runs, ms per frame\n")
        print("| lever | bf16+CL | fp32 |")
        print("|---|---|---|")
        for label, *_ in combos:
            print(f"| {label} | {statistics.median(r['bf16'] for r in results[label]):.0f} "
                  f"| {statistics.median(r['fp32'] for r in results[label]):.0f} |", flush=True)


def one(args):
    keep_freed_memory()
    cfg = NTSConfig(backbone=args.one, num_classes=81, input_size=args.input_size, part_size=args.part_size, cat_num=args.cat_num)
    model = NTSNet(cfg, pretrained=False)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    out = {}
    for precision in ("bf16", "fp32"):
        p = Predictor(model, [f"c{i}" for i in range(81)], device="cpu", precision=precision, fold_batchnorm=not args.no_fold)
        out[precision] = median_ms(lambda: p.predict(frame), args.runs, warmup=2)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--input-size", type=int, default=448)
    ap.add_argument("--part-size", type=int, default=224)
    ap.add_argument("--cat-num", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--levers", action="store_true", help="measure the allocator setting and BatchNorm folding one by one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--no-fold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    if args.levers:
        return levers(args)
    torch.manual_seed(0)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)  # a webcam frame
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"input {args.input_size}px, parts {args.part_size}px, K={args.cat_num}; median of {args.runs} runs, ms per 640x480 frame\n")
    print("| backbone | NTS-Net fp32 | NTS-Net bf16+CL | speed-up | plain fp32 | plain bf16+CL | NTS/plain (fast path) | top-1 fp32 = bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        cfg = NTSConfig(backbone=name, num_classes=81, input_size=args.input_size, part_size=args.part_size, cat_num=args.cat_num)
        model = NTSNet(cfg, pretrained=False)
        classes = [f"c{i}" for i in range(81)]
        fp32 = Predictor(model, classes, device="cpu", precision="fp32")
        nts32 = median_ms(lambda: fp32.predict(frame), args.runs, warmup=2)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model16 = NTSNet(cfg, pretrained=False)
        model16.load_state_dict(state)
        bf16 = Predictor(model16, classes, device="cpu", precision="bf16")
        nts16 = median_ms(lambda: bf16.predict(frame), args.runs, warmup=2)
        frames = [np.random.default_rng(i).integers(0, 255, (480, 640, 3), dtype=np.uint8) for i in range(4)]
        agree = sum(a.label == b.label for a, b in zip(fp32.predict_batch(frames), bf16.predict_batch(frames)))
        p32 = plain_classifier_ms(name, args.input_size, "fp32", args.runs, frame)
        p16 = plain_classifier_ms(name, args.input_size, "bf16", args.runs, frame)
        print(f"| {name} | {nts32:.0f} | {nts16:.0f} | {nts32 / nts16:.2f}x | {p32:.0f} | {p16:.0f} | {nts16 / p16:.2f}x | {agree}/4 |", flush=True)


if __name__ == "__main__":
    main()
