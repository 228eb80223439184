"""Everything the product does on a GPU, in runs that fit a 10-minute lease of an offline GPU machine:

- job:      the default job (the Train button) for --job-minutes: per stage the size, images/s and validation accuracy
            with the minute it was reached, stage 1's embedding time, and whether the job ended in budget;
- paper:    the paper's recipe (Lite0 NTS-Net 448/224, K=4, M=6) for --paper-minutes with the batch chosen from the
            device (or --paper-batch), and ResNet-50 where its weights are present (NTSNET_RESNET50_WEIGHTS);
- loader:   the paper loop's and stage 2's DataLoaders alone (no model): the images/s the workers can deliver;
- profile:  where a paper-loop step's time goes: waiting for the batch, copy + normalise, forward, loss + backward,
            optimiser (synchronised phases), and the GPU's busiest kernels (torch.profiler);
- ceiling:  the training step with the batch already on the GPU: batch 64/128, bf16/fp32, channels_last, torch.compile
            (its compile time counted apart), and the paper loop's share of the best;
- review:   issue #61's fixes: the same answers at batch 1 and 64, peak memory of resizing 24 phone photos, the Train
            batch from free memory before and after an evaluation hands its cache back, bf16 hardware, TF32 restored
            (needs the job's checkpoint or --checkpoint, and CUDA);
- predict:  the Predictor at batch 1/8/32/64 in fp32 and bf16 and with its defaults, photos resized on the GPU or on
            the CPU, `training evaluate` and `python -m ntsnet predict` over a folder.

    python benchmarks/gpu_check.py --dataset DIR [--parts job,paper,loader,profile,ceiling,predict] [--job-minutes 3]
    python benchmarks/gpu_check.py --dataset DIR --device cpu --backbone tiny --limit 40 --job-minutes 0.5  # a smoke run

DIR holds the grocery set's train.txt / val.txt (photos may be re-encoded smaller to travel: ../shared/notes/
gpu-machine.md). Nothing here runs in the tests or CI; the figures go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, machine_line, median_ms  # noqa: E402


def build_catalogue(dataset: Path, db: Path, limit: int | None):
    """The grocery train and val photos as a catalogue (train/val splits as the lists say); ``limit``: the first
    ``limit`` lines of each list (smoke runs)."""
    from dataset_tools import Catalogue
    from dataset_tools.transfer import import_path

    if (db / "catalogue.db").exists():
        return
    cat = Catalogue(db)
    if (dataset / "classes.csv").exists():  # product names, read from beside the list
        (db.parent / "classes.csv").write_text((dataset / "classes.csv").read_text())
    for split in ("train", "val"):
        lines = (dataset / f"{split}.txt").read_text().splitlines()
        if limit:
            lines = [line for i, line in enumerate(lines) if line.strip() and i % max(1, len(lines) // limit) == 0][:limit]
        listing = db.parent / f"{split}.txt"
        listing.write_text("\n".join(lines))
        for sub in ("train", "val"):
            link = db.parent / sub
            if not link.exists() and (dataset / sub).exists():
                link.symlink_to((dataset / sub).resolve())
        print(import_path(cat, listing, split=split, progress=False), flush=True)
    cat.close()


def default_job(db: Path, work: Path, args) -> dict:
    """The Train button's job in this process, timed from outside; stage lines are kept with their minute."""
    from training.progressive import ProgressiveConfig, train_progressive

    lines, t0 = [], time.perf_counter()

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        lines.append((round((time.perf_counter() - t0) / 60, 2), line))
        print(f"[{lines[-1][0]:5.2f} min] {line}", flush=True)

    cfg = ProgressiveConfig(db=str(db), out=str(work / "job"), backbone=args.backbone, pretrained=args.backbone != "tiny",
                            max_minutes=args.job_minutes, device=args.device, workers=args.workers)
    summary = train_progressive(cfg, log=log)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (work / "job" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    embed = next((float(m.group(1)) for _, line in lines if (m := re.search(r"views of \d+ photos in (\d+) s", line))), None)
    stages = []
    for r in summary["results"]:
        speed = [row["images_per_s"] for row in rows if row.get("stage") == r["stage"] and row.get("images_per_s")]
        stages.append({"stage": r["stage"], "input_size": r["input_size"], "val_acc": r["val_acc"], "test_acc": r.get("test_acc"),
                       "minute": r["minutes"], "images_per_s": max(speed) if speed else None, "active": r["active"]})
    return {"wall_minutes": round(wall / 60, 2), "budget_minutes": args.job_minutes, "state": summary["state"],
            "within_10_percent": wall <= args.job_minutes * 60 * 1.1, "stage1_seconds": embed, "stages": stages,
            "instant_val_acc": summary["instant_val_acc"], "best_checkpoint": summary["best_checkpoint"], "log": lines}


def paper_recipe(db: Path, work: Path, backbone: str, args) -> dict:
    from training.train import TrainConfig, train

    out = work / f"paper-{backbone}"
    cfg = TrainConfig(db=str(db), out=str(out), backbone=backbone, pretrained=args.backbone != "tiny", epochs=1000,
                      batch_size=args.paper_batch, max_minutes=args.paper_minutes, device=args.device, workers=args.workers)
    cfg.input_size, cfg.part_size = args.size, args.size // 2
    t0 = time.perf_counter()
    summary = train(cfg, log=lambda *a: print(*a, flush=True))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"backbone": backbone, "batch": cfg.batch_size, "lr": cfg.lr, "workers": cfg.workers, "wall_minutes": round((time.perf_counter() - t0) / 60, 2),
            "state": summary["state"], "epochs": [{k: r.get(k) for k in ("epoch", "images_per_s", "val_acc", "wall_minutes")} for r in rows],
            "images_per_s": max((r["images_per_s"] for r in rows), default=None)}


