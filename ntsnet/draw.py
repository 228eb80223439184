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
