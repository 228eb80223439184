"""Counter scenes made from single-product photos: what the item finder learns from and the checkout benchmark shows.

An item seen from above is a photo's middle (its outline is the product's edge, not the photo's background),
scaled and rotated; items are put down apart or touching (a neighbour hides at most about a tenth of an item),
each casting a soft shadow; the frame is then relit the way a webcam relights a scene over a day.
"""
from __future__ import annotations

import cv2
import numpy as np


def cut_out(photo: np.ndarray, rng, long_side=(90, 150), max_angle: float = 30.0, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, mask) of the item in ``photo`` seen from above, scaled so the long side is drawn from ``long_side``
    pixels, rotated by up to ``max_angle`` degrees. The item is where ``mask`` is true (a photo cut out on the
    counter), else the photo's middle 70%."""
    h, w = photo.shape[:2]
    if mask is not None and np.count_nonzero(mask) >= 16:
        ys, xs = np.nonzero(mask)
        rows, cols = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
        im, alpha = photo[rows, cols], np.where(mask[rows, cols], 255, 0).astype(np.uint8)
    else:
        im = photo[int(0.15 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)]
        alpha = np.full(im.shape[:2], 255, np.uint8)
    side_px = rng.uniform(*long_side)
    s = side_px / max(im.shape[:2])
    size = (max(8, int(im.shape[1] * s)), max(8, int(im.shape[0] * s)))
    im = cv2.resize(im, size, interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_NEAREST)
    angle = rng.uniform(-max_angle, max_angle)
    h, w = im.shape[:2]
    side = int(np.ceil(np.hypot(h, w))) + 2
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, 2] += ((side - w) / 2, (side - h) / 2)
    rgb = cv2.warpAffine(im, m, (side, side), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(alpha, m, (side, side), flags=cv2.INTER_NEAREST) > 127
    ys, xs = np.nonzero(mask)
    return rgb[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _touching_corner(rng, placed, h: int, w: int) -> tuple[int, int]:
    (py, px), (ph, pw) = placed[int(rng.integers(len(placed)))]
    side = int(rng.integers(4))
    overlap = rng.uniform(0, 0.1)
    if side == 0:
        return px + pw - int(overlap * w), py + int(rng.uniform(-0.3, 0.3) * ph)
    if side == 1:
        return px - w + int(overlap * w), py + int(rng.uniform(-0.3, 0.3) * ph)
    if side == 2:
        return px + int(rng.uniform(-0.3, 0.3) * pw), py + ph - int(overlap * h)
    return px + int(rng.uniform(-0.3, 0.3) * pw), py - h + int(overlap * h)


def positions(rng, sizes, touching: bool, frame_h: int, frame_w: int, border: int = 12):
    """Top-left corners (y, x) for items of ``sizes`` [(h, w)] on a frame, or None when they do not fit.
    ``touching``: each item against one already there, overlapping it by up to a tenth of its width."""
    placed = []
    for h, w in sizes:
        for _ in range(200):
            if touching and placed:
                x, y = _touching_corner(rng, placed, h, w)
            else:
                x, y = int(rng.integers(border, frame_w - w - border)), int(rng.integers(border, frame_h - h - border))
            if not (border <= x <= frame_w - w - border and border <= y <= frame_h - h - border):
                continue
            gap = -0.12 * min(h, w) if touching else border  # touching: no item hides more than about a tenth of another
            if all(x + w + gap <= qx or qx + qw + gap <= x or y + h + gap <= qy or qy + qh + gap <= y
                   for (qy, qx), (qh, qw) in placed):
                placed.append(((y, x), (h, w)))
                break
        else:
            return None
    return [p for p, _ in placed]


def compose(surface: np.ndarray, items, corners) -> tuple[np.ndarray, list]:
    """The scene (items put down in order, each with a soft shadow) and each item's visible box (None: hidden)."""
    fh, fw = surface.shape[:2]
    scene = surface.astype(np.float32)
    owner = np.full((fh, fw), -1, np.int32)
    for k, ((rgb, mask), (y, x)) in enumerate(zip(items, corners)):
        h, w = mask.shape
        shade = np.zeros((fh, fw), np.float32)
        shade[y:y + h, x:x + w][mask] = 1
        shade = cv2.GaussianBlur(np.roll(shade, (5, 5), (0, 1)), (0, 0), 4)
        scene *= (1 - 0.35 * shade)[..., None]
        region = scene[y:y + h, x:x + w]
        region[mask] = rgb[mask]
        owner[y:y + h, x:x + w][mask] = k
    boxes = []
    for k in range(len(items)):
        ys, xs = np.nonzero(owner == k)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None)
    return np.clip(scene, 0, 255).astype(np.uint8), boxes


def smooth_noise(rng, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with structures about ``scale`` pixels across."""
    small = rng.standard_normal((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return (big - big.mean()) / (big.std() + 1e-6)


def soft_shadow(rng, h: int, w: int, depth=(0.65, 0.9)) -> np.ndarray:
    """A multiplicative map: 1 everywhere but a blurred darker ellipse (a person or a shelf between lamp and counter)."""
    m = np.ones((h, w), np.float32)
    centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
    axes = (int(rng.uniform(0.1, 0.35) * w), int(rng.uniform(0.1, 0.35) * h))
    cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(*depth)), -1)
    return cv2.GaussianBlur(m, (0, 0), 0.05 * w)


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
