"""How well the label review finds planted mistakes, and how long it takes.

    python benchmarks/label_review.py [--seed 0] [--with-model CKPT]       # the grocery photos, planted mistakes
    python benchmarks/label_review.py --train-minutes 20                    # the same after a Train click on those labels
    python benchmarks/label_review.py --synthetic 100000 --products 1000    # time and memory of a large catalogue

Grocery: the train+val photos (2936, 81 products) imported into a fresh catalogue; 5% of them relabelled at random to
another product of the same coarse class (the mistake between near-identical variants), and 2 capture sessions of 12
photos re-captured under a neighbouring product (as a burst with the wrong product chosen). N = the relabelled
photos. Reported: the share of them among the first N and 2N suspects, how often the suggestion is the true product,
whether both sessions are reported as sessions, and the embedding and review times. No trained model is needed.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DATA, cpu_line  # noqa: E402


def build(db: Path, seed: int):
    """The catalogue with its planted mistakes: (catalogue, {photo id: true product}, [set of session ids])."""
    from dataset_tools import Catalogue
    from dataset_tools.transfer import import_list, read_classes_csv

    classes = read_classes_csv(DATA / "classes.csv")  # fine label -> (name, coarse label)
    lines = [line for split in ("train", "val") for line in (DATA / f"{split}.txt").read_text().splitlines() if line.strip()]
    listing = db.parent / "all.txt"
    listing.write_text("\n".join(lines))
    for sub in ("train", "val"):
        (db.parent / sub).symlink_to(DATA / sub)
    (db.parent / "classes.csv").write_text((DATA / "classes.csv").read_text())
    cat = Catalogue(db)
    import_list(cat, listing, split=None, progress=False)
    rows = cat.images()
    rng = np.random.default_rng(seed)
    coarse_of = {name: coarse for name, coarse in classes.values()}
    by_coarse: dict = {}
    for name, coarse in classes.values():
        by_coarse.setdefault(coarse, []).append(name)
    truth, sessions = {}, []
    while len(sessions) < 2:  # two bursts captured with the wrong product chosen
        start = int(rng.integers(len(rows) - 12))
        burst = rows[start:start + 12]
        if len({r["product"] for r in burst}) > 1 or any(r["id"] in truth for r in burst):
            continue
        names = sorted({r["product"] for r in rows})
        wrong = names[(names.index(burst[0]["product"]) + 1) % len(names)]
        data = [cat.image_path(r).read_bytes() for r in burst]
        cat.delete_images([r["id"] for r in burst])
        ids = [cat.add_image(d, product=wrong, source_kind="webcam").image_id for d in data]
        truth.update({i: burst[0]["product"] for i in ids})
        sessions.append(set(ids))
    singles = [r for r in cat.images() if r["id"] not in truth]
    for r in rng.choice(len(singles), int(0.05 * len(rows)), replace=False):
        r = singles[r]
        others = [n for n in by_coarse[coarse_of[r["product"]]] if n != r["product"]]
        if others:
            cat.move_images([r["id"]], str(rng.choice(others)))
            truth[r["id"]] = r["product"]
    return cat, truth, sessions


def grocery(args) -> dict:
    from dataset_tools.review_catalogue import catalogue_embeddings, photo_rows, review_catalogue

    cat, truth, planted_sessions = build(Path(tempfile.mkdtemp()) / "cat", args.seed)
    rows = photo_rows(cat)
    checkpoint = args.with_model or (click(cat, args.train_minutes) if args.train_minutes else None)
    t0 = time.perf_counter()
    emb = catalogue_embeddings(cat, rows, checkpoint=checkpoint)
    if args.whitened:  # the instant model's ranking space (ntsnet/whitening.py), label-free
        from ntsnet.whitening import Whitening

        emb = np.ascontiguousarray(Whitening(emb)(emb), np.float32)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report, _, _ = review_catalogue(cat, embeddings=emb, rows=rows)
    review_s = time.perf_counter() - t0
    order, suggested = [], {}
    for s in report.suspects:
        if s["id"] not in suggested:
            order.append(s["id"])
            suggested[s["id"]] = s["suggested"]
    n = len(truth)
    found = [i for i in order[: 2 * n] if i in truth]
    reported = [any(len(set(s["ids"]) & planted) >= len(planted) - 1 for s in report.sessions) for planted in planted_sessions]
    return {"photos": len(rows), "relabelled": n, "top_n": sum(i in truth for i in order[:n]) / n,
            "top_2n": len(found) / n, "right_suggestions": float(np.mean([suggested[i] == truth[i] for i in found])) if found else None,
            "sessions_reported": f"{sum(reported)} of {len(planted_sessions)}", "embedding_seconds": round(embed_s, 1),
            "review_seconds": round(review_s, 1), "duplicates": len(report.duplicates),
            "outliers": sum(s["kind"] == "outlier" for s in report.suspects), "embeddings": checkpoint or "instant model"}


def click(cat, minutes: float) -> str:
    """A default Train click on the catalogue with its planted mistakes; returns the model that became active."""
    from dataset_tools import assign_splits
    from training import active
    from training.progressive import ProgressiveConfig, train_progressive

    assign_splits(cat)
    run = Path(tempfile.mkdtemp()) / "run"
    summary = train_progressive(ProgressiveConfig(db=str(cat.root), out=str(run), max_minutes=minutes), log=lambda *a: None)
    print(json.dumps({"click": [(r["stage"], r["val_acc"], r["active"]) for r in summary["results"]]}), flush=True)
    return active.read(cat.root)["checkpoint"]


def synthetic(args) -> dict:
    """Clustered random unit vectors standing in for a supermarket's embeddings (the review's cost, not its quality)."""
    from dataset_tools.review import review

    rng = np.random.default_rng(args.seed)
    n, c = args.synthetic, args.products
    centres = rng.standard_normal((c, 1280)).astype(np.float32)
    labels = rng.integers(0, c, n)
    x = centres[labels] + 1.5 * rng.standard_normal((n, 1280)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noisy = labels.copy()
    flip = rng.choice(n, n // 20, replace=False)
    noisy[flip] = rng.integers(0, c, len(flip))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = review(x, noisy, list(range(n)), [f"product {i}" for i in range(c)], np.arange(n))
    return {"photos": n, "products": c, "review_seconds": round(time.perf_counter() - t0, 1),
            "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "memory_before_gib": round(before / 2**20, 2), "suspects": len(report.suspects)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-model", default=None, help="embed with this trained checkpoint instead of the instant model")
    ap.add_argument("--train-minutes", type=float, default=0, help="first a Train click of this many minutes on the catalogue "
                    "with its mistakes, then embed with the model it made active")
    ap.add_argument("--whitened", action="store_true", help="review the embeddings whitened by the catalogue's statistics")
    ap.add_argument("--synthetic", type=int, default=0, help="photos of synthetic embeddings (time and memory only)")
    ap.add_argument("--products", type=int, default=1000)
    args = ap.parse_args()
    print(f"CPU: {cpu_line()}", flush=True)
    if not args.synthetic and not DATA.exists():
        sys.exit(f"needs {DATA}")
    print(json.dumps(synthetic(args) if args.synthetic else grocery(args), indent=1))


if __name__ == "__main__":
    main()
