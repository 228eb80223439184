"""``python -m training train | item-finder | evaluate | ablate | jobs``."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ntsnet.counter import COUNTER_FILE

from .data import DataError
from .train import TrainConfig


def _add_train_args(p, with_db_out=True):
    """Every default is None here and filled in by the recipe's own config (TrainConfig or ProgressiveConfig),
    so a flag given on the command line can be told from one that was not."""
    d = TrainConfig()
    if with_db_out:
        p.add_argument("--db", default=None, help="catalogue directory (default: data)")
        p.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    p.add_argument("--model", choices=["ntsnet", "baseline"], default=None, help=f"paper recipe (default {d.model})")
    p.add_argument("--backbone", default=None, help=f"resnet50 | efficientnet_lite0/1/2 | tiny (default {d.backbone})")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None, help="train from random weights on purpose")
    p.add_argument("--epochs", type=int, default=None, help=f"paper recipe (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None, help="paper: 448; progressive: 224 on a CPU, 448 on a GPU")
    p.add_argument("--part-size", type=int, default=None, help="paper recipe")
    p.add_argument("--proposal-num", type=int, default=None, help="M (6)")
    p.add_argument("--cat-num", type=int, default=None, help="K (4)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None, help="paper recipe")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="time budget (progressive default: 3 min + 1 per 100 photos, at most 30)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-train-images", type=int, default=None, help="paper recipe")
    p.add_argument("--exclude-products", default=None, help="comma-separated products to hold out (open-set evaluation)")
    p.add_argument("--init-from", default=None, help="paper recipe: start from this checkpoint's weights (e.g. a fine-tuned baseline)")


PAPER_ONLY = ("model", "epochs", "part_size", "momentum", "max_train_images", "init_from")
PROGRESSIVE_ONLY = ("stages", "views", "min_steps", "finetune_share", "ntsnet_size", "freeze_stride", "ema_share", "cutmix", "activate", "refit")


def _refuse_other_recipe(given: dict, recipe: str):
    """A flag of the other recipe would be silently ignored: say so instead, before anything runs."""
    other, hint = (PROGRESSIVE_ONLY, "the default recipe's: drop it or drop --recipe paper") if recipe == "paper" else \
        (PAPER_ONLY, "the paper's recipe: add --recipe paper (the default recipe plans its stages from --max-minutes)")
    wrong = sorted(k for k in other if k in given)
    if wrong:
        flag = "--no-activate" if wrong[0] == "activate" else "--" + wrong[0].replace("_", "-")
        raise DataError(f"{flag} belongs to {hint}")


def _given(args) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


def _train_config(args, **override) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in _given(args).items() if k in names}, **override})


def _progressive_config(args):
    from .progressive import ProgressiveConfig

    given = _given(args)
    _refuse_other_recipe(given, "progressive")
    names = {f.name for f in fields(ProgressiveConfig)}
    return ProgressiveConfig(**{k: v for k, v in given.items() if k in names})


def cmd_train(args):
    if args.recipe == "paper":
        from .train import train

        _refuse_other_recipe(_given(args), "paper")
        summary = train(_train_config(args))
        return 0 if summary["state"] == "finished" else 1
    from .progressive import train_progressive

    summary = train_progressive(_progressive_config(args))
    if summary["state"] != "finished":
        return 1
    db = args.db or "data"
    if args.item_finder == "auto" and (Path(db) / COUNTER_FILE).exists():
        # the Checkout counter is learnt: its item finder learns this catalogue's products too
        return cmd_item_finder(argparse.Namespace(db=db, composites=None, epochs=None))
    return 0


def cmd_item_finder(args):
    from .item_finder import FinderTrainConfig, train_for_catalogue

    cfg = FinderTrainConfig(**{k: v for k, v in (("composites", args.composites), ("epochs", args.epochs)) if v is not None})
    last = [-1.0]

    def progress(fraction, message):
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            print(f"{fraction:4.0%} {message}", flush=True)

    try:
        path, finder = train_for_catalogue(args.db, cfg, progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = finder.extra
    print(f"item finder: {path} (held-out composites: {extra['held_out_recall']:.1%} of items found, "
          f"{extra['held_out_precision']:.1%} of boxes right)")
    return 0


def cmd_evaluate(args):
    from .evaluate import evaluate, format_report

    out = args.report_dir or str(Path(args.checkpoint).parent / f"evaluation-{args.split}")
    unknown = [p.strip() for p in args.unknown_products.split(",") if p.strip()]
    report = evaluate(args.checkpoint, args.db, split=args.split, out_dir=out, progress=not args.json,
                      device=args.device, precision=args.precision, unknown_products=unknown)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "confusion"}, ensure_ascii=False))
    else:
        print(format_report(report))
        print(f"confusion matrix: {out}/confusion.png, {out}/confusion.csv")
    return 0


def cmd_ablate(args):
    from .ablate import ablate, format_tables

    results = ablate(_train_config(args), args.minutes, split=args.split)
    print(format_tables(results, args.backbone))
    return 0


def cmd_jobs(args):
    from . import jobs

    if args.action == "start":
        st = jobs.start(args.db, out=args.out, backbone=args.backbone, max_minutes=args.max_minutes,
                        cat_num=args.cat_num, input_size=args.input_size)
        print(f"started {st['name']} (pid {st['pid']}); follow with: python -m training jobs status {st['run_dir']}")
    elif args.action == "status":
        st = jobs.status(args.run)
        p = st["progress"]
        print(json.dumps({k: st[k] for k in ("name", "state", "pid", "best_val_acc")} | {"epoch": p.get("epoch"), "epochs": p.get("epochs"),
                          "step": p.get("step"), "steps": p.get("steps"), "loss": p.get("loss"), "eta_seconds": p.get("eta_seconds")}))
    elif args.action == "cancel":
        print(f"{jobs.cancel(args.run)['state']}")
    elif args.action == "list":
        for st in jobs.list_runs(args.db):
            best = f"{st['best_val_acc']:.1%}" if st["best_val_acc"] is not None else "-"
            print(f"{st['name']}  {st['state']:<11} best val {best}  {st['run_dir']}")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate NTS-Net on a catalogue.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train: progressive stages by default, each made active only if it is better")
    _add_train_args(p)
    p.add_argument("--recipe", choices=["progressive", "paper"], default="progressive",
                   help="progressive (linear -> fine-tune -> NTS-Net, see training/progressive.py) or the paper's "
                        "single NTS-Net run (resumes automatically when RUN_DIR has a saved epoch)")
    p.add_argument("--stages", default=None, help="progressive: ordered subset of linear,finetune,ntsnet")
    p.add_argument("--freeze-stride", type=int, default=None,
                   help="progressive: keep the backbone layers up to this stride frozen in stages 2-3 (default 8 on a CPU, 0 = train all on a GPU)")
    p.add_argument("--views", type=int, default=None, help="progressive: augmented views per photo for the linear stage (8)")
    p.add_argument("--finetune-share", type=float, default=None,
                   help="progressive: stage 2's share of the time left after stage 1; NTS-Net gets the rest (0.45)")
    p.add_argument("--ntsnet-size", type=int, default=None,
                   help="progressive: stage 3's input size in pixels, parts half of it (default: 9/7 of stage 2's size when the "
                        "time left allows two epochs there at the speed stage 2 measured, else stage 2's)")
    p.add_argument("--min-steps", type=int, default=None,
                   help="progressive: stages 2-3 take at least this many optimiser steps, even past the budget (30; 0: the budget alone)")
    p.add_argument("--ema-share", type=float, default=None,
                   help="progressive: stages 2-3 are judged and kept on a moving average of their weights whose time constant "
                        "is this share of the stage (0.1; 0: the raw weights)")
    p.add_argument("--cutmix", type=float, default=None,
                   help="progressive: share of stage 2's batches mixed with CutMix, a regulariser against learning the "
                        "training photos by heart (0.5; 0: none)")
    p.add_argument("--refit", choices=["auto", "on", "off"], default=None,
                   help="progressive: train the winning stage again on training + validation photos, kept only if at least as "
                        "accurate on the test photos (auto: catalogues with test photos and at most 1000 training + validation photos)")
    p.add_argument("--no-activate", dest="activate", action="store_false", default=None,
                   help="progressive: do not propose the stages as the catalogue's active model")
    p.add_argument("--item-finder", choices=["auto", "off"], default="auto",
                   help="progressive: then train the Checkout's item finder (auto: when the catalogue has a learnt empty counter)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("item-finder", help="train the Checkout's item finder on the catalogue and its learnt empty counter")
    p.add_argument("--db", default="data")
    p.add_argument("--composites", type=int, default=None, help="counter scenes to learn from (1200)")
    p.add_argument("--epochs", type=int, default=None, help="passes over them (30)")
    p.set_defaults(func=cmd_item_finder)

    p = sub.add_parser("evaluate", help="accuracy, per class, confusions and store conditions")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--db", default="data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--report-dir", help="where confusion.png/.csv and evaluation.json go (default: beside the checkpoint)")
    p.add_argument("--unknown-products", default="", help="comma-separated products the model never saw: report AUROC and coverage")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ablate", help="baseline and K = 0, 2, 4 under one time budget; prints Tables 1 and 2")
    _add_train_args(p)
    p.add_argument("--minutes", type=float, required=True, help="total training minutes, split equally")
    p.add_argument("--recipe", choices=["paper"], default="paper", help="ablations always use the paper's recipe")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("jobs", help="background jobs: start | status RUN | cancel RUN | list")
    p.add_argument("action", choices=["start", "status", "cancel", "list"])
    p.add_argument("run", nargs="?", help="run directory (status, cancel)")
    p.add_argument("--db", default="data")
    p.add_argument("--out")
    p.add_argument("--backbone")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--cat-num", type=int)
    p.add_argument("--input-size", type=int)
    p.set_defaults(func=cmd_jobs)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "jobs" and args.action in ("status", "cancel") and not args.run:
        print("error: give the run directory", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the clear one-liners for known failure kinds
        from dataset_tools import CatalogueError
        from ntsnet import CheckpointError, PretrainedWeightsUnavailable

        from .jobs import JobError

        if isinstance(exc, (CatalogueError, CheckpointError, PretrainedWeightsUnavailable, JobError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
