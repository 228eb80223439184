"""Everything the product does on a GPU, in one run that fits a 10-minute lease of an offline GPU machine:

1. the default job (the Train button) for --job-minutes on the grocery photos: per stage the size, images/s and
   validation accuracy with the minute it was reached, stage 1's embedding time, and whether the job ended in budget;
2. the paper's recipe (Lite0 NTS-Net 448/224, K=4, M=6) for --paper-minutes, and ResNet-50 where its weights are
   present (NTSNET_RESNET50_WEIGHTS);
3. prediction: the Predictor with its defaults (latency at batch 1, images/s at batch 32 and 64), `training evaluate`
   and `python -m ntsnet predict` on the GPU;
4. the training step's ceiling with the batch already on the GPU, and the paper loop's share of it.

    python benchmarks/gpu_check.py --dataset DIR [--job-minutes 3] [--paper-minutes 1.5] [--json OUT.json]
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
    t0 = time.perf_counter()
    summary = train(cfg, log=lambda *a: print(*a, flush=True))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"backbone": backbone, "batch": args.paper_batch, "wall_minutes": round((time.perf_counter() - t0) / 60, 2),
            "state": summary["state"], "epochs": [{k: r.get(k) for k in ("epoch", "images_per_s", "val_acc", "wall_minutes")} for r in rows],
            "images_per_s": max((r["images_per_s"] for r in rows), default=None)}


def step_ceiling(backbone: str, args, batch: int, steps: int = 12) -> float:
    """Training images/s of NTS-Net 448/224 with one batch already on the device: the loop's upper bound."""
    from ntsnet import NTSConfig, create_model, nts_loss
    from ntsnet.device import autocast_for, resolve_device

    device = resolve_device(args.device)
    cfg = NTSConfig(backbone=backbone, num_classes=81, input_size=args.size, part_size=args.size // 2, proposal_num=6, cat_num=4)
    model = create_model(cfg, pretrained=False).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x, y = torch.randn(batch, 3, args.size, args.size, device=device), torch.randint(0, 81, (batch,), device=device)
    autocast = autocast_for(device, "bf16" if device.type == "cuda" else "fp32")
    torch.backends.cudnn.benchmark = True

    def step():
        with autocast():
            out = model(x)
        loss = nts_loss(out, y, cfg)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return batch / (median_ms(step, steps, warmup=3) / 1000)


def prediction(checkpoint: str, db: Path, args) -> dict:
    """The Predictor, the evaluation and the CLI with their defaults on this machine's device."""
    import numpy as np

    from ntsnet import Predictor
    from training.evaluate import evaluate

    predictor = Predictor.from_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(64)]
    result = {"device": str(predictor.device), "backend": predictor.backend_name,
              "batch1_ms": round(median_ms(lambda: predictor.predict(frames[0]), 30, warmup=5), 2)}
    for batch in (32, 64):
        ms = median_ms(lambda: predictor.predict_batch(frames[:batch]), 5, warmup=2)
        result[f"batch{batch}_images_per_s"] = round(batch / (ms / 1000), 1)
    t0 = time.perf_counter()
    report = evaluate(checkpoint, db, split="val", out_dir=Path(checkpoint).parent / "evaluation-gpu", progress=False)
    result["evaluate"] = {"accuracy": report["accuracy"], "n": report["n"], "seconds": round(time.perf_counter() - t0, 1)}
    photo = next(Path(db).rglob("*.jpg"))
    cli = subprocess.run([sys.executable, "-m", "ntsnet", "predict", "--checkpoint", checkpoint, str(photo), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    result["cli_predict"] = {"returncode": cli.returncode, "answer": cli.stdout.strip()[:200], "error": cli.stderr.strip()[-300:]}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="folder with the grocery set's train.txt and val.txt")
    ap.add_argument("--work", default="/tmp/gpu-check")
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--job-minutes", type=float, default=3.0)
    ap.add_argument("--paper-minutes", type=float, default=1.5)
    ap.add_argument("--paper-batch", type=int, default=16)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--size", type=int, default=448, help="input size of the ceiling's NTS-Net (parts half of it)")
    ap.add_argument("--limit", type=int, default=None, help="photos per split (a smoke run)")
    args = ap.parse_args()
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    db = work / "catalogue"
    db.parent.mkdir(parents=True, exist_ok=True)
    figures = {"machine": machine_line(), "args": vars(args)}
    print(figures["machine"], flush=True)
    t0 = time.perf_counter()
    build_catalogue(Path(args.dataset), db, args.limit)
    figures["import_seconds"] = round(time.perf_counter() - t0, 1)
    figures["job"] = default_job(db, work, args)
    figures["paper"] = [paper_recipe(db, work, args.backbone, args)]
    if os.environ.get("NTSNET_RESNET50_WEIGHTS") and args.backbone != "tiny":
        figures["paper"].append(paper_recipe(db, work, "resnet50", args))
    for run in figures["paper"]:
        run["ceiling_images_per_s"] = round(step_ceiling(run["backbone"], args, batch=64 if args.backbone != "tiny" else 8), 1)
        run["loop_share_of_ceiling"] = round((run["images_per_s"] or 0) / run["ceiling_images_per_s"], 3)
    if figures["job"]["best_checkpoint"]:
        figures["predict"] = prediction(figures["job"]["best_checkpoint"], db, args)
    print(json.dumps({k: v for k, v in figures.items() if k != "job"} | {"job": {k: v for k, v in figures["job"].items() if k != "log"}},
                     indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
