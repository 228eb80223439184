"""Photo quality checks shown to the person capturing: blur, brightness, size (OpenCV)."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

BLUR_THRESHOLD = 60.0        # variance of the Laplacian at 512 px; sharp shelf photos score in the hundreds
DARK_THRESHOLD = 45.0        # mean luma (0-255)
BRIGHT_THRESHOLD = 235.0
SMALL_THRESHOLD = 224        # shortest side in pixels: the Teacher's part size


@dataclass
class Quality:
    blur: float          # variance of the Laplacian (higher = sharper)
    brightness: float    # mean luma
    min_side: int
    warnings: list[str] = field(default_factory=list)


def assess(rgb: np.ndarray) -> Quality:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = 512.0 / max(h, w)
    if scale < 1.0:  # measure blur at a fixed size so large and small photos compare
        gray_s = cv2.resize(gray, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    else:
        gray_s = gray
    blur = float(cv2.Laplacian(gray_s, cv2.CV_64F).var())
    brightness = float(gray.mean())
    warnings = []
    if blur < BLUR_THRESHOLD:
        warnings.append("blurry")
    if brightness < DARK_THRESHOLD:
        warnings.append("too dark")
    elif brightness > BRIGHT_THRESHOLD:
        warnings.append("too bright")
    if min(h, w) < SMALL_THRESHOLD:
        warnings.append("too small")
    return Quality(round(blur, 2), round(brightness, 2), int(min(h, w)), warnings)
