"""One Train click on a small catalogue of real store photos, measured the way a store would see it.

    python benchmarks/train_click.py [--coarse Milk] [--per-product 14] [--max-minutes M] [--precision fp32]

Builds a catalogue from ../shared/datasets/grocerystore: the products of one coarse class (e.g. all Milk
cartons) with their first --per-product training photos, and their val photos as the validation split. Then
clicks Train (Studio.start_training with its defaults, the progressive job), and reports when a model at least
as accurate as the instant model became active, each stage's validation accuracy, and whether any switch
lowered the active model's accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, ROOT, cpu_line  # noqa: E402,F401  (ROOT: sys.path set up there)


def build_catalogue(db: Path, coarse: str, per_product: int, store_split: bool = False):
    from dataset_tools import Catalogue
    from dataset_tools.transfer import import_list, read_classes_csv

    classes = read_classes_csv(DATA / "classes.csv")
    wanted = {fine for fine, (_, c) in classes.items() if c == coarse or coarse == "all"}
    val_lines = [l for l in (DATA / "val.txt").read_text().splitlines() if l.strip() and int(l.split(",")[1]) in wanted]
    with_val = {int(l.split(",")[1]) for l in val_lines}
    counts: dict[int, int] = {}
    train_lines = []
    for l in (DATA / "train.txt").read_text().splitlines():
        if l.strip() and int(l.split(",")[1]) in (wanted if coarse == "all" else with_val) and (per_product <= 0 or counts.get(int(l.split(",")[1]), 0) < per_product):
            counts[int(l.split(",")[1])] = counts.get(int(l.split(",")[1]), 0) + 1
            train_lines.append(l)
    tmp = db.parent
    (tmp / "train.txt").write_text("\n".join(train_lines))
    (tmp / "val.txt").write_text("\n".join(val_lines))
    for name in ("train", "val"):  # list paths are relative to the list's folder
        (tmp / name).symlink_to(DATA / name) if not (tmp / name).exists() else None
    (tmp / "classes.csv").write_text((DATA / "classes.csv").read_text())
    cat = Catalogue(db)
    if store_split:  # as a store's captures: the catalogue splits the photos 80/20, the dataset's val photos are the test photos
        from dataset_tools import assign_splits

        import_list(cat, tmp / "train.txt", split=None, progress=False)
        assign_splits(cat, val=0.2, test=0.0, reset=True)
        import_list(cat, tmp / "val.txt", split="test", progress=False)
        n_val = cat.db.execute("SELECT COUNT(*) FROM images WHERE split = 'val'").fetchone()[0]
        return cat, len(counts), len(train_lines) - n_val, n_val
    import_list(cat, tmp / "train.txt", split="train", progress=False)
    import_list(cat, tmp / "val.txt", split="val", progress=False)
    return cat, len(counts), len(train_lines), len(val_lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coarse", default="Milk", help="a coarse class of classes.csv, or 'all' (the full grocery set)")
    ap.add_argument("--per-product", type=int, default=14, help="training photos per product; 0: all")
    ap.add_argument("--split", default="dataset", choices=["dataset", "store"],
                    help="dataset: its train/val lists; store: its training photos split 80/20 into train/val by the "
                         "catalogue and its val photos as test photos (then the job refits on train + val, measured on test)")
    ap.add_argument("--conditions", action="store_true", help="then evaluate the final active model under store conditions")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--freeze-stride", type=int, default=None, help="passed to the job (default: the job's own, 8 on a CPU)")
    ap.add_argument("--cutmix", type=float, default=None, help="passed to the job: share of stage 2's batches mixed with CutMix")
    ap.add_argument("--finetune-share", type=float, default=None, help="passed to the job: stage 2's share of the time after stage 1")
    ap.add_argument("--ntsnet-size", type=int, default=None, help="passed to the job: stage 3's input size (default: the job's choice)")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="the Train tab's backbone choice (default: its default)")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    from training import active, jobs
    from webapp import Studio

    tmp = Path(tempfile.mkdtemp())
    cat, n_products, n_train, n_val = build_catalogue(tmp / "cat", args.coarse, args.per_product, args.split == "store")
    print(f"CPU: {cpu_line()}")
    print(f"catalogue: {n_products} {args.coarse} products, {n_train} training photos, {n_val} validation photos")
    studio = Studio(cat.root)
    t0 = time.time()
    varied = {k: getattr(args, k) for k in ("freeze_stride", "cutmix", "finetune_share", "ntsnet_size") if getattr(args, k) is not None}
    plain = args.precision == "auto" and not varied
    run = studio.start_training(backbone=args.backbone, max_minutes=args.max_minutes) if plain else None
    if run is None:  # the same click, with the precision forced (a bf16 CPU measured as an fp32 one) or a setting varied
        run = jobs.start(cat.root, backbone=args.backbone, max_minutes=args.max_minutes, precision=args.precision, **varied)
    switches, seen = [], None
    while True:
        cur = active.read(cat.root)
        if cur.get("checkpoint") != seen and cur:
            seen = cur["checkpoint"]
            switches.append((time.time() - t0, cur.get("stage"), cur.get("val_acc")))
            print(f"{switches[-1][0]:6.1f} s  active: {cur.get('name')} ({cur.get('measured_on', 'validation')} {cur.get('val_acc'):.1%})", flush=True)
        st = jobs.status(run["run_dir"])
        if not st["alive"]:
            break
        time.sleep(0.5)
    p = st["progress"]
    print(f"job {st['state']} after {time.time() - t0:.0f} s (budget {p.get('budget_seconds')} s), {p.get('device')} {p.get('precision')}")
    instant = p.get("instant_val_acc")
    print(f"instant model (prototypes of the training photos): {instant:.1%}")
    for r in p.get("results", []):
        acc = f"{r['val_acc']:.1%}" if r["val_acc"] is not None else f"{r['test_acc']:.1%} on test photos (was {r['compared_with']['test_acc']:.1%})"
        print(f"  stage {r['stage']:<9} {acc}  at {r['minutes'] * 60:5.0f} s  {'ACTIVE' if r['active'] else r['verdict']}")
    accs = [a for _, stage, a in switches if stage != "refit"]  # a refit is compared on the test photos instead
    print(f"first model >= instant active after {switches[0][0]:.0f} s" if switches else "no model became active")
    print(f"active accuracy never went down: {all(b >= a for a, b in zip(accs, accs[1:]))}; "
          f"final active {accs[-1]:.1%} vs instant {instant:.1%} (+{(accs[-1] - instant) * 100:.1f} points)" if accs else "")
    print(json.dumps({"switches": switches, "results": p.get("results"), "instant": instant}))
    if args.conditions and switches:
        from training.evaluate import evaluate, format_report

        final = active.read(cat.root)["checkpoint"]
        report = evaluate(final, cat.root, split="val", out_dir=tmp / "evaluation", progress=False)
        print(format_report(report))


if __name__ == "__main__":
    main()
