"""'Not in the catalogue': a calibrated rejection threshold and its open-set evaluation.

The score is the Scrutinizer's max softmax probability. The threshold keeps 95% of the validation photos of
known products; it is stored in the checkpoint, and the Predictor answers "unknown" below it. Evaluation holds
some products out of training and measures how well the score separates them (AUROC) and what accuracy each
coverage buys.
"""
from __future__ import annotations

import numpy as np

from ntsnet.unknown import auroc  # noqa: F401  (re-exported: the evaluation's AUROC)

KEEP = 0.95
MIN_CALIBRATION_PHOTOS = 40  # fewer validation photos than this: no threshold (a 5% quantile of 8 scores rejects knowns)


def threshold_for(known_scores, keep: float = KEEP) -> float:
    scores = np.asarray(known_scores, np.float64)
    return float(np.quantile(scores, 1.0 - keep)) if len(scores) else 0.0


def threshold_record(known_scores, keep: float = KEEP) -> dict:
    """What a checkpoint stores as its unknown-product threshold. With fewer than MIN_CALIBRATION_PHOTOS
    validation photos there is none: the model never answers 'unknown'."""
    n = len(known_scores)
    record = {"score": "max_softmax", "value": None, "keep": keep, "n": n}
    if n < MIN_CALIBRATION_PHOTOS:
        return {**record, "why": f"fewer than {MIN_CALIBRATION_PHOTOS} validation photos: never answers 'unknown'"}
    return {**record, "value": threshold_for(known_scores, keep)}


def coverage_table(known_scores, known_correct, unknown_scores, threshold=None, coverages=(1.0, 0.95, 0.9, 0.8, 0.7, 0.5)) -> list[dict]:
    """For each coverage of known photos: the threshold, accuracy on the accepted ones, unknowns rejected."""
    k = np.asarray(known_scores, np.float64)
    ok = np.asarray(known_correct, bool)
    u = np.asarray(unknown_scores, np.float64)
    rows = []
    points = [(c, float(np.quantile(k, 1 - c)) if c < 1 else -np.inf) for c in coverages]
    if threshold is not None:
        points.append(("stored", float(threshold)))
    for label, t in points:
        accepted = k >= t
        rows.append({
            "coverage": label if label == "stored" else float(label),
            "threshold": None if t == -np.inf else round(t, 6),
            "known_accepted": float(accepted.mean()) if len(k) else float("nan"),
            "accuracy_on_accepted": float(ok[accepted].mean()) if accepted.any() else float("nan"),
            "unknown_rejected": float((u < t).mean()) if len(u) else float("nan"),
        })
    return rows


def calibrate_checkpoint(checkpoint, val_items, predictor=None, keep: float = KEEP) -> float | None:
    """Score the validation photos, store the threshold in the checkpoint (rewritten atomically)."""
    from ntsnet import Predictor, load_checkpoint, save_checkpoint
    from ntsnet.checkpoint import build_model

    from .data import load_rgb

    if not val_items:
        return None
    predictor = predictor or Predictor.from_checkpoint(checkpoint, backend="torch")  # the file is rewritten below: no export for it
    arrays = [np.asarray(im) for im in (load_rgb(it["path"]) for it in val_items) if im is not None]
    scores = []
    for start in range(0, len(arrays), 16):
        scores += [p.confidence for p in predictor.predict_batch(arrays[start:start + 16])]
    record = threshold_record(scores, keep)
    ckpt = load_checkpoint(checkpoint)
    extra = {**ckpt.extra, "unknown_threshold": record}
    save_checkpoint(checkpoint, build_model(ckpt), ckpt.class_names, extra=extra)
    return record["value"]