def step_ceiling(backbone: str, args, batch: int, precision: str = "bf16", channels_last: bool = False, compile_: bool = False,
                 steps: int = 12) -> dict:
    """Training images/s of NTS-Net 448/224 with one batch already on the device: the loop's upper bound."""
    from ntsnet import NTSConfig, create_model, nts_loss
    from ntsnet.device import autocast_for, resolve_device

    device = resolve_device(args.device)
    cfg = NTSConfig(backbone=backbone, num_classes=81, input_size=args.size, part_size=args.size // 2, proposal_num=6, cat_num=4)
    model = create_model(cfg, pretrained=False).to(device).train()
    x, y = torch.randn(batch, 3, args.size, args.size, device=device), torch.randint(0, 81, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    autocast = autocast_for(device, precision if device.type == "cuda" else "fp32")
    torch.backends.cudnn.benchmark = True
    net = torch.compile(model) if compile_ else model

    def step():
        with autocast():
            out = net(x)
        loss = nts_loss(out, y, cfg)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    t0 = time.perf_counter()
    step()  # the first step: cuDNN's search and, with compile_, the compilation
    first = time.perf_counter() - t0
    ips = batch / (median_ms(step, steps, warmup=2) / 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"batch": batch, "precision": precision, "channels_last": channels_last, "compile": compile_,
            "images_per_s": round(ips, 1), "first_step_s": round(first, 1), "peak_gib": round(peak, 1) if peak else None}


def ceilings(backbone: str, args) -> list[dict]:
    big = 64 if args.backbone != "tiny" else 8
    arms = [dict(batch=big), dict(batch=2 * big), dict(batch=big, precision="fp32"), dict(batch=big, channels_last=True)]
    if args.compile:
        arms.append(dict(batch=big, compile_=True))
    rows = []
    for arm in arms:
        try:
            rows.append(step_ceiling(backbone, args, **arm))
        except Exception as exc:  # one arm out of memory or failing to compile must not lose the others
            rows.append({**arm, "error": str(exc).splitlines()[0][:200]})
        print("ceiling", rows[-1], flush=True)
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_speed(db: Path, work: Path, args) -> dict:
    """Images/s the training DataLoaders deliver with no model behind them: the paper loop's (flip) and stage 2's
    (store augmentation), with the workers and batch the recipes choose on this device."""
    from ntsnet.device import resolve_device
    from training.data import PhotoDataset, collate, take_snapshot
    from training.feeding import EpochSampler, resolve_feeding, run_loader
    from types import SimpleNamespace

    device = resolve_device(args.device)
    items = take_snapshot(str(db)).train
    out = {}
    for augment in ("flip", "store"):
        cfg = SimpleNamespace(batch_size=None, lr=0.001, workers=args.workers)
        resolve_feeding(cfg, device, args.backbone, args.size, cpu_batch=8)
        ds = PhotoDataset(items, args.size, train=True, augment=augment, as_uint8=device.type == "cuda")
        sampler = EpochSampler(len(ds), 0)
        loader = run_loader(ds, sampler, cfg.batch_size, cfg.workers, device, collate)
        for epoch in (1, 2):  # the first epoch starts the workers; the second is what a run sees after
            sampler.epoch = epoch
            t0, n = time.perf_counter(), 0
            for x, _, _ in loader:
                x.to(device, non_blocking=True)
                n += len(x)
            sync(device)
        out[augment] = {"batch": cfg.batch_size, "workers": cfg.workers, "images_per_s": round(n / (time.perf_counter() - t0), 1)}
        print("loader", augment, out[augment], flush=True)
    return out


def profile_loop(db: Path, work: Path, args, steps: int = 20) -> dict:
    """A paper-loop step's time by phase (each phase synchronised, so the sum is a little above a free-running step)
    and the GPU kernels with the most self time over ``steps`` free-running steps."""
    from ntsnet import nts_loss
    from training.feeding import as_model_input
    from training.train import PaperRun, TrainConfig

    cfg = TrainConfig(db=str(db), out=str(work / "profile"), backbone=args.backbone, pretrained=False, epochs=1000,
                      batch_size=args.paper_batch, device=args.device, workers=args.workers, input_size=args.size, part_size=args.size // 2)
    run = PaperRun(cfg, log=lambda *a: None)
    run.setup()
    run.loaders()
    run.net.train()
    device, phases = run.device, {"wait for batch": 0.0, "copy + normalise": 0.0, "forward": 0.0, "loss + backward": 0.0, "optimiser": 0.0}
    batches = iter(run.epoch_batches(1))

    def one_step(timed: bool):
        marks = [time.perf_counter()]
        mark = (lambda: (sync(device), marks.append(time.perf_counter()))) if timed else (lambda: None)
        x, y, _ = next(batches)
        mark()
        x, y = as_model_input(run.model, x), y.to(device, non_blocking=True)
        mark()
        with run.autocast():
            out = run.net(x)
        mark()
        loss = nts_loss(out, y, run.model_cfg)["total"]
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        run.optimizer.step()
        mark()
        return marks

    n = min(steps, len(run.train_loader) // 2 - 1)
    for _ in range(2):
        one_step(False)
    for _ in range(n):
        marks = one_step(True)
        for name, a, b in zip(phases, marks, marks[1:]):
            phases[name] += b - a
    result = {"batch": cfg.batch_size, "steps": n, "ms_per_step": {k: round(v / max(n, 1) * 1000, 1) for k, v in phases.items()}}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(min(5, len(run.train_loader) - n - 3)):
                one_step(False)
            sync(device)
        table = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:15]
        result["top_kernels"] = [{"name": e.key[:60], "self_cuda_ms": round(e.self_device_time_total / 1000, 1), "calls": e.count}
                                 for e in table]
        result["host_syncs"] = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    print("profile", json.dumps(result), flush=True)
    return result


def prediction(checkpoint: str, db: Path, args) -> dict:
    """The Predictor with its defaults and at each precision per batch size, photos resized on the device or the CPU;
    the evaluation and the CLI over a folder, on this machine's device."""
    import numpy as np

    from ntsnet import Predictor
    from ntsnet.images import to_input_tensor
    from training.evaluate import evaluate

    predictor = Predictor.from_checkpoint(checkpoint, device=args.device)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(64)]
    result = {"device": str(predictor.device), "backend": predictor.backend_name,
              "batch1_ms": round(median_ms(lambda: predictor.predict(frames[0]), 30, warmup=5), 2)}
    for batch in (8, 32, 64):
        ms = median_ms(lambda: predictor.predict_batch(frames[:batch]), 5, warmup=2)
        result[f"batch{batch}_images_per_s"] = round(batch / (ms / 1000), 1)
    for precision in ("fp32", "bf16"):
        fixed = Predictor.from_checkpoint(checkpoint, device=args.device, precision=precision, backend="torch")
        result[precision] = {"batch1_ms": round(median_ms(lambda: fixed.predict(frames[0]), 20, warmup=5), 2)}
        for batch in (8, 32, 64):
            ms = median_ms(lambda: fixed.predict_batch(frames[:batch]), 5, warmup=2)
            result[precision][f"batch{batch}_images_per_s"] = round(batch / (ms / 1000), 1)
    device, size, net = predictor.device, predictor.config.input_size, predictor.model
    for where in ("device", "cpu"):
        run = lambda: (to_input_tensor(frames, size, net.mean, net.std, device=device if where == "device" else None).to(device), sync(device))  # noqa: E731
        result[f"resize_64_on_{where}_ms"] = round(median_ms(run, 5, warmup=1), 1)
    t0 = time.perf_counter()
    report = evaluate(checkpoint, db, split="val", out_dir=Path(checkpoint).parent / "evaluation-gpu", progress=False, device=args.device)
    result["evaluate"] = {"accuracy": report["accuracy"], "n": report["n"], "seconds": round(time.perf_counter() - t0, 1)}
    folder = Path(db) / "images"  # every photo of the catalogue, in its content-addressed folders
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "ntsnet", "predict", "--checkpoint", checkpoint, str(folder), "--json", "--device", args.device],
                         capture_output=True, text=True, cwd=ROOT)
    result["cli_predict_folder"] = {"returncode": cli.returncode, "photos": len(cli.stdout.splitlines()),
                                    "seconds": round(time.perf_counter() - t0, 1), "error": cli.stderr.strip()[-300:]}
    return result


