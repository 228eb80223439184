"""Measure a checkpoint the way the paper does: accuracy, per class, confusions, and store conditions (Table 3).

Conditions are applied to every evaluation photo: clean; dark (brightness cut to 25%); blurry (Gaussian blur,
sigma 1.5% of the longest side); low resolution (longest side 80 px, as in the paper); plus accuracy per
capture tag (front / side / ...) recorded in the catalogue.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from dataset_tools import Catalogue
from ntsnet.images import read_in_batches

from .data import DataError, load_rgb

CONDITIONS = ("clean", "dark", "blurry", "low-res")
LOW_RES_SIDE = 80   # the low-res condition: longest side in pixels
BLUR_SHARE = 0.015  # the blurry condition's Gaussian sigma, as a share of the photo's longest side


def blur(rgb: np.ndarray, share: float = BLUR_SHARE) -> np.ndarray:
    """Gaussian blur with sigma = share x the longest side (so a photo's blur does not depend on its pixel count)."""
    if share <= 0:
        return rgb
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=share * max(rgb.shape[:2]))


def downscale(rgb: np.ndarray, side: int = LOW_RES_SIDE) -> np.ndarray:
    """The photo with its longest side brought down to ``side`` pixels (a photo already that small is left alone)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def apply_condition(rgb: np.ndarray, condition: str) -> np.ndarray:
    if condition == "clean":
        return rgb
    if condition == "dark":
        return (rgb.astype(np.float32) * 0.25).round().astype(np.uint8)
    if condition == "blurry":
        return blur(rgb)
    if condition == "low-res":
        return downscale(rgb, LOW_RES_SIDE)
    raise ValueError(f"unknown condition {condition!r}")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (z = 1.96) Wilson score interval of an accuracy of ``correct`` out of ``n`` photos: what the photos
    themselves allow one to say about it (296 photos at 84% leave about +-4 points), so a reader can tell a
    difference between two runs from the spread of the validation photos."""
    if n <= 0:
        return float("nan"), float("nan")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def compute_metrics(y_true, y_pred, top5, class_names) -> dict:
    """Exact accuracy figures from labels (ints), predictions (ints) and top-5 index lists."""
    n_cls = len(class_names)
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    n = len(y_true)
    confusion = np.zeros((n_cls, n_cls), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        total = int(confusion[i].sum())
        if total:
            per_class[name] = {"n": total, "correct": int(confusion[i, i]), "accuracy": confusion[i, i] / total}
    pairs = Counter()
    for t, p in zip(y_true, y_pred):
        if t != p:
            pairs[(class_names[t], class_names[p])] += 1
    correct = int((y_true == y_pred).sum())
    return {
        "n": n,
        "accuracy": correct / n if n else float("nan"),
        "accuracy_interval": wilson_interval(correct, n),
        "top5": float(np.mean([t in set(k[:5]) for t, k in zip(y_true, top5)])) if n else float("nan"),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "most_confused": [{"true": a, "predicted": b, "count": c} for (a, b), c in pairs.most_common(10)],
    }


def eval_items(db, class_names, split):
    cat = Catalogue(db, create=False)
    index = {n: i for i, n in enumerate(class_names)}
    items, unknown = [], 0
    for img in cat.images(split=split):
        if img["product"] in index:
            items.append({"path": str(cat.image_path(img)), "label": index[img["product"]], "tags": img["tags"]})
        elif img["product"] is not None:
            unknown += 1
    cat.close()
    return items, unknown


def _unknown_items(db, class_names, unknown_products):
    cat = Catalogue(db, create=False)
    known = {n.lower() for n in class_names}
    names = {p["name"].lower(): p["name"] for p in cat.products()}
    items = []
    for name in unknown_products:
        if name.lower() in known:
            raise DataError(f"{name!r} is one of the model's products; hold it out of training (--exclude-products) to test it as unknown")
        if name.lower() not in names:
            raise DataError(f"no product named {name!r} in the catalogue")
        items += [{"path": str(cat.image_path(i))} for i in cat.images(product=names[name.lower()])]
    cat.close()
    return items


def _scores(predictor, items, batch_size=16):
    arrays = [np.asarray(im) for im in (load_rgb(it["path"]) for it in items) if im is not None]
    out = []
    for start in range(0, len(arrays), batch_size):
        out += [p.score for p in predictor.predict_batch(arrays[start:start + batch_size])]
    return out


def evaluate(checkpoint, db, split: str = "test", out_dir=None, conditions=CONDITIONS, batch_size: int | None = None,
             device: str = "auto", precision: str = "auto", progress: bool = True, predictor=None,
             unknown_products=()) -> dict:
    from tqdm import tqdm

    from ntsnet import Predictor

    # background=False: a missing compiled export is built first (seconds), then every photo runs compiled
    predictor = predictor or Predictor.from_checkpoint(checkpoint, device=device, precision=precision, background=False)
    names = predictor.class_names
    batch_size = batch_size or predictor.preferred_batch
    items, unknown = eval_items(db, names, split)
    unknown_items = _unknown_items(db, names, unknown_products) if unknown_products else []
    known_scores: list[float] = []
    if not items:
        raise DataError(f"no photos of the model's products in the {split!r} split; assign splits (python -m dataset_tools split) or pick another --split")
    results: dict[str, dict] = {}
    skipped = 0
    clean_preds = None
    for cond in conditions:
        y_true, y_pred, top5, item_tags = [], [], [], []
        batches = read_in_batches(items, batch_size, read=lambda it: load_rgb(it["path"]))  # decoded ahead, by threads
        for batch in tqdm(batches, total=-(-len(items) // batch_size), desc=f"evaluate {cond}", disable=not progress, unit="batch"):
            arrays, labels, tags_of = [], [], []
            for it, im in batch:
                if im is None:
                    skipped += cond == conditions[0]
                    continue
                arrays.append(apply_condition(np.asarray(im), cond))
                labels.append(it["label"])
                tags_of.append(it["tags"])
            if not arrays:
                continue
            for pred, label in zip(predictor.predict_batch(arrays), labels):
                if cond == "clean":
                    known_scores.append(pred.score)
                y_true.append(label)
                y_pred.append(pred.index)
                top5.append([names.index(n) for n, _ in pred.top5])
            item_tags += tags_of
        results[cond] = compute_metrics(y_true, y_pred, top5, names)
        if cond == "clean":
            clean_preds = (item_tags, y_true, y_pred)
    main = results.get("clean") or next(iter(results.values()))
    report = {
        "checkpoint": str(checkpoint), "split": split, "n": main["n"], "accuracy": main["accuracy"], "top5": main["top5"],
        "accuracy_interval": main["accuracy_interval"], "per_class": main["per_class"], "most_confused": main["most_confused"], "confusion": main["confusion"],
        "class_names": names, "conditions": {c: {"n": r["n"], "accuracy": r["accuracy"]} for c, r in results.items()},
        "skipped_unreadable": skipped, "excluded_unknown_products": unknown,
    }
    if clean_preds is not None:  # per capture tag, like the paper's front / side columns
        tags: dict[str, list] = {}
        for its, t, p in zip(*clean_preds):
            for tag in its:
                tags.setdefault(tag, []).append(t == p)
        report["tags"] = {tag: {"n": len(v), "accuracy": float(np.mean(v))} for tag, v in sorted(tags.items())}
    if unknown_items and clean_preds is not None:
        from .openset import auroc, coverage_table

        u_scores = _scores(predictor, unknown_items, batch_size)
        correct = [t == p for t, p in zip(clean_preds[1], clean_preds[2])]
        report["open_set"] = {"unknown_products": list(unknown_products), "n_unknown": len(u_scores), "n_known": len(known_scores),
                              "score": "max_softmax", "auroc": auroc(known_scores, u_scores), "threshold": predictor.unknown_threshold,
                              "coverage": coverage_table(known_scores, correct, u_scores, predictor.unknown_threshold),
                              "known_scores": [round(float(v), 5) for v in known_scores],
                              "unknown_scores": [round(float(v), 5) for v in u_scores]}
    if out_dir is not None:
        write_report_files(report, Path(out_dir))
    return report


def write_report_files(report: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    with open(out_dir / "confusion.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, report["confusion"]):
            w.writerow([name, *row])
    plot_confusion(report["confusion"], names, out_dir / "confusion.png")
    if report.get("open_set"):
        plot_open_set(report["open_set"], out_dir / "open_set.png")
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))


def plot_confusion(confusion, names, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(names)
    side = min(24, max(5, 0.22 * n + 3))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=max(4, 10 - n // 12))
    ax.set_yticks(range(n), labels=names, fontsize=max(4, 10 - n // 12))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_open_set(o: dict, path: Path):
    """Known and unknown products' scores as two histograms, the stored threshold as a line: where they overlap,
    no threshold can tell them apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 41)
    ax.hist(o["known_scores"], bins=bins, alpha=0.6, density=True, label=f"known products ({o['n_known']})")
    ax.hist(o["unknown_scores"], bins=bins, alpha=0.6, density=True, label=f"unknown products ({o['n_unknown']})")
    if o.get("threshold") is not None:
        ax.axvline(o["threshold"], color="black", linestyle="--", label="stored threshold")
    ax.set_xlabel(f"score ({o['score']}); below the threshold: 'not in the catalogue'")
    ax.set_yticks([])
    ax.set_title(f"unknown products: AUROC {o['auroc']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(report: dict) -> str:
    interval = report.get("accuracy_interval")  # absent from reports written before it was recorded
    interval = f" (95% interval {interval[0]:.1%}-{interval[1]:.1%})" if interval else ""
    lines = [f"{report['n']} photos ({report['split']} split): top-1 {report['accuracy']:.1%}{interval}, top-5 {report['top5']:.1%}"]
    lines.append("condition   accuracy")
    for c, r in report["conditions"].items():
        lines.append(f"  {c:<9} {r['accuracy']:.1%}  (n={r['n']})")
    for tag, r in report.get("tags", {}).items():
        lines.append(f"  tag {tag:<5} {r['accuracy']:.1%}  (n={r['n']})")
    if report["most_confused"]:
        lines.append("most confused (true -> predicted):")
        lines += [f"  {m['true']} -> {m['predicted']}: {m['count']}" for m in report["most_confused"][:5]]
    if report.get("open_set"):
        o = report["open_set"]
        lines.append(f"unknown products ({', '.join(o['unknown_products'])}, {o['n_unknown']} photos): AUROC {o['auroc']:.3f}")
        lines.append("  coverage  threshold  accuracy on accepted  unknowns rejected")
        for r in o["coverage"]:
            cov = r["coverage"] if r["coverage"] == "stored" else f"{r['coverage']:.0%}"
            t = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
            lines.append(f"  {cov:>8}  {t:>9}  {r['accuracy_on_accepted']:>20.1%}  {r['unknown_rejected']:>17.1%}")
    worst = sorted(report["per_class"].items(), key=lambda kv: kv[1]["accuracy"])[:5]
    lines.append("weakest products: " + ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in worst))
    return "\n".join(lines)
