"""Grocery Store benchmark (train -> val): NTS-Net vs the fine-tuned baseline vs a frozen linear probe.

    python benchmarks/grocery.py --minutes 20 [--stages probe,baseline,ntsnet,warm] [--work /tmp/grocery-bench]

Uses the product's own code: dataset_tools imports ../shared/datasets/grocerystore (train.txt -> train,
val.txt -> val), training.train trains under a --max-minutes budget of training time, training.evaluate
scores best.safetensors on the val split under the store conditions. Results go to WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataset_tools import Catalogue  # noqa: E402
from dataset_tools.transfer import import_path  # noqa: E402
from training.data import PhotoDataset, collate, take_snapshot  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

DATASET = ROOT.parent / "shared" / "datasets" / "grocerystore"


def build_catalogue(work: Path) -> Path:
    db = work / "catalogue"
    if (db / "catalogue.db").exists():
        return db
    cat = Catalogue(db)
    for split in ("train", "val"):
        print(import_path(cat, DATASET / f"{split}.txt", split=split, progress=False))
    return db


def linear_probe(db: Path, backbone: str = "efficientnet_lite0", size: int = 224) -> dict:
    """Frozen ImageNet features + a linear classifier (full-batch L-BFGS on the features)."""
    from ntsnet.backbones import create_backbone

    t0 = time.perf_counter()
    snap = take_snapshot(db)
    net = create_backbone(backbone, pretrained=True).eval().to(memory_format=torch.channels_last)

    def features(items):
        loader = torch.utils.data.DataLoader(PhotoDataset(items, size, train=False), batch_size=32, collate_fn=collate, num_workers=2)
        xs, ys = [], []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for x, y, _ in loader:
                xs.append(net(x.contiguous(memory_format=torch.channels_last)).float().mean((2, 3)))
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    xtr, ytr = features(snap.train)
    xva, yva = features(snap.val)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    head = torch.nn.Linear(xtr.shape[1], len(snap.class_names))
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=300, history_size=20)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float((head(xva).argmax(1) == yva).float().mean())
    return {"accuracy": acc, "n": len(yva), "minutes": round((time.perf_counter() - t0) / 60, 2)}


def run_training(cfg: TrainConfig, db: Path) -> dict:
    t0 = time.perf_counter()
    summary = train(cfg)
    report = evaluate(Path(cfg.out) / "best.safetensors", db, split="val", progress=False)
    return {"accuracy": report["accuracy"], "top5": report["top5"], "n": report["n"], "conditions": report["conditions"],
            "epochs": summary.get("epoch"), "train_minutes": summary.get("train_minutes"), "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("db", "out")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20, help="training-time budget per trained model")
    ap.add_argument("--stages", default="probe,baseline,ntsnet")
    ap.add_argument("--work", default="/tmp/grocery-bench")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--nts-input", type=int, default=320)
    ap.add_argument("--nts-part", type=int, default=160)
    ap.add_argument("--extra-minutes", type=float, default=12, help="for 'warm' and 'baseline-more': minutes beyond the baseline's")
    args = ap.parse_args()
    if not DATASET.exists():
        sys.exit(f"dataset not found at {DATASET}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = build_catalogue(work)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    common = dict(db=str(db), backbone=args.backbone, epochs=1000, max_minutes=args.minutes, lr=args.lr, label_smoothing=0.1,
                  batch_size=16, workers=2)
    for stage in args.stages.split(","):
        print(f"=== {stage} ===", flush=True)
        if stage == "probe":
            results["linear_probe"] = linear_probe(db, args.backbone)
        elif stage == "baseline":
            results["baseline"] = run_training(TrainConfig(out=str(work / "baseline"), model="baseline", input_size=224, **common), db)
        elif stage == "ntsnet":
            results["ntsnet"] = run_training(TrainConfig(out=str(work / "ntsnet"), model="ntsnet", input_size=args.nts_input,
                                                         part_size=args.nts_part, **common), db)
        elif stage == "warm":  # NTS-Net starting from the fine-tuned baseline's backbone and head
            results["ntsnet_warm"] = run_training(TrainConfig(out=str(work / "ntsnet-warm"), model="ntsnet", input_size=args.nts_input,
                                                              part_size=args.nts_part, init_from=str(work / "baseline" / "best.safetensors"),
                                                              **{**common, "max_minutes": args.extra_minutes, "lr": 0.001}), db)
        elif stage == "baseline-more":  # the same baseline given the same extra minutes: the fair comparison for 'warm'
            import shutil

            longer = work / "baseline-more"
            if not longer.exists():
                shutil.copytree(work / "baseline", longer)
            results["baseline_more"] = run_training(TrainConfig(out=str(longer), model="baseline", input_size=224,
                                                                **{**common, "max_minutes": args.minutes + args.extra_minutes}), db)
        print(json.dumps(results.get({"probe": "linear_probe", "warm": "ntsnet_warm", "baseline-more": "baseline_more"}.get(stage, stage)), indent=1), flush=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
