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


def counter_scene(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """An empty counter a fixed camera sees: a smooth laminate with a fine grain (the same for the same seed)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.normal(0, 1, (6, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    tone = 1 + 0.05 * coarse + 0.08 * grain
    tone[int(h * 0.9):] *= 0.45  # the counter's front edge, in view at the bottom
    return np.clip(np.array([190, 175, 150], np.float32) * tone[..., None], 0, 255).astype(np.uint8)


def relit(scene: np.ndarray, seed: int, gain: float = 1.0, balance=(1.0, 1.0, 1.0), ramp: float = 0.0,
          shadow: float = 1.0) -> np.ndarray:
    """The scene later: exposure ``gain``, white ``balance``, a left-to-right light ``ramp``, a soft ``shadow`` over
    its middle (a multiplier), and fresh sensor noise."""
    rng = np.random.default_rng(seed)
    h, w = scene.shape[:2]
    light = (1 + ramp * (np.arange(w, dtype=np.float32) / w - 0.5))[None, :].repeat(h, 0)
    if shadow != 1.0:
        m = np.ones((h, w), np.float32)
        cv2.ellipse(m, (w // 2, h // 2), (w // 4, h // 5), 20, 0, 360, shadow, -1)
        light *= cv2.GaussianBlur(m, (0, 0), w / 20)
    out = scene.astype(np.float32) * gain * np.array(balance, np.float32) * light[..., None] + rng.normal(0, 2.5, scene.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def place(scene: np.ndarray, item: np.ndarray, x: int, y: int) -> np.ndarray:
    """``item`` put down with its top-left corner at (x, y) (clipped at the frame)."""
    out = scene.copy()
    h, w = out[y:y + item.shape[0], x:x + item.shape[1]].shape[:2]
    out[y:y + h, x:x + w] = item[:h, :w]
    return out


def packet(seed: int, h: int = 60, w: int = 44, colour=(40, 60, 200)) -> np.ndarray:
    """A product seen from above: a coloured packet with a printed label and some text-like marks."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour
    cv2.rectangle(img, (0, 0), (w - 1, h - 1), tuple(int(c * 0.55) for c in colour), 2)  # its rim, in its own shade
    cv2.rectangle(img, (w // 6, h // 3), (w - w // 6, 2 * h // 3), (235, 235, 225), -1)
    for _ in range(4):
        y = int(rng.integers(h // 3 + 2, 2 * h // 3 - 2))
        cv2.line(img, (w // 5, y), (int(rng.integers(w // 2, w - w // 5)), y), (30, 30, 30), 1)
    return img


def on_counter(scene: np.ndarray, *placed, seed: int = 0, **light) -> np.ndarray:
    """The counter with packets put down: each of ``placed`` is (colour, x, y); then relit (see ``relit``)."""
    for colour, x, y in placed:
        scene = place(scene, packet(x + y, colour=colour), x, y)
    return relit(scene, seed, **light)


def counter_photo(scene: np.ndarray, seed: int, colour) -> np.ndarray:
    """A product photo as Collect "on the counter" would keep it: the packet with some counter around it, in the
    varied light and framing a store's captures have."""
    from ntsnet.checkout import crop_with_margin

    rng = np.random.default_rng(seed)
    x, y = 60 + seed % 5 * 20, 50 + seed % 3 * 20
    frame = on_counter(scene, (colour, x, y), seed=seed, gain=rng.uniform(0.75, 1.25), ramp=rng.uniform(-0.2, 0.2))
    return crop_with_margin(frame, (x, y, x + 44, y + 60), margin=rng.uniform(0.05, 0.4))[0]
