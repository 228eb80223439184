"""Paper Tables 1 and 2 at the progressive job's sizes and an equal time budget.

    python benchmarks/stage_budget.py --run RUN_DIR [--minutes 6] [--arms finetune,k4,k2,k0] [--size PX]

RUN_DIR is a progressive run (its config.json, snapshot.json and stage2-finetune.safetensors). From the same
fine-tuned classifier, answering at the size the run trained its NTS-Net at (stage3-ntsnet.safetensors records it;
else stage 2's size; --size overrides), each arm trains for the same --minutes with the job's own code (training/progressive.py
``_fit``: same augmentation, schedule, frozen early layers, evaluation every 1/8 of the time, best state kept):
  finetune  the plain classifier, fine-tuned further (paper Table 1, "ResNet-50" row)
  kN        NTS-Net warm-started from it with K=N parts in the Scrutinizer (Table 2: K = 0, 2, 4)
Validation accuracy of each arm is on the run's validation photos; the CPU model and flags are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_click import cpu_line  # noqa: E402


def job_ntsnet_size(run: Path) -> int | None:
    from ntsnet.checkpoint import load_checkpoint

    path = run / "stage3-ntsnet.safetensors"
    return load_checkpoint(path).extra.get("train_input_size") if path.exists() else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a progressive run directory with stage2-finetune.safetensors")
    ap.add_argument("--minutes", type=float, default=6.0, help="training minutes per arm (evaluations included)")
    ap.add_argument("--arms", default="finetune,k4,k2,k0")
    ap.add_argument("--size", type=int, default=None, help="input size in px (parts: half); default: the size the run "
                    "trained its NTS-Net at, else stage 2's")
    args = ap.parse_args()
    from ntsnet import NTSConfig, nts_loss
    from ntsnet.checkpoint import build_model, load_checkpoint
    from training.data import Snapshot
    from training.progressive import (ProgressiveConfig, _fit, _load_arrays, at_input_size, ntsnet_from_classifier,
                                      resolve_freeze_stride)

    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())
    cfg = ProgressiveConfig(**{f.name: saved[f.name] for f in fields(ProgressiveConfig) if f.name in saved})
    cfg.freeze_stride = resolve_freeze_stride(cfg.freeze_stride, torch.device("cpu"))
    snap = Snapshot.load(run / "snapshot.json")
    start = build_model(load_checkpoint(run / "stage2-finetune.safetensors")).eval()
    size = args.size or job_ntsnet_size(run) or start.config.input_size
    start = at_input_size(start, size)  # the hand-off the job makes: stage 2's weights answering at stage 3's size
    val = _load_arrays(snap.val or snap.test)
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(f"{len(snap.class_names)} products, {len(snap.train)} training / {len(val[1])} validation photos; "
          f"input {size} px, parts {max(32, size // 2)} px, {args.minutes} min per arm, frozen up to stride {cfg.freeze_stride}")
    results = []
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        torch.manual_seed(cfg.seed)
        if arm == "finetune":
            model, head_mult = copy.deepcopy(start), None
        elif arm.startswith("k") and arm[1:].isdigit():
            k = int(arm[1:])
            nts_cfg = NTSConfig(model="ntsnet", backbone=cfg.backbone, num_classes=len(snap.class_names), input_size=size,
                                part_size=max(32, size // 2), proposal_num=cfg.proposal_num, cat_num=k)
            model, head_mult = ntsnet_from_classifier(start, nts_cfg), 1.0
        else:
            sys.exit(f"unknown arm {arm!r}: finetune or kN")
        model = model.to(memory_format=torch.channels_last)
        loss_fn = lambda out, y, m=model: nts_loss(out, y, m.config, label_smoothing=cfg.label_smoothing)  # noqa: E731
        t0 = time.perf_counter()
        model, best, rows, _ = _fit(model, loss_fn, snap.train, size, cfg, args.minutes * 60, torch.device("cpu"),
                                 contextlib.nullcontext, False, lambda **_: None, arm, val, lambda *a: print(" ", *a, flush=True),
                                 head_lr_mult=head_mult)
        seen = rows[-1]["images_per_s"] * rows[-1]["train_minutes"] * 60 if rows else 0
        results.append({"arm": arm, "best_val_acc": best, "last_val_acc": rows[-1]["val_acc"] if rows else None,
                        "images_per_s": rows[-1]["images_per_s"] if rows else None, "images_seen": round(seen),
                        "minutes": round((time.perf_counter() - t0) / 60, 2), "curve": [(r["elapsed_minutes"], r["val_acc"]) for r in rows]})
        print(f"{arm}: best {best:.1%}, last {results[-1]['last_val_acc']:.1%}, {results[-1]['images_per_s']} img/s", flush=True)
    print(f"\nstart (stage 2 classifier) -> {args.minutes} more minutes each")
    print("arm        best val  last val  images/s  images seen")
    for r in results:
        print(f"{r['arm']:9s}  {r['best_val_acc']:7.1%}  {r['last_val_acc']:8.1%}  {r['images_per_s']:8.2f}  {r['images_seen']:11d}")
    (run / f"stage_budget-{size}px-{args.minutes:g}min.json").write_text(json.dumps({"cpu": cpu_line(), "minutes": args.minutes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
