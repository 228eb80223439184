"""Training images/s on this machine for NTS-Net and the baseline: fp32 NCHW, fp32 channels_last (what training
uses on a CPU now), and bf16 autocast + channels_last where the CPU does bf16 in hardware.

    python benchmarks/train_throughput.py [--steps 6] [--batch-size 8]
    python benchmarks/train_throughput.py --fold [--batch-size 16] [--precision fp32] [--compile]

    python benchmarks/train_throughput.py --photos 264 [--photo-dir ../shared/datasets/grocerystore/train]

``--photos``: milliseconds for one core to prepare a training photo at 448 px (decode, augment, tensor): flip and store
augmentation, as a CPU's float input and as a GPU's uint8 pixels.

``--fold``: as the progressive job trains (channels_last, BatchNorm on its running statistics, layers to stride 8
frozen), with and without BatchNorm folded into the convs (ntsnet/fuse.py: TrainingFold), alternated twice. Where
``--photo-dir`` has photos, it trains the pretrained backbone on 6 store-augmented batches of them (what the job
does); otherwise on random data with random weights. ``--compile`` adds a third arm: the same training with
``torch.compile`` (Inductor; it fuses BatchNorm itself, so no TrainingFold) and the seconds its first step took to
compile, in a fresh compile cache (a cached compile is faster: a user's second click would find one).

Otherwise random data, real model and optimizer step (Lite0 weights are offline, so this runs anywhere).
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
from ntsnet.fuse import TrainingFold  # noqa: E402
from ntsnet.runtime import keep_freed_memory  # noqa: E402
from training.fit import train_mode  # noqa: E402

CONFIGS = [
    ("baseline", 224, 224, 6, 4),
    ("baseline", 448, 224, 6, 4),
    ("ntsnet", 448, 224, 6, 4),
    ("ntsnet", 320, 160, 6, 4),
    ("ntsnet", 224, 112, 6, 4),
]


def measure(model_kind, size, part, m, k, precision, steps, bs, backbone, fold=None, photos=None, compiled=False, first=None):
    """``fold``: None, the plain recipe (BatchNorm on batch statistics, every layer trained); False / True: as the
    progressive job trains, without / with TrainingFold. ``photos``: real photo paths to train on (pretrained).
    ``compiled``: the forward through ``torch.compile``; ``first``: a list that gets the first step's seconds."""
    cfg = NTSConfig(model=model_kind, backbone=backbone, num_classes=81, input_size=size, part_size=part, proposal_num=m, cat_num=k)
    model = create_model(cfg, pretrained=bool(photos)).train()
    fast = precision == "bf16"
    nhwc = precision in ("bf16", "fp32-cl")
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    folding = contextlib.nullcontext()
    if fold is not None:
        frozen = {id(p) for p in model.backbone.early_parameters(8)}  # (it leaves every module in training mode)
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        train_mode(model)
        if fold:
            folding = TrainingFold(model.backbone, torch.randn(1, 3, 64, 64))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    if photos:  # prepared before timing: this measures the training step, not the photo preparation
        from training.data import PhotoDataset, collate

        ds = PhotoDataset([{"path": str(p), "label": i % 81} for i, p in enumerate(photos[:6 * bs])], size, train=True,
                          mean=model.mean, std=model.std, augment="store")
        batches = [collate([ds[j] for j in range(i, i + bs)])[:2] for i in range(0, len(ds) - bs + 1, bs)]
    else:
        batches = [(torch.randn(bs, 3, size, size), torch.randint(0, 81, (bs,)))]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fast else contextlib.nullcontext
    forward = torch.compile(model) if compiled else model
    times = []
    for i in range(steps + 1):
        x, y = batches[i % len(batches)]
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with ctx(), folding:
            out = forward(x)
        loss = nts_loss(out, y, cfg)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up oneDNN (and compiles)
            times.append(time.perf_counter() - t0)
        elif first is not None:
            first.append(time.perf_counter() - t0)
    return bs * len(times) / sum(times)


