"""Overlay a prediction on an RGB frame: the label with its confidence and the Navigator's numbered boxes."""
from __future__ import annotations

import cv2
import numpy as np

from .predictor import Prediction

# distinct colours (RGB) for box ranks 1..K
_PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def _text(img, text, org, scale, colour, thickness):
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def draw_prediction(image: np.ndarray, pred: Prediction, fps: float | None = None, label: str | None = None) -> np.ndarray:
    """Return a copy of ``image`` (H, W, 3 RGB uint8) with boxes numbered by rank and the label banner."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    unit = max(h, w) / 640.0
    thick = max(1, int(round(2 * unit)))
    scale = max(0.4, 0.6 * unit)
    # draw the weakest first so rank 1 ends on top
    for rank in range(len(pred.boxes), 0, -1):
        b = pred.boxes[rank - 1]
        colour = _PALETTE[(rank - 1) % len(_PALETTE)]
        p0, p1 = (int(round(b.x0)), int(round(b.y0))), (int(round(b.x1)) - 1, int(round(b.y1)) - 1)
        cv2.rectangle(out, p0, p1, colour, thick)
        _text(out, f"{rank}: {b.score:.2f}", (p0[0] + 3, min(h - 4, p0[1] + int(20 * unit) + 2)), scale * 0.8, colour, max(1, thick - 1))
    banner = label if label is not None else f"{pred.label}  {pred.confidence:.0%}"
    if fps is not None:
        banner += f"  |  {fps:.1f} fps"
    (_, text_h), baseline = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(3, int(6 * unit))
    bar_h = text_h + baseline + 2 * pad
    cv2.rectangle(out, (0, 0), (w, bar_h), (0, 0, 0), -1)
    _text(out, banner, (6, pad + text_h), scale, (255, 255, 255), thick)
    return out


KNOWN, UNKNOWN, WAITING = (40, 200, 80), (255, 150, 0), (170, 170, 170)


def draw_checkout(image: np.ndarray, items, counted=None, banner: str = "") -> np.ndarray:
    """A copy of ``image`` with each checkout item's box and name (orange: not in the catalogue; grey: not counted
    yet, still settling), its Navigator parts as thin boxes inside, and ``banner`` across the top.
    ``counted``: a bool per item (None: all drawn as counted)."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    unit = max(h, w) / 640.0
    thick, scale = max(1, int(round(2 * unit))), max(0.4, 0.5 * unit)
    for n, it in enumerate(items):
        colour = UNKNOWN if it.unknown else KNOWN
        if counted is not None and not counted[n]:
            colour = WAITING
        for p in it.parts:
            cv2.rectangle(out, (int(p.x0), int(p.y0)), (int(p.x1) - 1, int(p.y1) - 1), colour, 1)
        x0, y0, x1, y1 = it.box
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thick)
        name = f"? {it.best_guess}" if it.unknown else f"{it.label} {it.confidence:.0%}"
        _text(out, name, (x0 + 2, max(int(14 * unit), y0 - 4)), scale, colour, max(1, thick - 1))
    if banner:
        (_, text_h), baseline = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        bar = text_h + baseline + 8
        cv2.rectangle(out, (0, 0), (w, bar), (0, 0, 0), -1)
        _text(out, banner, (6, 4 + text_h), scale, (255, 255, 255), thick)
    return out
