"""Training images/s on this machine for NTS-Net and the baseline: fp32 NCHW, fp32 channels_last (what training
uses on a CPU now), and bf16 autocast + channels_last where the CPU does bf16 in hardware.

    python benchmarks/train_throughput.py [--steps 6] [--batch-size 8]

Random data, real model and optimizer step (Lite0 weights are offline, so this runs anywhere).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ntsnet import NTSConfig, create_model, nts_loss  # noqa: E402
from ntsnet.runtime import keep_freed_memory  # noqa: E402

CONFIGS = [
    ("baseline", 224, 224, 6, 4),
    ("baseline", 448, 224, 6, 4),
    ("ntsnet", 448, 224, 6, 4),
    ("ntsnet", 320, 160, 6, 4),
    ("ntsnet", 224, 112, 6, 4),
]


def measure(model_kind, size, part, m, k, precision, steps, bs, backbone):
    cfg = NTSConfig(model=model_kind, backbone=backbone, num_classes=81, input_size=size, part_size=part, proposal_num=m, cat_num=k)
    model = create_model(cfg, pretrained=False).train()
    fast = precision == "bf16"
    nhwc = precision in ("bf16", "fp32-cl")
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(bs, 3, size, size)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 81, (bs,))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fast else contextlib.nullcontext
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with ctx():
            out = model(x)
        loss = nts_loss(out, y, cfg)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up oneDNN
            times.append(time.perf_counter() - t0)
    return bs * len(times) / sum(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--configs", default="all", help="comma-separated row numbers (0-based) of CONFIGS to run")
    args = ap.parse_args()
    kept = keep_freed_memory()  # as training does; NTSNET_KEEP_MALLOC=0 measures glibc's default
    print(f"glibc keeps freed memory: {kept}")
    print(f"{args.backbone}, batch {args.batch_size}, {torch.get_num_threads()} threads; training images/s (forward + backward + SGD step)\n")
    from ntsnet.predictor import cpu_supports_fast_bf16
    from train_click import cpu_line

    bf16 = cpu_supports_fast_bf16()
    print(f"CPU: {cpu_line()}; bf16 in hardware: {bf16}; training picks bf16 by itself: {cpu_supports_fast_bf16(training=True)}")
    print("| model | input | parts | fp32 NCHW img/s | fp32 channels_last img/s | speed-up |" + (" bf16+CL img/s |" if bf16 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if bf16 else ""))
    rows = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    for kind, size, part, m, k in rows:
        a = measure(kind, size, part, m, k, "fp32", args.steps, args.batch_size, args.backbone)
        b = measure(kind, size, part, m, k, "fp32-cl", args.steps, args.batch_size, args.backbone)
        c = f" {measure(kind, size, part, m, k, 'bf16', args.steps, args.batch_size, args.backbone):.1f} |" if bf16 else ""
        parts = f"M={m} x {part}px" if kind == "ntsnet" else "-"
        print(f"| {kind} | {size} | {parts} | {a:.1f} | {b:.1f} | {b / a:.2f}x |{c}", flush=True)


if __name__ == "__main__":
    main()