def photo_preparation(folder: Path, n: int, size: int = 448):
    """Milliseconds for one DataLoader worker to prepare a training photo: the paper's flip and the job's store
    augmentation, each as the float model input (a CPU's workers) and as uint8 pixels (a GPU's, normalised there)."""
    from training.data import PhotoDataset
    from common import cpu_line

    paths = sorted(folder.rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg photos under {folder}")
    items = [{"path": str(p), "label": 0} for p in paths[:: max(1, len(paths) // n)][:n]]
    torch.set_num_threads(1)  # a DataLoader worker's share
    print(f"CPU: {cpu_line()}\n{len(items)} photos from {folder}, {size} px, one core; best of 3 passes, ms per photo")
    for augment in ("flip", "store"):
        for as_uint8 in (False, True):
            ds, best = PhotoDataset(items, size, train=True, augment=augment, as_uint8=as_uint8), float("inf")
            for epoch in range(3):
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[(epoch, i)]
                best = min(best, (time.perf_counter() - t0) / len(ds) * 1e3)
            print(f"{augment}, {'uint8 pixels' if as_uint8 else 'float input'}: {best:.2f} ms", flush=True)


def compile_arm(kind, size, part, m, k, precision, args, photos) -> str:
    """torch.compile's training speed (better of two) and its first, compiling step, in a fresh Inductor cache."""
    import os
    import tempfile

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when Inductor first compiles
        torch._dynamo.reset()
        first, speeds = [], []
        try:
            for _ in range(2):
                speeds.append(measure(kind, size, part, m, k, precision, args.steps, args.batch_size, args.backbone, False, photos,
                                      compiled=True, first=first))
                torch._dynamo.reset()
        finally:  # not left pointing at a deleted folder
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    return f"{max(speeds):.1f} ({first[0]:.0f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--configs", default="all", help="comma-separated row numbers (0-based) of CONFIGS to run")
    ap.add_argument("--fold", action="store_true", help="the progressive job's training, with and without TrainingFold")
    ap.add_argument("--compile", action="store_true", help="with --fold: also torch.compile (no TrainingFold), and its compile time")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="with --fold: fp32 or bf16 autocast (channels_last both)")
    ap.add_argument("--photos", type=int, default=0, help="time the preparation of this many real photos instead")
    ap.add_argument("--photo-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared/datasets/grocerystore/train"))
    args = ap.parse_args()
    if args.compile and not args.fold:
        ap.error("--compile is an arm of --fold: add --fold")
    if args.photos:
        return photo_preparation(Path(args.photo_dir), args.photos)
    kept = keep_freed_memory()  # as training does; NTSNET_KEEP_MALLOC=0 measures glibc's default
    print(f"glibc keeps freed memory: {kept}")
    print(f"{args.backbone}, batch {args.batch_size}, {torch.get_num_threads()} threads; training images/s (forward + backward + SGD step)\n")
    from ntsnet.predictor import cpu_supports_fast_bf16
    from common import cpu_line

    bf16 = cpu_supports_fast_bf16()
    from training.train import choose_precision

    # The two trainers decide differently on a CPU (README, "a 2-core AMX Xeon"): ask each as it asks itself.
    cpu = torch.device("cpu")
    print(f"CPU: {cpu_line()}; bf16 in hardware: {bf16}; auto precision of `python -m training train --recipe paper`: "
          f"{choose_precision(cpu, 'auto')}, of the Train button's job: {choose_precision(cpu, 'auto', bf16_on_cpu=False)}")
    rows = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    if args.fold:
        precision = "bf16" if args.precision == "bf16" else "fp32-cl"
        photos = sorted(Path(args.photo_dir).rglob("*.jpg"))
        photos = photos[:: max(1, len(photos) // (6 * args.batch_size))] or None
        data = f"{len(photos)} store-augmented photos from {args.photo_dir}, pretrained" if photos else "random data, random weights"
        print(f"as the progressive job trains ({args.precision}, channels_last, BatchNorm on running statistics, stride <= 8 frozen); {data}")
        compiled = " torch.compile img/s (first step, s) |" if args.compile else ""
        print("| model | input | parts | plain img/s | TrainingFold img/s | speed-up |" + compiled)
        print("|---|---|---|---|---|---|" + ("---|" if args.compile else ""))
        for kind, size, part, m, k in rows:
            runs = {False: [], True: []}
            for fold in (False, True, False, True):
                runs[fold].append(measure(kind, size, part, m, k, precision, args.steps, args.batch_size, args.backbone, fold, photos))
            a, b = (sorted(runs[f])[-1] for f in (False, True))  # the better of two: the other one met a slow moment
            parts = f"M={m} x {part}px" if kind == "ntsnet" else "-"
            row = f"| {kind} | {size} | {parts} | {a:.1f} | {b:.1f} | {b / a:.2f}x |"
            if args.compile:
                row += f" {compile_arm(kind, size, part, m, k, precision, args, photos)} |"
            print(row, flush=True)
        return
    print("| model | input | parts | fp32 NCHW img/s | fp32 channels_last img/s | speed-up |" + (" bf16+CL img/s |" if bf16 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if bf16 else ""))
    for kind, size, part, m, k in rows:
        a = measure(kind, size, part, m, k, "fp32", args.steps, args.batch_size, args.backbone)
        b = measure(kind, size, part, m, k, "fp32-cl", args.steps, args.batch_size, args.backbone)
        c = f" {measure(kind, size, part, m, k, 'bf16', args.steps, args.batch_size, args.backbone):.1f} |" if bf16 else ""
        parts = f"M={m} x {part}px" if kind == "ntsnet" else "-"
        print(f"| {kind} | {size} | {parts} | {a:.1f} | {b:.1f} | {b / a:.2f}x |{c}", flush=True)


if __name__ == "__main__":
    main()
