"""Synthetic 'products' for tests: coloured shapes at random positions on a noisy shelf background."""
from __future__ import annotations

import zlib

import numpy as np
import cv2

# class name -> (shape, RGB colour)
PRODUCTS = {
    "red-box": ("square", (220, 40, 40)),
    "blue-can": ("circle", (40, 60, 220)),
    "green-pack": ("triangle", (40, 190, 60)),
}



def stable_seed(*parts) -> int:
    """A seed from names and numbers that is the same in every process (``hash()`` of a str is salted per
    process: test photos seeded by it differed from run to run and made a training test flaky)."""
    return zlib.crc32("/".join(map(str, parts)).encode())

def draw_product(rng: np.random.Generator, name: str, size: int = 96, height: int | None = None) -> np.ndarray:
    h, w = (height or size), size
    img = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)  # textured grey shelf
    shape, colour = PRODUCTS[name]
    r = int(min(h, w) * rng.uniform(0.16, 0.24))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    if shape == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif shape == "circle":
        cv2.circle(img, (cx, cy), r, colour, -1)
    else:
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], dtype=np.int32)
        cv2.fillPoly(img, [pts], colour)
    return img


def make_dataset(n_per_class: int, size: int = 96, seed: int = 0, classes=None):
    rng = np.random.default_rng(seed)
    classes = list(classes or PRODUCTS)
    images, labels = [], []
    for _ in range(n_per_class):
        for label, name in enumerate(classes):
            images.append(draw_product(rng, name, size))
            labels.append(label)
    return images, np.array(labels), classes
