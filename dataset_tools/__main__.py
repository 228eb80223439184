"""Command line for the catalogue: ``python -m dataset_tools [--db DIR] COMMAND``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .catalogue import ENV_VAR, Catalogue, CatalogueError, DuplicateImage, default_dir
from .imagefile import InvalidImage
from .splits import assign_splits
from .transfer import export, import_path


def _print_json(obj):
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_init(cat, args):
    print(f"catalogue ready at {cat.root} (schema {cat.schema_version})")


def cmd_add_product(cat, args):
    pid = cat.add_product(args.name, sku=args.sku, description=args.description, group=args.group)
    print(f"product {args.name!r} created (id {pid})")


def cmd_add(cat, args):
    failed = 0
    for path in args.images:
        try:
            res = cat.add_image(Path(path), product=args.product, split=args.split, source_kind="upload", tags=args.tag or (),
                                original_name=Path(path).name, create_product=True)
            warn = f"  warnings: {', '.join(res.warnings)}" if res.warnings else ""
            print(f"{path}: added as image {res.image_id}{warn}")
        except (InvalidImage, DuplicateImage, OSError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_import(cat, args):
    summary = import_path(cat, args.path, split=args.split, classes_csv=args.classes, progress=not args.quiet)
    if args.json:
        _print_json(summary.to_dict())
    else:
        print(summary)


def cmd_export(cat, args):
    res = export(cat, args.out, fmt=args.format, split=args.split, progress=not args.quiet)
    print(f"exported {res['exported']} photos to {res['out']} ({res['format']}, with manifest.csv)")


def cmd_split(cat, args):
    res = assign_splits(cat, val=args.val, test=args.test, seed=args.seed, reset=args.reset)
    print(f"{res['changed']} photos (re)assigned; train {res['train']}, val {res['val']}, test {res['test']}")


def cmd_stats(cat, args):
    stats = cat.stats()
    if args.json:
        _print_json(stats)
        return
    print(f"{stats['root']}: {stats['products']} products, {stats['images']} photos ({stats['unlabelled']} unlabelled)")
    print("splits: " + ", ".join(f"{k} {v}" for k, v in stats["per_split"].items()))
    for name, c in stats["per_product"].items():
        print(f"  {name}: {c['images']} (train {c['train']}, val {c['val']}, test {c['test']}, unassigned {c['unassigned']})")
    if stats["quality_warnings"]:
        print("quality warnings: " + ", ".join(f"{k} {v}" for k, v in stats["quality_warnings"].items()))


def cmd_verify(cat, args):
    report = cat.verify(repair=not args.dry_run)
    if args.json:
        _print_json(report)
    else:
        print(f"missing files: {len(report['missing_files'])}, orphan files: {len(report['orphan_files'])}, "
              f"temp files: {report['temp_files']}, trash files: {report['trash_files']}"
              + (" -> repaired" if report["repaired"] and not report["ok"] else ""))
        if report["ok"]:
            print("catalogue is consistent")
    return 0 if report["ok"] or report["repaired"] else 1


def cmd_list(cat, args):
    if args.what == "products":
        rows = cat.products()
        if args.json:
            _print_json(rows)
        else:
            for p in rows:
                print(f"{p['id']:>5}  {p['name']}  ({p['images']} photos{', SKU ' + p['sku'] if p['sku'] else ''})")
    else:
        rows = cat.images(product=args.product, split=args.split, unlabelled=args.unlabelled, limit=args.limit)
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['id']:>6}  {r['product'] or '(unlabelled)'}  {r['split'] or '-'}  {r['width']}x{r['height']}  {r['path']}"
                      + (f"  [{', '.join(r['warnings'])}]" if r["warnings"] else ""))


def cmd_rename(cat, args):
    cat.rename_product(args.old, args.new)
    print(f"renamed {args.old!r} to {args.new!r}")


def cmd_merge(cat, args):
    n = cat.merge_products(args.source, args.target)
    print(f"merged {args.source!r} into {args.target!r} ({n} photos moved)")


def cmd_delete_product(cat, args):
    if not args.yes:
        n = len(cat.images(product=args.name))
        if not sys.stdin.isatty():
            raise CatalogueError(f"deleting {args.name!r} removes {n} photos: add --yes to confirm")
        if input(f"Delete {args.name!r} and its {n} photos? [y/N] ").strip().lower() != "y":
            print("nothing deleted")
            return 1
    n = cat.delete_product(args.name, confirm=True)
    print(f"deleted {args.name!r} and {n} photos")


def cmd_review(cat, args):
    """Suspicious labels, capture sessions, duplicates and outliers; loads model code (the embeddings)."""
    from .review_catalogue import review_catalogue

    checkpoint = args.with_model
    if checkpoint == "active":
        from training import active

        checkpoint = active.read(cat.root).get("checkpoint")
        if not checkpoint:
            raise CatalogueError("--with-model active: this catalogue has no active trained model")
    try:
        report, rows, _ = review_catalogue(cat, checkpoint=checkpoint)
    except (OSError, ValueError) as exc:  # an unreadable checkpoint (CheckpointError is a ValueError)
        raise CatalogueError(f"--with-model {args.with_model}: {exc}") from None
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    print(f"{len(rows)} photos reviewed: {len(report.suspects)} suspects, {len(report.sessions)} sessions, "
          f"{len(report.duplicates)} duplicate pairs")
    for s in report.suspects[: args.top]:
        hint = f" -> {s['suggested']}" if s["suggested"] else ""
        print(f"{s['score']:7.3f}  {s['kind']:<11} #{s['id']}  {s['product']}{hint}")


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m dataset_tools", description="Manage the product photo catalogue.")
    ap.add_argument("--db", type=Path, default=None, help=f"catalogue directory (default: ${ENV_VAR} or ./data)")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("init", help="create an empty catalogue").set_defaults(func=cmd_init)

    p = sub.add_parser("add-product", help="create a product")
    p.add_argument("name")
    p.add_argument("--sku")
    p.add_argument("--description")
    p.add_argument("--group", help="product group, e.g. a coarse class")
    p.set_defaults(func=cmd_add_product)

    p = sub.add_parser("add", help="add photo files to a product")
    p.add_argument("images", nargs="+")
    p.add_argument("--product", required=True)
    p.add_argument("--split", choices=["train", "val", "test"])
    p.add_argument("--tag", action="append", help="condition tag (front, side, dark ...); repeatable")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("import", help="import a folder tree, a zip, or a list file (path, fine_label, coarse_label)")
    p.add_argument("path")
    p.add_argument("--split", choices=["train", "val", "test"], help="assign this split to the imported photos")
    p.add_argument("--classes", help="classes.csv for a list file (default: beside the list)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export class sub-folders (or a zip) with manifest.csv")
    p.add_argument("out")
    p.add_argument("--format", choices=["folder", "zip"], default="folder")
    p.add_argument("--split", choices=["train", "val", "test"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("split", help="assign train/val/test (stable: existing assignments are kept)")
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reset", action="store_true", help="reassign every photo")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("stats", help="products, photos per product and split, quality warnings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("verify", help="check files against the index and repair leftovers of a crash")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help="list products or photos")
    p.add_argument("what", choices=["products", "images"])
    p.add_argument("--product")
    p.add_argument("--split", choices=["train", "val", "test"])
    p.add_argument("--unlabelled", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rename", help="rename a product")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(func=cmd_rename)

    p = sub.add_parser("merge", help="move all photos of SOURCE into TARGET and remove SOURCE")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("delete-product", help="delete a product and its photos")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="confirm without asking")
    p.set_defaults(func=cmd_delete_product)

    p = sub.add_parser("review", help="photos that look mislabelled, wrong capture sessions, duplicates, outliers")
    p.add_argument("--json", action="store_true", help="one JSON object: suspects, duplicates, sessions, confusion")
    p.add_argument("--with-model", default=None, metavar="CKPT",
                   help="embed with a trained checkpoint's backbone ('active': the catalogue's active model) "
                        "instead of the instant model's")
    p.add_argument("--top", type=int, default=30, help="suspects to print (without --json)")
    p.set_defaults(func=cmd_review)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cat = Catalogue(args.db if args.db is not None else default_dir(), create=args.command == "init")
        return args.func(cat, args) or 0
    except (CatalogueError, InvalidImage) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
