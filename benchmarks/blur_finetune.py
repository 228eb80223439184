"""Can a trained model learn to read blurred photos better? Continue a job's model on training views blurred exactly
as the evaluation blurs its photos, and compare it before and after, and with the same continued training unblurred.

    python benchmarks/blur_finetune.py --run RUN [--stage ntsnet] [--arm blur|control] [--minutes 15] [--lr 0.002]

RUN is a finished job's run folder (its snapshot.json names the training and validation photos). ``--arm blur``:
every training view is store_augment's view with the evaluation's Gaussian (sigma 1.5% of the view's side) on top,
and the weights kept are those that read the *blurred* validation photos best: an upper bound for a blur specialist,
since it is selected on the photos it is measured on. ``--arm control``: store_augment alone, kept on clean photos.
Both continue with the job's own stage-3 training loop (training/progressive.py: _fit) at the model's input size.
Prints clean / dark / blurry / low-res validation accuracy at the start and at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGE_FILES = {"finetune": "stage2-finetune.safetensors", "ntsnet": "stage3-ntsnet.safetensors"}


def blurred_views(augment, share: float):
    """``augment`` (store_augment's signature) followed by the evaluation's Gaussian blur of ``share`` x the view's
    longest side, so a training view is blurred as much, for its size, as an evaluation photo is."""
    from PIL import Image

    from training.evaluate import blur

    def views(im, rng, degrade: bool = True, size: int | None = None):
        return Image.fromarray(blur(np.asarray(augment(im, rng, degrade=degrade, size=size)), share))

    return views


@contextlib.contextmanager
def training_views(arm: str):
    """The training loop draws its views from training.data.store_augment; the blur arm swaps that for the blurred
    views while it trains (its DataLoader workers fork inside, so they get the swap too)."""
    import training.data as data
    from training.evaluate import BLUR_SHARE

    original = data.store_augment
    if arm == "blur":
        data.store_augment = blurred_views(original, BLUR_SHARE)
    try:
        yield
    finally:
        data.store_augment = original


def condition_accuracies(model, arrays, labels) -> dict[str, float]:
    from training.evaluate import CONDITIONS, apply_condition
    from training.progressive import evaluate_model

    return {c: evaluate_model(model, [apply_condition(a, c) for a in arrays], labels)[0] for c in CONDITIONS}


def main():
    import torch

    from ntsnet import nts_loss
    from ntsnet.checkpoint import build_model, load_checkpoint
    from train_click import cpu_line
    from training.data import Snapshot
    from training.evaluate import apply_condition
    from training.progressive import ProgressiveConfig, _fit, _load_arrays, _Stop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished job's run folder")
    ap.add_argument("--stage", default="ntsnet", choices=sorted(STAGE_FILES))
    ap.add_argument("--arm", default="blur", choices=["blur", "control"])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--lr", type=float, default=0.002, help="the backbone's; the heads get the same, as in stage 3")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    run = Path(args.run)
    missing = [name for name in ("snapshot.json", STAGE_FILES[args.stage]) if not (run / name).is_file()]
    if missing:
        ap.error(f"{run} is not a finished job's run folder with a {args.stage} stage: it has no {' and no '.join(missing)}")
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    snap = Snapshot.load(run / "snapshot.json")
    model = build_model(load_checkpoint(run / STAGE_FILES[args.stage]))
    arrays, labels = _load_arrays(snap.val)
    show = lambda acc: json.dumps({c: round(100 * a, 1) for c, a in acc.items()})  # noqa: E731
    print(f"{args.stage} at {model.config.input_size} px, answer {model.config.answer}; {len(snap.train)} training, "
          f"{len(labels)} validation photos; arm {args.arm}, {args.minutes:g} min, lr {args.lr}")
    print("start:", show(condition_accuracies(model, arrays, labels)), flush=True)
    select = [apply_condition(a, "blurry") for a in arrays] if args.arm == "blur" else arrays
    cfg = ProgressiveConfig(lr=args.lr, freeze_stride=8, seed=args.seed)
    loss_fn = lambda out, y: nts_loss(out, y, model.config, label_smoothing=cfg.label_smoothing)  # noqa: E731
    t0 = time.time()
    with training_views(args.arm):
        model, acc, _, trained = _fit(model.train(), loss_fn, snap.train, model.config.input_size, cfg, args.minutes * 60,
                                      torch.device("cpu"), contextlib.nullcontext, _Stop(run), lambda **_: None, args.arm,
                                      (select, labels), print, head_lr_mult=1.0)
    print(f"trained {(time.time() - t0) / 60:.1f} min; kept {'trained' if trained else 'the starting'} weights "
          f"({acc:.1%} on the {'blurred' if args.arm == 'blur' else 'clean'} validation photos)")
    print("end:  ", show(condition_accuracies(model, arrays, labels)))


if __name__ == "__main__":
    main()