def gpu_review(checkpoint: str, db: Path, args) -> dict:
    """What issue #61's fixes should show on a real GPU: one precision whatever the batch (the same answers at batch 1
    and 64), resizing bounded by pixels (peak memory of 24 phone-sized photos), the batch a Train click chooses from
    the free memory before and after the app's evaluation hands its cache back, bf16 hardware, TF32 restored."""
    import numpy as np

    from ntsnet import Predictor
    from ntsnet.device import exact_fp32, free_memory_gib, gpu_has_bf16, release_cached_memory
    from ntsnet.images import resize_on_device
    from training.evaluate import evaluate
    from training.feeding import batch_for

    device = torch.device("cuda")
    out = {"capability": ".".join(map(str, torch.cuda.get_device_capability(device))), "bf16_hardware": gpu_has_bf16(device)}
    predictor = Predictor.from_checkpoint(checkpoint, device="cuda")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(64)]
    alone = [predictor.predict(f) for f in frames[:16]]
    together = predictor.predict_batch(frames)[:16]
    out["precision"] = predictor.precision
    out["batch1_vs_64_same_label"] = sum(a.label == b.label for a, b in zip(alone, together)) / 16
    out["batch1_vs_64_max_confidence_gap"] = max(abs(a.confidence - b.confidence) for a, b in zip(alone, together))
    phone = rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    resize_on_device([phone] * 24, 448, device)
    torch.cuda.synchronize()
    out["resize_24_phone_photos_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    out["free_gib_before_evaluation"] = round(free_memory_gib(device), 2)
    out["train_batch_before_evaluation"] = batch_for(device, args.backbone, 448, 16)
    evaluate(checkpoint, db, split="val", out_dir=Path(checkpoint).parent / "evaluation-review", progress=False, predictor=predictor)
    out["cached_gib_after_evaluation"] = round((torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30, 2)
    release_cached_memory(device)
    out["cached_gib_after_release"] = round((torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30, 2)
    out["train_batch_after_evaluation"] = batch_for(device, args.backbone, 448, 16)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_fp32(), exact_fp32():
        pass
    out["tf32_restored"] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    print("review", json.dumps(out), flush=True)
    return out


PARTS = ("review", "job", "paper", "loader", "profile", "ceiling", "predict")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="folder with the grocery set's train.txt and val.txt")
    ap.add_argument("--work", default="/tmp/gpu-check")
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--job-minutes", type=float, default=3.0)
    ap.add_argument("--paper-minutes", type=float, default=1.5)
    ap.add_argument("--paper-batch", type=int, default=None, help="default: chosen from the device (training/feeding.py)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="default: chosen from the cores (training/feeding.py)")
    ap.add_argument("--size", type=int, default=448, help="input size of the paper loop and the ceiling (parts half of it)")
    ap.add_argument("--compile", action="store_true", help="ceiling: add a torch.compile arm (minutes of compiling)")
    ap.add_argument("--checkpoint", default=None, help="predict: this checkpoint instead of the job's")
    ap.add_argument("--limit", type=int, default=None, help="photos per split (a smoke run)")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"--parts: one or more of {','.join(PARTS)}")
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    db = work / "catalogue"
    db.parent.mkdir(parents=True, exist_ok=True)
    figures = {"machine": machine_line(), "args": vars(args)}
    print(figures["machine"], flush=True)
    t0 = time.perf_counter()
    build_catalogue(Path(args.dataset), db, args.limit)
    figures["import_seconds"] = round(time.perf_counter() - t0, 1)
    sections = {
        "job": lambda: default_job(db, work, args),
        "paper": lambda: [paper_recipe(db, work, args.backbone, args)]
        + ([paper_recipe(db, work, "resnet50", args)] if os.environ.get("NTSNET_RESNET50_WEIGHTS") and args.backbone != "tiny" else []),
        "loader": lambda: loader_speed(db, work, args),
        "profile": lambda: profile_loop(db, work, args),
        "ceiling": lambda: ceilings(args.backbone, args),
    }
    for part in parts:
        if part in sections:
            t_part = time.perf_counter()
            figures[part] = sections[part]()
            print(f"[{part} took {time.perf_counter() - t_part:.0f} s]", flush=True)
    if "paper" in figures and "ceiling" in figures:
        best = max((r.get("images_per_s") or 0) for r in figures["ceiling"])
        for run in figures["paper"]:
            run["loop_share_of_ceiling"] = round((run["images_per_s"] or 0) / best, 3) if best else None
    checkpoint = args.checkpoint or (figures.get("job") or {}).get("best_checkpoint")
    if "predict" in parts and checkpoint:
        figures["predict"] = prediction(checkpoint, db, args)
    if "review" in parts and checkpoint and torch.cuda.is_available():
        figures["review"] = gpu_review(checkpoint, db, args)
    shown = {k: v for k, v in figures.items() if k != "job"}
    if "job" in figures:
        shown["job"] = {k: v for k, v in figures["job"].items() if k != "log"}
    print(json.dumps(shown, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
