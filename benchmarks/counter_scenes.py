"""Counter surfaces and what a webcam does to them over a day: the scenes the empty-scene and checkout benchmarks
show the product. A surface is rendered (laminate, wood grain, speckled stone, plain mat), since no photo of an
empty counter ships with the grocery set; the light changes are the ones a webcam meets: auto-exposure gain, white
balance, gamma, a gradient from a window, a soft shadow, sensor noise, and a small knock of the stand.
"""
from __future__ import annotations

import cv2
import numpy as np

PALETTE = [(196, 190, 180), (150, 110, 75), (90, 90, 95), (225, 222, 215), (60, 75, 70), (175, 150, 120)]


def smooth_noise(rng, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with structures about ``scale`` pixels across."""
    small = rng.standard_normal((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return (big - big.mean()) / (big.std() + 1e-6)


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


def light_change(img: np.ndarray, rng, strength: float = 1.0, shift_px: int = 0) -> np.ndarray:
    """The same scene a while later: exposure, white balance, gamma, a lighting gradient, maybe a soft shadow,
    sensor noise, and the stand knocked by up to ``shift_px`` pixels."""
    h, w = img.shape[:2]
    out = img.astype(np.float32) / 255.0
    if shift_px:
        dx, dy = (int(v) for v in rng.integers(-shift_px, shift_px + 1, 2))
        out = cv2.warpAffine(out, np.float32([[1, 0, dx], [0, 1, dy]]), (w, h), borderMode=cv2.BORDER_REFLECT)
    out = out ** float(np.exp(rng.normal(0, 0.12 * strength)))
    gain = float(np.exp(rng.normal(0, 0.18 * strength)))
    balance = np.exp(rng.normal(0, 0.05 * strength, 3)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 1.0 + 0.15 * strength * rng.uniform(-1, 1) * ((x / w - 0.5) * np.cos(angle) + (y / h - 0.5) * np.sin(angle))
    out = out * gain * balance[None, None, :] * ramp[..., None]
    if rng.random() < 0.5 * strength:
        out *= soft_shadow(rng, h, w)[..., None]
    out = out * 255.0 + rng.normal(0, 2.0 + 3.0 * strength, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def soft_shadow(rng, h: int, w: int, depth=(0.65, 0.9)) -> np.ndarray:
    """A multiplicative map: 1 everywhere but a blurred darker ellipse (a person or a shelf between lamp and counter)."""
    m = np.ones((h, w), np.float32)
    centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
    axes = (int(rng.uniform(0.1, 0.35) * w), int(rng.uniform(0.1, 0.35) * h))
    cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(*depth)), -1)
    return cv2.GaussianBlur(m, (0, 0), 0.05 * w)


def camera_frames(scene: np.ndarray, rng, n: int) -> list[np.ndarray]:
    """``n`` frames of a still scene from one camera: only sensor noise between them."""
    return [np.clip(scene + rng.normal(0, 2.5, scene.shape), 0, 255).astype(np.uint8) for _ in range(n)]
