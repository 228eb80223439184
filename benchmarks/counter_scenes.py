"""Counter surfaces and what a webcam does to them over a day: the scenes the empty-scene and checkout benchmarks
show the product. A surface is rendered (laminate, wood grain, speckled stone, plain mat), since no photo of an
empty counter ships with the grocery set; the light changes are the ones a webcam meets: auto-exposure gain, white
balance, gamma, a gradient from a window, a soft shadow, sensor noise, and a small knock of the stand.
"""
from __future__ import annotations

import numpy as np

from common import ROOT  # noqa: F401  (puts the repository on the path)
from training.composites import light_change, smooth_noise  # noqa: F401  (shared with the item finder)

PALETTE = [(196, 190, 180), (150, 110, 75), (90, 90, 95), (225, 222, 215), (60, 75, 70), (175, 150, 120)]


def counter_surface(rng, h: int = 480, w: int = 640) -> np.ndarray:
    """One counter surface, RGB uint8."""
    base = np.array(PALETTE[int(rng.integers(len(PALETTE)))], np.float32)
    kind = int(rng.integers(4))
    tone = 0.06 * smooth_noise(rng, h, w, 120)
    if kind == 0:  # wood grain: warped stripes
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = 0.04 * y + 3.0 * smooth_noise(rng, h, w, 60)
        tone += 0.08 * np.sin(phase) + 0.03 * smooth_noise(rng, h, w, 4)
    elif kind == 1:  # speckled stone
        tone += 0.10 * (rng.random((h, w)) < 0.03) * rng.choice([-1, 1], (h, w)) + 0.04 * smooth_noise(rng, h, w, 3)
    elif kind == 2:  # laminate with a fine texture
        tone += 0.03 * smooth_noise(rng, h, w, 2)
    img = base[None, None, :] * (1.0 + tone[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def camera_frames(scene: np.ndarray, rng, n: int) -> list[np.ndarray]:
    """``n`` frames of a still scene from one camera: only sensor noise between them."""
    return [np.clip(scene + rng.normal(0, 2.5, scene.shape), 0, 255).astype(np.uint8) for _ in range(n)]
